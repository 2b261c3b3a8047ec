// Entry point of the CUDA attention backward. Three or four kernels on the caller's stream:
//   1. preprocess: Delta = rowsum(dO * O) per (batch, head, query) into the workspace, and
//      zero the float32 dQ accumulator (so no separate memset is needed);
//   2. the main kernel (attention_bwd_kernel.cuh): dK, dV written directly, dQ accumulated
//      with float32 atomics into the workspace;
//   3. convert: dQ accumulator -> q's dtype at dq's strides;
//   4. with a split plan (attention_bwd_plan.cuh) only: reduce the float32 partial dK, dV of
//      the step ranges, in range order, into dk and dv.
// Workspace layout (float32): dQ accumulator [B, Hq, Sq, D], then Delta [B, Hq, Sq], then
// (split plans only, from a 16-byte aligned offset) partials [splits][2][B][Hkv][Sk][D].
#include <algorithm>

#include "cuda/attention_bwd_plan.cuh"
#include "cuda/attention_common.cuh"

namespace llada {
namespace cuda {

namespace {

constexpr int kRowThreads = 256;  // 8 warps, one (batch, head, query) row per warp
constexpr int kRowsPerBlock = kRowThreads / kWarpSize;
constexpr int64_t kMaxRowBlocks = int64_t(1) << 20;  // grid-stride beyond this

struct RowIndex {
  int64_t b, h, q;
};

// Row r of the [B, Hq, Sq] row space.
__device__ __forceinline__ RowIndex split_row(int64_t r, int64_t Sq, int64_t Hq) {
  RowIndex ix;
  ix.q = r % Sq;
  const int64_t bh = r / Sq;
  ix.h = bh % Hq;
  ix.b = bh / Hq;
  return ix;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    attention_bwd_preprocess_kernel(const AttnBwdParams p, float* __restrict__ ws_dq,
                                    float* __restrict__ ws_delta) {
  const AttnFwdParams& f = p.fwd;
  const int64_t rows = f.B * f.Hq * f.Sq;
  const int D = static_cast<int>(f.D);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
       r < rows; r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const RowIndex ix = split_row(r, f.Sq, f.Hq);
    const T* o =
        static_cast<const T*>(f.out) + ix.b * f.out_st.b + ix.h * f.out_st.h + ix.q * f.out_st.s;
    const T* d = static_cast<const T*>(p.dout) + ix.b * p.dout_st.b + ix.h * p.dout_st.h +
                 ix.q * p.dout_st.s;
    float* dq = ws_dq + r * D;
    float acc = 0.f;
    for (int c = lane; c < D; c += kWarpSize) {
      acc += DType<T>::to_float(o[c]) * DType<T>::to_float(d[c]);
      dq[c] = 0.f;
    }
    acc = warp_sum(acc);
    if (lane == 0) ws_delta[r] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    attention_bwd_convert_dq_kernel(const AttnBwdParams p, const float* __restrict__ ws_dq) {
  const AttnFwdParams& f = p.fwd;
  const int64_t rows = f.B * f.Hq * f.Sq;
  const int D = static_cast<int>(f.D);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
       r < rows; r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const RowIndex ix = split_row(r, f.Sq, f.Hq);
    T* dq = static_cast<T*>(p.dq) + ix.b * p.dq_st.b + ix.h * p.dq_st.h + ix.q * p.dq_st.s;
    const float* src = ws_dq + r * D;
    for (int c = lane; c < D; c += kWarpSize) dq[c] = DType<T>::from_float(src[c]);
  }
}

// dk, dv = sum over the step ranges of the partials, one (batch, kv head, key) row per warp.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    attention_bwd_reduce_dkv_kernel(const AttnBwdParams p, const float* __restrict__ ws_dkv,
                                    int splits) {
  const AttnFwdParams& f = p.fwd;
  const int64_t rows = f.B * f.Hkv * f.Sk;
  const int D = static_cast<int>(f.D);
  const int64_t plane = rows * D;  // one [B, Hkv, Sk, D] partial
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
       r < rows; r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const RowIndex ix = split_row(r, f.Sk, f.Hkv);  // (b, kv head, key)
    T* dk = static_cast<T*>(p.dk) + ix.b * p.dk_st.b + ix.h * p.dk_st.h + ix.q * p.dk_st.s;
    T* dv = static_cast<T*>(p.dv) + ix.b * p.dv_st.b + ix.h * p.dv_st.h + ix.q * p.dv_st.s;
    const float* src = ws_dkv + r * D;
    for (int c = lane; c < D; c += kWarpSize) {
      float sk = 0.f, sv = 0.f;
      const float* part = src + c;
      for (int s = 0; s < splits; ++s, part += 2 * plane) {  // range order: same sums every run
        sk += part[0];
        sv += part[plane];
      }
      dk[c] = DType<T>::from_float(sk);
      dv[c] = DType<T>::from_float(sv);
    }
  }
}

unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(
      std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxRowBlocks));
}

// The plan of these shapes, for their head-dim bucket (D <= 256).
attn::BwdPlan plan_for(int64_t B, int64_t Sq, int64_t Hq, int64_t Sk, int64_t Hkv, int64_t D) {
  if (D <= 64) return attn::bwd_plan<64>(B, Sq, Hq, Hkv, Sk);
  if (D <= 128) return attn::bwd_plan<128>(B, Sq, Hq, Hkv, Sk);
  return attn::bwd_plan<256>(B, Sq, Hq, Hkv, Sk);
}

