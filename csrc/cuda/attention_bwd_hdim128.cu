// Backward attention kernels for the head-dim bucket 128 (float16 and bfloat16). One bucket
// per file so the instantiations compile in parallel.
#include "cuda/attention_bwd_kernel.cuh"

namespace llada {
namespace cuda {
namespace attn {

template llada_status run_attention_bwd<__half, 128>(const AttnBwdParams&, const BwdWorkspace&);
template llada_status run_attention_bwd<__nv_bfloat16, 128>(const AttnBwdParams&,
                                                            const BwdWorkspace&);

}  // namespace attn
}  // namespace cuda
}  // namespace llada
