// Forward attention kernels for the head-dim bucket 64 with the short (64-row) query tile
// (float16 and bfloat16), for heads or packed GQA groups of at most 64 query rows. A file
// of its own so the instantiations compile in parallel.
#include "cuda/attention_fwd_kernel.cuh"

namespace llada {
namespace cuda {
namespace attn {

template llada_status launch_attention_fwd<__half, 64, true>(const AttnFwdParams&, const FwdPlan&);
template llada_status launch_attention_fwd<__nv_bfloat16, 64, true>(const AttnFwdParams&,
                                                                    const FwdPlan&);

}  // namespace attn
}  // namespace cuda
}  // namespace llada
