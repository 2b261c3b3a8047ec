// Entry point of the CUDA attention forward: checks what the kernels assume and dispatches on
// dtype and head-dim bucket. Head dims 64 and 128 are the fast paths; any other multiple of 8
// up to 256 runs in the next bucket up (64, 128 or 256) with the missing columns zero-filled
// in shared memory, which leaves every dot product and output column unchanged.
#include "cuda/attention_common.cuh"
#include "cuda/attention_fwd_plan.cuh"

namespace llada {
namespace cuda {

namespace {

template <int kD>
size_t workspace_for(int64_t B, int64_t Sq, int64_t Hq, int64_t Sk, int64_t Hkv) {
  const attn::FwdPlan pl = attn::fwd_plan<kD>(B, Sq, Hq, Hkv, Sk, true);
  return attn::fwd_workspace_bytes<kD>(B, Sq, Hq, pl.splits);
}

template <typename T>
llada_status fwd_for_dtype(const AttnFwdParams& p) {
  if (p.D <= 64) return attn::run_attention_fwd<T, 64>(p);
  if (p.D <= 128) return attn::run_attention_fwd<T, 128>(p);
  return attn::run_attention_fwd<T, 256>(p);
}

}  // namespace

size_t attention_fwd_workspace_size(int64_t B, int64_t Sq, int64_t Hq, int64_t Sk, int64_t Hkv,
                                    int64_t D) {
  if (B <= 0 || Sq <= 0 || Hq <= 0 || Hkv <= 0 || D <= 0 || D > 256) return 0;
  if (D <= 64) return workspace_for<64>(B, Sq, Hq, Sk, Hkv);
  if (D <= 128) return workspace_for<128>(B, Sq, Hq, Sk, Hkv);
  return workspace_for<256>(B, Sq, Hq, Sk, Hkv);
}

llada_status attention_fwd(const AttnFwdParams& p) {
  const llada_status st = attn::check_attention_shapes(p, "attention_fwd");
  if (st != LLADA_OK) return st;
  if (p.B == 0 || p.Sq == 0 || p.Hq == 0) return LLADA_OK;  // no output element
  // Sk == 0 is fine: every row is fully masked (out = 0, lse = -inf).
  if (p.dtype == LLADA_FLOAT16) return fwd_for_dtype<__half>(p);
  return fwd_for_dtype<__nv_bfloat16>(p);
}

}  // namespace cuda
}  // namespace llada
