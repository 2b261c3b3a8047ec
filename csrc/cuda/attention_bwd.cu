// Entry point of the CUDA attention backward. Three kernels on the caller's stream:
//   1. preprocess: Delta = rowsum(dO * O) per (batch, head, query) into the workspace, and
//      zero the float32 dQ accumulator (so no separate memset is needed);
//   2. the main kernel (attention_bwd_kernel.cuh): dK, dV written directly, dQ accumulated
//      with float32 atomics into the workspace;
//   3. convert: dQ accumulator -> q's dtype at dq's strides.
// Workspace layout (float32): dQ accumulator [B, Hq, Sq, D], then Delta [B, Hq, Sq].
#include <algorithm>

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

template <typename T>
llada_status bwd_for_dtype(const AttnBwdParams& p, float* ws_dq, float* ws_delta) {
  const AttnFwdParams& f = p.fwd;
  const int64_t rows = f.B * f.Hq * f.Sq;
  cudaStream_t stream = as_stream(f.stream);
  const unsigned row_blocks = static_cast<unsigned>(
      std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxRowBlocks));
  if (rows > 0) {
    launch_kernel("attention_bwd_preprocess_kernel", attention_bwd_preprocess_kernel<T>, row_blocks,
                  kRowThreads, 0, stream, p, ws_dq, ws_delta);
    const llada_status st = check_launch("attention_bwd (preprocess)");
    if (st != LLADA_OK) return st;
  }
  if (f.Sk > 0) {  // with no keys there is no key tile; dq is zero and dk, dv are empty
    llada_status st;
    if (f.D <= 64) {
      st = attn::run_attention_bwd<T, 64>(p, ws_dq, ws_delta);
    } else if (f.D <= 128) {
      st = attn::run_attention_bwd<T, 128>(p, ws_dq, ws_delta);
    } else {
      st = attn::run_attention_bwd<T, 256>(p, ws_dq, ws_delta);
    }
    if (st != LLADA_OK) return st;
  }
  if (rows > 0) {
    launch_kernel("attention_bwd_convert_dq_kernel", attention_bwd_convert_dq_kernel<T>, row_blocks,
                  kRowThreads, 0, stream, p, ws_dq);
    return check_launch("attention_bwd (dq convert)");
  }
  return LLADA_OK;
}

}  // namespace

size_t attention_bwd_workspace_size(int64_t B, int64_t Sq, int64_t Hq, int64_t Sk, int64_t Hkv,
                                    int64_t D) {
  (void)Sk;
  (void)Hkv;
  if (B <= 0 || Sq <= 0 || Hq <= 0 || D <= 0) return 0;
  return static_cast<size_t>(B * Hq * Sq) * static_cast<size_t>(D + 1) * sizeof(float);
}

llada_status attention_bwd(const AttnBwdParams& p) {
  const AttnFwdParams& f = p.fwd;
  const llada_status st = attn::check_attention_shapes(f, "attention_bwd");
  if (st != LLADA_OK) return st;
  if (f.B == 0) return LLADA_OK;  // no gradient element
  const size_t need = attention_bwd_workspace_size(f.B, f.Sq, f.Hq, f.Sk, f.Hkv, f.D);
  if (need > 0 && (p.workspace == nullptr || p.workspace_bytes < need)) {
    return set_error(LLADA_ERROR_INSUFFICIENT_WORKSPACE,
                     "attention_bwd: workspace of %zu bytes needed, got %zu at %p", need,
                     p.workspace_bytes, p.workspace);
  }
  if (need > 0 && reinterpret_cast<uintptr_t>(p.workspace) % 8 != 0) {  // float2 atomics
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "attention_bwd: workspace must be aligned to 8 bytes");
  }
  float* ws_dq = static_cast<float*>(p.workspace);
  float* ws_delta = need > 0 ? ws_dq + f.B * f.Hq * f.Sq * f.D : nullptr;
  if (f.dtype == LLADA_FLOAT16) return bwd_for_dtype<__half>(p, ws_dq, ws_delta);
  return bwd_for_dtype<__nv_bfloat16>(p, ws_dq, ws_delta);
}

}  // namespace cuda
}  // namespace llada
