// CUDA masked cross-entropy with per-token weights, forward and backward.
//
//   loss_i = w_i * (logsumexp(x_i) - x_i[t_i]),   dx_i = g_i * w_i * (softmax(x_i) - onehot(t_i))
//
// In masked diffusion training only the masked rows (typically half of them, weight
// 1/p_mask) carry a loss, and a row is a whole vocabulary (V = 126464 for LLaDA), so the
// kernels are pure bandwidth: one CTA per row, the CTA leaves at once when w_i == 0 (the
// forward then reads nothing; the backward only writes zeros), and the row is streamed
// once with 16-byte loads. No host synchronisation and no workspace: rows are compacted
// implicitly by the CTAs of inactive rows retiring after one weight load, which costs far
// less than a scan kernel would.
//
// Semantics are those of the CPU twin (csrc/cpu/masked_ce.cpp) and llada.h:
// - rows with weight 0 are not read; forward writes loss 0 and lse 0, backward zeros;
// - a target outside [0, V) on an active row gives loss NaN;
// - accumulation is float32 whatever the logits dtype (float32, bfloat16, float16);
// - grad_logits may be the very buffer of logits (each element is read and then written
//   by the same thread, with coherent loads).
#include <math.h>

#include "common/online_softmax.h"
#include "common/params.h"
#include "cuda/cuda_utils.cuh"

