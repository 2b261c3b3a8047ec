// Forward attention kernels (the 128-row query tile, and the split-KV combine) for the
// head-dim bucket 256 (float16 and bfloat16). One bucket per file so the
// instantiations compile in parallel.
#include "cuda/attention_fwd_kernel.cuh"

namespace llada {
namespace cuda {
namespace attn {

template llada_status run_attention_fwd<__half, 256>(const AttnFwdParams&);
template llada_status run_attention_fwd<__nv_bfloat16, 256>(const AttnFwdParams&);
template llada_status launch_attention_fwd<__half, 256, false>(const AttnFwdParams&,
                                                               const FwdPlan&);
template llada_status launch_attention_fwd<__nv_bfloat16, 256, false>(const AttnFwdParams&,
                                                                      const FwdPlan&);

}  // namespace attn
}  // namespace cuda
}  // namespace llada