// Float32 offset of the partials: after dQ and Delta, rounded up to 16 bytes.
int64_t partials_offset(int64_t B, int64_t Sq, int64_t Hq, int64_t D) {
  return (B * Hq * Sq * (D + 1) + 3) / 4 * 4;
}

template <typename T>
llada_status bwd_for_dtype(const AttnBwdParams& p, const attn::BwdWorkspace& ws) {
  const AttnFwdParams& f = p.fwd;
  const int64_t rows = f.B * f.Hq * f.Sq;
  cudaStream_t stream = as_stream(f.stream);
  const unsigned row_blocks = row_grid(rows);
  if (rows > 0) {
    launch_kernel("attention_bwd_preprocess_kernel", attention_bwd_preprocess_kernel<T>, row_blocks,
                  kRowThreads, 0, stream, p, ws.dq, ws.delta);
    const llada_status st = check_launch("attention_bwd (preprocess)");
    if (st != LLADA_OK) return st;
  }
  if (f.Sk > 0) {  // with no keys there is no key tile; dq is zero and dk, dv are empty
    llada_status st;
    if (f.D <= 64) {
      st = attn::run_attention_bwd<T, 64>(p, ws);
    } else if (f.D <= 128) {
      st = attn::run_attention_bwd<T, 128>(p, ws);
    } else {
      st = attn::run_attention_bwd<T, 256>(p, ws);
    }
    if (st != LLADA_OK) return st;
    if (ws.dkv != nullptr) {
      const int64_t kv_rows = f.B * f.Hkv * f.Sk;
      launch_kernel("attention_bwd_reduce_dkv_kernel", attention_bwd_reduce_dkv_kernel<T>,
                    row_grid(kv_rows), kRowThreads, 0, stream, p, ws.dkv, ws.plan.splits);
      st = check_launch("attention_bwd (dk/dv reduce)");
      if (st != LLADA_OK) return st;
    }
  }
  if (rows > 0) {
    launch_kernel("attention_bwd_convert_dq_kernel", attention_bwd_convert_dq_kernel<T>, row_blocks,
                  kRowThreads, 0, stream, p, ws.dq);
    return check_launch("attention_bwd (dq convert)");
  }
  return LLADA_OK;
}

// Bytes of workspace for these shapes under plan `pl`: dQ and Delta, and the partials when
// the plan splits.
size_t workspace_bytes(const attn::BwdPlan& pl, int64_t B, int64_t Sq, int64_t Hq, int64_t Sk,
                       int64_t Hkv, int64_t D) {
  if (B <= 0 || Sq <= 0 || Hq <= 0 || D <= 0) return 0;
  if (pl.splits <= 1) return static_cast<size_t>(B * Hq * Sq) * static_cast<size_t>(D + 1) * 4;
  return static_cast<size_t>(partials_offset(B, Sq, Hq, D)) * sizeof(float) +
         attn::bwd_partials_bytes(B, Hkv, Sk, D, pl.splits);
}

}  // namespace

size_t attention_bwd_workspace_size(int64_t B, int64_t Sq, int64_t Hq, int64_t Sk, int64_t Hkv,
                                    int64_t D) {
  if (Hkv <= 0 || D > 256) return workspace_bytes(attn::BwdPlan{1, 1}, B, Sq, Hq, Sk, Hkv, D);
  return workspace_bytes(plan_for(B, Sq, Hq, Sk, Hkv, D), B, Sq, Hq, Sk, Hkv, D);
}

llada_status attention_bwd(const AttnBwdParams& p) {
  const AttnFwdParams& f = p.fwd;
  const llada_status st = attn::check_attention_shapes(f, "attention_bwd");
  if (st != LLADA_OK) return st;
  if (f.B == 0) return LLADA_OK;  // no gradient element
  attn::BwdWorkspace ws;
  ws.plan = plan_for(f.B, f.Sq, f.Hq, f.Sk, f.Hkv, f.D);  // as the size query plans
  const size_t need = workspace_bytes(ws.plan, f.B, f.Sq, f.Hq, f.Sk, f.Hkv, f.D);
  if (need > 0 && (p.workspace == nullptr || p.workspace_bytes < need)) {
    return set_error(LLADA_ERROR_INSUFFICIENT_WORKSPACE,
                     "attention_bwd: workspace of %zu bytes needed, got %zu at %p", need,
                     p.workspace_bytes, p.workspace);
  }
  if (need > 0 && reinterpret_cast<uintptr_t>(p.workspace) % 8 != 0) {  // float2 atomics
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "attention_bwd: workspace must be aligned to 8 bytes");
  }
  ws.dq = static_cast<float*>(p.workspace);
  ws.delta = need > 0 ? ws.dq + f.B * f.Hq * f.Sq * f.D : nullptr;
  ws.dkv = ws.plan.splits > 1 ? ws.dq + partials_offset(f.B, f.Sq, f.Hq, f.D) : nullptr;
  if (f.dtype == LLADA_FLOAT16) return bwd_for_dtype<__half>(p, ws);
  return bwd_for_dtype<__nv_bfloat16>(p, ws);
}

}  // namespace cuda
}  // namespace llada