namespace llada {
namespace cuda {
namespace {

constexpr int kCEThreads = 256;
// Vectors each thread keeps in flight per loop trip, to hide DRAM latency.
constexpr int kCEUnroll = 4;

// Folds one value into a thread's running (max, sum of exp). __expf is exact enough here
// (its argument is <= 0 and the result is accumulated in float32) and keeps the SFU cost
// well below the DRAM time of the same bytes.
__device__ __forceinline__ void fold(OnlineSoftmax& st, float v) {
  if (v > st.m) {
    st.s = st.s * __expf(st.m - v);  // m == -inf gives 0 * 0
    st.m = v;
  }
  // -inf adds exp(-inf) = 0; NaN makes s NaN, which the final lse reports.
  if (st.m != -INFINITY) {
    st.s += __expf(v - st.m);
  } else if (v != v) {
    st.s = v;
  }
}

// Folds a vector: one rescale per vector instead of one per element.
template <int kN>
__device__ __forceinline__ void fold_vec(OnlineSoftmax& st, const float (&v)[kN]) {
  float vmax = v[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) vmax = fmaxf(vmax, v[i]);
  if (vmax > st.m) {
    st.s = st.s * __expf(st.m - vmax);
    st.m = vmax;
  }
  if (st.m == -INFINITY) {
    // Every value so far is -inf (or NaN, which fmaxf skips): only NaN still matters.
#pragma unroll
    for (int i = 0; i < kN; ++i)
      if (v[i] != v[i]) st.s = v[i];
    return;
  }
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kN; ++i) acc += __expf(v[i] - st.m);
  st.s += acc;
}

// OnlineSoftmax::merge skips a side whose max is -inf, and with it the NaN such a side may
// carry in s (a slice holding only -inf and NaN): keep that NaN, as the CPU twin does.
struct MergeOnline {
  __device__ __forceinline__ void operator()(OnlineSoftmax& a, const OnlineSoftmax& b) const {
    const bool nan = a.s != a.s || b.s != b.s;
    a.merge(b);
    if (nan) a.s = NAN;
  }
};

template <typename T, bool kVec>
__global__ void __launch_bounds__(kCEThreads)
    masked_ce_fwd_kernel(const T* __restrict__ logits, int64_t logits_rs,
                         const int64_t* __restrict__ targets, int64_t targets_s,
                         const float* __restrict__ weights, int64_t weights_s,
                         float* __restrict__ loss, int64_t loss_s, float* __restrict__ lse_out,
                         int64_t lse_s, int64_t N, int64_t V) {
  LLADA_SHARED_ARRAY(OnlineSoftmax, smem, kCEThreads / kWarpSize + 1);
  constexpr int kN = DType<T>::kVec;

  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float w = weights[row * weights_s];
    if (w == 0.f) {  // uniform across the CTA: the whole block skips the row
      if (threadIdx.x == 0) {
        loss[row * loss_s] = 0.f;
        if (lse_out != nullptr) lse_out[row * lse_s] = 0.f;
      }
      continue;
    }
    const T* x = logits + row * logits_rs;
    OnlineSoftmax st = OnlineSoftmax::empty();

    if (kVec) {
      const int64_t nvec = V / kN;
      for (int64_t base = threadIdx.x; base < nvec; base += kCEThreads * kCEUnroll) {
        float buf[kCEUnroll][kN];
        // Issue every load of this trip before using any, so several 16-byte requests per
        // thread are in flight at once.
#pragma unroll
        for (int u = 0; u < kCEUnroll; ++u) {
          const int64_t vi = base + static_cast<int64_t>(u) * kCEThreads;
          if (vi < nvec) {
            load_vec_ro<T>(x + vi * kN, buf[u]);
          } else {
#pragma unroll
            for (int i = 0; i < kN; ++i) buf[u][i] = -INFINITY;
          }
        }
#pragma unroll
        for (int u = 0; u < kCEUnroll; ++u) fold_vec<kN>(st, buf[u]);
      }
    } else {
      for (int64_t v = threadIdx.x; v < V; v += kCEThreads) fold(st, DType<T>::to_float(x[v]));
    }

    st = block_reduce<kCEThreads>(st, smem, MergeOnline{});
    if (threadIdx.x == 0) {
      const int64_t t = targets[row * targets_s];
      const float row_lse = st.lse();
      const float xt = (t >= 0 && t < V) ? DType<T>::to_float(x[t]) : NAN;
      loss[row * loss_s] = w * (row_lse - xt);
      if (lse_out != nullptr) lse_out[row * lse_s] = row_lse;
    }
  }
}

// grad = g * w * (exp(x - lse) - onehot(t)). `logits` and `grad` may alias, hence no
// __restrict__ on them and coherent loads.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kCEThreads)
    masked_ce_bwd_kernel(const T* logits, int64_t logits_rs, const int64_t* __restrict__ targets,
                         int64_t targets_s, const float* __restrict__ weights, int64_t weights_s,
                         const float* __restrict__ lse_in, int64_t lse_s,
                         const float* __restrict__ grad_loss, int64_t grad_loss_s, T* grad,
                         int64_t grad_rs, int64_t N, int64_t V) {
  constexpr int kN = DType<T>::kVec;

  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float w = weights[row * weights_s];
    T* gr = grad + row * grad_rs;
    if (w == 0.f) {
      // Inactive row: zeros, and its logits are never touched.
      if (kVec) {
        float z[kN];
#pragma unroll
        for (int i = 0; i < kN; ++i) z[i] = 0.f;
        for (int64_t vi = threadIdx.x; vi < V / kN; vi += kCEThreads) store_vec<T>(gr + vi * kN, z);
      } else {
        for (int64_t v = threadIdx.x; v < V; v += kCEThreads) gr[v] = DType<T>::from_float(0.f);
      }
      continue;
    }
    const T* x = logits + row * logits_rs;
    const float scale = grad_loss[row * grad_loss_s] * w;
    const int64_t t = targets[row * targets_s];
    // A target outside [0, V) has no gradient: the row becomes NaN like its loss (CPU twin).
    const float row_lse = (t >= 0 && t < V) ? lse_in[row * lse_s] : NAN;

    if (kVec) {
      const int64_t nvec = V / kN;
      for (int64_t base = threadIdx.x; base < nvec; base += kCEThreads * kCEUnroll) {
        float buf[kCEUnroll][kN];
#pragma unroll
        for (int u = 0; u < kCEUnroll; ++u) {
          const int64_t vi = base + static_cast<int64_t>(u) * kCEThreads;
          if (vi < nvec) load_vec<T>(x + vi * kN, buf[u]);
        }
#pragma unroll
        for (int u = 0; u < kCEUnroll; ++u) {
          const int64_t vi = base + static_cast<int64_t>(u) * kCEThreads;
          if (vi < nvec) {
            float g[kN];
#pragma unroll
            for (int i = 0; i < kN; ++i) {
              const float onehot = (vi * kN + i == t) ? 1.f : 0.f;
              g[i] = scale * (__expf(buf[u][i] - row_lse) - onehot);
            }
            store_vec<T>(gr + vi * kN, g);
          }
        }
      }
    } else {
      for (int64_t v = threadIdx.x; v < V; v += kCEThreads) {
        const float onehot = (v == t) ? 1.f : 0.f;
        const float xv = DType<T>::to_float(x[v]);
        gr[v] = DType<T>::from_float(scale * (__expf(xv - row_lse) - onehot));
      }
    }
  }
}

inline unsigned grid_for_rows(int64_t N) {
  return static_cast<unsigned>(N < kMaxGridX ? N : kMaxGridX);
}

template <typename T>
llada_status launch_fwd(const CEParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  const dim3 grid(grid_for_rows(p.N));
  cudaStream_t s = as_stream(p.stream);
  // One kernel per layout: 16-byte vectors when every row allows them.
  auto kernel = rows_vectorizable<T>(p.logits, p.logits_rs, p.V) ? masked_ce_fwd_kernel<T, true>
                                                                 : masked_ce_fwd_kernel<T, false>;
  launch_kernel("masked_ce_fwd_kernel", kernel, grid, kCEThreads, 0, s, logits, p.logits_rs,
                p.targets, p.targets_s, p.weights, p.weights_s, p.loss, p.loss_s, p.lse, p.lse_s,
                p.N, p.V);
  return check_launch("masked_ce_fwd");
}

template <typename T>
llada_status launch_bwd(const CEParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad_logits);
  const dim3 grid(grid_for_rows(p.N));
  cudaStream_t s = as_stream(p.stream);
  auto kernel = rows_vectorizable<T>(p.logits, p.logits_rs, p.V) &&
                        rows_vectorizable<T>(p.grad_logits, p.grad_logits_rs, p.V)
                    ? masked_ce_bwd_kernel<T, true>
                    : masked_ce_bwd_kernel<T, false>;
  launch_kernel("masked_ce_bwd_kernel", kernel, grid, kCEThreads, 0, s, logits, p.logits_rs,
                p.targets, p.targets_s, p.weights, p.weights_s, p.lse, p.lse_s, p.grad_loss,
                p.grad_loss_s, grad, p.grad_logits_rs, p.N, p.V);
  return check_launch("masked_ce_bwd");
}

}  // namespace

llada_status masked_ce_fwd(const CEParams& p) {
  if (p.N == 0) return LLADA_OK;
  if (p.V <= 0) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "masked_ce_fwd: V must be > 0");
  switch (p.dtype) {
    case LLADA_FLOAT32: return launch_fwd<float>(p);
    case LLADA_BFLOAT16: return launch_fwd<__nv_bfloat16>(p);
    case LLADA_FLOAT16: return launch_fwd<__half>(p);
    default:
      return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE,
                       "masked_ce_fwd (CUDA): logits dtype %d unsupported; expected float32, "
                       "bfloat16 or float16",
                       static_cast<int>(p.dtype));
  }
}

llada_status masked_ce_bwd(const CEParams& p) {
  if (p.N == 0) return LLADA_OK;
  if (p.V <= 0) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "masked_ce_bwd: V must be > 0");
  if (p.lse == nullptr || p.grad_loss == nullptr || p.grad_logits == nullptr) {
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "masked_ce_bwd: lse, grad_loss and grad_logits are required");
  }
  switch (p.dtype) {
    case LLADA_FLOAT32: return launch_bwd<float>(p);
    case LLADA_BFLOAT16: return launch_bwd<__nv_bfloat16>(p);
    case LLADA_FLOAT16: return launch_bwd<__half>(p);
    default:
      return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE,
                       "masked_ce_bwd (CUDA): logits dtype %d unsupported; expected float32, "
                       "bfloat16 or float16",
                       static_cast<int>(p.dtype));
  }
}

}  // namespace cuda
}  // namespace llada
