// CUDA confidence remasking: one sampling step of a masked diffusion language model.
//
// Kernel 1 (remask_rows_kernel), one CTA per window position (b, j) and vocabulary slice:
//   non-candidates (x[b, offset+j] != mask_id) write x0 = x, confidence = -inf and leave;
//   candidates stream their slice of the vocabulary row once with 16-byte loads (the CFG
//   combine l = u + (s+1)(c-u) fused into the load), folding every value into a per-thread
//   row state (running max / sum of exp / entropy term, argmax, second best, Gumbel-argmax),
//   then a block reduction merges the states. With one slice per row, thread 0 writes x0 and
//   the confidence; with several (few rows: B * W below kSplitTargetCtas), it writes the
//   slice's state to the workspace and
// Kernel 1b (remask_merge_kernel), one thread per row, merges the slices in order (exactly
//   for x0; in a fixed order for the sums) and writes x0 and the confidence.
// The slice count is a function of (B * W, V) only, so it is the same on every device and
// every call of a shape (workspace from llada_remask_workspace_size, CUDA-graph friendly).
// Kernel 2 (remask_select_kernel), one CTA per sequence b:
//   copies x to x_out when they are different buffers, then ranks every candidate by
//   (confidence desc, position asc) with a block-wide count in shared memory and writes x0
//   into x_out for the min(k_b, #candidates) best, plus, with a threshold, every candidate
//   whose confidence exceeds it.
//
// Both kernels run on the caller's stream, need no workspace and never synchronise the host,
// so a whole sampling step can be captured in a CUDA graph.
//
// Bitwise agreement with the CPU twin (csrc/cpu/remask.cpp): the CFG combine, the prediction
// key (l at temperature 0, l / T + Gumbel in double otherwise), its tie rule and the final
// merge and confidence formulas all come from csrc/common/remask_row.h, shared by both
// devices; the combine uses explicitly rounded intrinsics on the device so that nvcc cannot
// contract it into an FMA (the CPU is built with -ffp-contract=off). Tokens that provably
// cannot win the Gumbel-argmax skip their random draw on both devices (differently, but
// exactly). Only the softmax sums are accumulated in another order (and with __expf, see
// remask_acc.cuh), so confidences may differ from the CPU in the last bits; x0 does not.
#include <math.h>

#include "common/params.h"
#include "common/philox.h"
#include "common/remask_row.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/remask_acc.cuh"

namespace llada {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kRowUnroll = 4;  // 16-byte loads in flight per thread and trip
constexpr int kSelectThreads = 512;
constexpr int kMergeThreads = 128;
// Split rows over slices until about this many CTAs run (a fixed number, not the device's SM
// count, so the split and the confidences' summation order never depend on the device), with
// at least kSplitMinElems logits per slice.
constexpr int64_t kSplitTargetCtas = 256;
constexpr int64_t kSplitMinElems = 8192;

int64_t remask_splits(int64_t rows, int64_t V) {
  if (rows <= 0 || rows >= kSplitTargetCtas) return 1;
  int64_t s = (kSplitTargetCtas + rows - 1) / rows;
  const int64_t by_len = V / kSplitMinElems;
  if (s > by_len) s = by_len;
  return s < 1 ? 1 : s;
}

// The half-open range [lo, hi) of slice `s` of `n` items cut into `splits` slices.
__device__ __forceinline__ void slice_range(int64_t n, int64_t splits, int64_t s, int64_t* lo,
                                            int64_t* hi) {
  const int64_t per = (n + splits - 1) / splits;
  *lo = s * per < n ? s * per : n;
  *hi = *lo + per < n ? *lo + per : n;
}

struct MergeRow {
  __device__ __forceinline__ void operator()(RemaskRowState& a, const RemaskRowState& b) const {
    a.merge(b);
  }
};

// Writes x0 and the confidence of window position (b, j) from its finished row state.
__device__ __forceinline__ void remask_write(const RemaskParams& p, int64_t b, int64_t j,
                                             const RemaskRowState& st) {
  const double ru =
      p.p.strategy == LLADA_REMASK_RANDOM ? remask_random_uniform(p.p.seed, b, j, p.W) : 0.0;
  p.x0[b * p.x0_sb + j * p.x0_sw] = remask_prediction(st);
  p.conf[b * p.conf_sb + j * p.conf_sw] = remask_confidence(st, p.p.strategy, ru);
}

// Non-candidate (b, j): x0 = x, confidence -inf; returns false. Candidates return true.
__device__ __forceinline__ bool remask_candidate(const RemaskParams& p, int64_t b, int64_t j,
                                                 bool write) {
  const int64_t xv = p.x[b * p.x_sb + (p.p.offset + j) * p.x_sl];
  if (xv == p.p.mask_id) return true;
  if (write) {
    p.x0[b * p.x0_sb + j * p.x0_sw] = xv;
    p.conf[b * p.conf_sb + j * p.conf_sw] = -INFINITY;
  }
  return false;
}

template <typename T, bool kVec, bool kCFG, bool kGumbel>
__global__ void __launch_bounds__(kRowThreads) remask_rows_kernel(RemaskParams p, int64_t splits) {
  LLADA_SHARED_ARRAY(RemaskRowState, smem, kRowThreads / kWarpSize + 1);
  constexpr int kN = DType<T>::kVec;
  const T* logits = static_cast<const T*>(p.logits);
  const T* uncond = static_cast<const T*>(p.uncond);
  const int64_t V = p.V;
  const float cfg = p.p.cfg_scale;
  const float temp = p.p.temperature;
  const float inv_t = kGumbel ? 1.f / temp : 0.f;
  const uint64_t seed = p.p.seed;
  RemaskRowState* parts = static_cast<RemaskRowState*>(p.workspace);

  for (int64_t unit = blockIdx.x; unit < p.B * p.W * splits; unit += gridDim.x) {
    const int64_t row = unit / splits;
    const int64_t slice = unit - row * splits;
    const int64_t b = row / p.W;
    const int64_t j = row - b * p.W;
    // uniform across the CTA; with slices, the merge kernel writes non-candidates
    if (!remask_candidate(p, b, j, splits == 1 && threadIdx.x == 0)) continue;
    const T* c = logits + b * p.logits_sb + j * p.logits_sw;
    const T* u = kCFG ? uncond + b * p.uncond_sb + j * p.uncond_sw : nullptr;
    // Gumbel index of (b, j, v) is (b * W + j) * V + v.
    const uint64_t noise_base = static_cast<uint64_t>(row) * static_cast<uint64_t>(V);
    ThreadAcc<kGumbel> acc;
    acc.init();

    if (kVec) {
      int64_t vlo, nvec;  // this slice's vectors [vlo, nvec)
      slice_range(V / kN, splits, slice, &vlo, &nvec);
      for (int64_t base = vlo + threadIdx.x; base < nvec; base += kRowThreads * kRowUnroll) {
        float cb[kRowUnroll][kN];
        float ub[kCFG ? kRowUnroll : 1][kN];
        // All loads of this trip first, so several 16-byte requests are in flight.
#pragma unroll
        for (int r = 0; r < kRowUnroll; ++r) {
          const int64_t vi = base + static_cast<int64_t>(r) * kRowThreads;
          if (vi < nvec) {
            load_vec_ro<T>(c + vi * kN, cb[r]);
            if (kCFG) load_vec_ro<T>(u + vi * kN, ub[kCFG ? r : 0]);
          }
        }
#pragma unroll
        for (int r = 0; r < kRowUnroll; ++r) {
          const int64_t vi = base + static_cast<int64_t>(r) * kRowThreads;
          if (vi >= nvec) continue;
          float l[kN];
#pragma unroll
          for (int i = 0; i < kN; ++i)
            l[i] = kCFG ? remask_cfg_combine(cb[r][i], ub[kCFG ? r : 0][i], cfg) : cb[r][i];
          acc.template stats<kN>(l);
          const int64_t v0 = vi * kN;
#pragma unroll
          for (int i = 0; i < kN; ++i) acc.order(l[i], v0 + i);
          if (kGumbel) {
            // V % kN == 0 here, so noise_base + v0 is even and tokens (2i, 2i+1) share one
            // Philox counter: one call serves both, and none is made when neither token
            // can still win.
#pragma unroll
            for (int i = 0; i < kN; i += 2) {
              const bool w0 = !(l[i] < acc.skip_below);
              const bool w1 = !(l[i + 1] < acc.skip_below);
              if (!(w0 || w1)) continue;
              const uint64_t g0 = noise_base + static_cast<uint64_t>(v0 + i);
              const Philox4 rnd = philox_at(seed, g0);
              if (w0 && !acc.cannot_win(l[i], uniform_first_word(rnd, g0), inv_t))
                acc.offer_gumbel(l[i], v0 + i, uniform_half(rnd, g0), temp);
              if (w1 && !(l[i + 1] < acc.skip_below) &&
                  !acc.cannot_win(l[i + 1], uniform_first_word(rnd, g0 + 1), inv_t))
                acc.offer_gumbel(l[i + 1], v0 + i + 1, uniform_half(rnd, g0 + 1), temp);
            }
          }
        }
      }
    } else {
      int64_t vlo, vhi;
      slice_range(V, splits, slice, &vlo, &vhi);
      for (int64_t v = vlo + threadIdx.x; v < vhi; v += kRowThreads) {
        const float cv = DType<T>::to_float(__ldg(c + v));
        const float l = kCFG ? remask_cfg_combine(cv, DType<T>::to_float(__ldg(u + v)), cfg) : cv;
        const float one[1] = {l};
        acc.template stats<1>(one);
        acc.order(l, v);
        if (kGumbel && !(l < acc.skip_below)) {
          const uint64_t g = noise_base + static_cast<uint64_t>(v);
          const Philox4 rnd = philox_at(seed, g);
          if (!acc.cannot_win(l, uniform_first_word(rnd, g), inv_t))
            acc.offer_gumbel(l, v, uniform_half(rnd, g), temp);
        }
      }
    }

    const RemaskRowState st = block_reduce<kRowThreads>(acc.to_row_state(), smem, MergeRow{});
    if (threadIdx.x == 0) {
      if (splits == 1) {
        remask_write(p, b, j, st);
      } else {
        parts[unit] = st;
      }
    }
  }
}

// One thread per window position: merges its slices' states, in slice order, and writes x0
// and the confidence (non-candidates: x0 = x, confidence -inf).
__global__ void __launch_bounds__(kMergeThreads)
    remask_merge_kernel(RemaskParams p, int64_t splits) {
  const RemaskRowState* parts = static_cast<const RemaskRowState*>(p.workspace);
  const int64_t rows = p.B * p.W;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kMergeThreads) {
    const int64_t b = row / p.W;
    const int64_t j = row - b * p.W;
    if (!remask_candidate(p, b, j, true)) continue;
    RemaskRowState st = parts[row * splits];
    for (int64_t s = 1; s < splits; ++s) st.merge(parts[row * splits + s]);
    remask_write(p, b, j, st);
  }
}

// Orders confidences as unsigned integers: a > b as floats <=> key(a) > key(b). NaN ranks
// as -inf (last, ties by position), as the CPU twin's selection does.
__device__ __forceinline__ uint32_t orderable(float f) {
  if (f != f) f = -INFINITY;
  if (f == 0.f) f = 0.f;  // -0 and +0 compare equal as floats, so they must share a key
  const uint32_t bits = __float_as_uint(f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One CTA per sequence. Every candidate j gets a unique 64-bit key (confidence, then lower
// position first) and its rank is the number of keys above it; non-candidates get key 0,
// below every candidate's, so they never count. O(W^2 / threads) shared-memory broadcasts.
__global__ void __launch_bounds__(kSelectThreads) remask_select_kernel(RemaskParams p) {
  LLADA_DYNAMIC_SHARED(unsigned long long, keys);
  const int64_t W = p.W;
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const int64_t* x = p.x + b * p.x_sb;
    int64_t* xo = p.x_out + b * p.x_out_sb;
    if (xo != x) {
      for (int64_t l = threadIdx.x; l < p.L; l += kSelectThreads)
        xo[l * p.x_out_sl] = x[l * p.x_sl];
    }
    for (int64_t j = threadIdx.x; j < W; j += kSelectThreads) {
      const bool cand = x[(p.p.offset + j) * p.x_sl] == p.p.mask_id;
      const float c = p.conf[b * p.conf_sb + j * p.conf_sw];
      keys[j] = cand ? (static_cast<unsigned long long>(orderable(c)) << 32) |
                           static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(j))
                     : 0ull;
    }
    __syncthreads();  // keys complete; x fully read before any candidate slot is written
    const int64_t k = p.num_transfer[b * p.nt_s];
    for (int64_t j = threadIdx.x; j < W; j += kSelectThreads) {
      const unsigned long long kj = keys[j];
      if (kj == 0ull) continue;
      bool take = false;
      if (p.p.has_threshold) {
        const float c = p.conf[b * p.conf_sb + j * p.conf_sw];
        take = c > p.p.threshold;
      }
      if (!take && k > 0) {
        int64_t rank = 0;
        for (int64_t i = 0; i < W && rank < k; ++i) rank += keys[i] > kj;
        take = rank < k;
      }
      if (take) xo[(p.p.offset + j) * p.x_out_sl] = p.x0[b * p.x0_sb + j * p.x0_sw];
    }
    __syncthreads();  // keys are rewritten for the next row of this CTA
  }
}

template <typename T, bool kVec, bool kCFG>
void launch_rows_gumbel(const RemaskParams& p, int64_t splits, dim3 grid, cudaStream_t s) {
  if (p.p.temperature > 0.f) {
    launch_kernel("remask_rows_kernel", remask_rows_kernel<T, kVec, kCFG, true>, grid, kRowThreads,
                  0, s, p, splits);
  } else {
    launch_kernel("remask_rows_kernel", remask_rows_kernel<T, kVec, kCFG, false>, grid, kRowThreads,
                  0, s, p, splits);
  }
}

template <typename T>
llada_status launch_rows(const RemaskParams& p) {
  const int64_t rows = p.B * p.W;
  const int64_t splits = remask_splits(rows, p.V);
  const int64_t units = rows * splits;
  const dim3 grid(static_cast<unsigned>(units < kMaxGridX ? units : kMaxGridX));
  cudaStream_t s = as_stream(p.stream);
  const bool vec =
      rows_vectorizable<T>(p.logits, p.logits_sw, p.V) && (p.logits_sb % DType<T>::kVec == 0) &&
      (p.uncond == nullptr ||
       (rows_vectorizable<T>(p.uncond, p.uncond_sw, p.V) && p.uncond_sb % DType<T>::kVec == 0));
  if (p.uncond != nullptr) {
    if (vec) {
      launch_rows_gumbel<T, true, true>(p, splits, grid, s);
    } else {
      launch_rows_gumbel<T, false, true>(p, splits, grid, s);
    }
  } else {
    if (vec) {
      launch_rows_gumbel<T, true, false>(p, splits, grid, s);
    } else {
      launch_rows_gumbel<T, false, false>(p, splits, grid, s);
    }
  }
  if (splits > 1) {
    const int64_t blocks = (rows + kMergeThreads - 1) / kMergeThreads;
    launch_kernel("remask_merge_kernel", remask_merge_kernel,
                  dim3(static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX)),
                  kMergeThreads, 0, s, p, splits);
  }
  return check_launch("remask (row pass)");
}

}  // namespace

size_t remask_workspace_size(int64_t B, int64_t W, int64_t V) {
  const int64_t splits = remask_splits(B * W, V);
  return splits > 1 ? static_cast<size_t>(B * W * splits) * sizeof(RemaskRowState) : 0;
}

llada_status remask(const RemaskParams& p) {
  if (p.B == 0) return LLADA_OK;
  if (p.W > 0) {
    if (p.V <= 0) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "remask: V must be > 0");
    llada_status st;
    switch (p.dtype) {
      case LLADA_FLOAT32: st = launch_rows<float>(p); break;
      case LLADA_BFLOAT16: st = launch_rows<__nv_bfloat16>(p); break;
      case LLADA_FLOAT16: st = launch_rows<__half>(p); break;
      default:
        return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE,
                         "remask (CUDA): logits dtype %d unsupported; expected float32, "
                         "bfloat16 or float16",
                         static_cast<int>(p.dtype));
    }
    if (st != LLADA_OK) return st;
  }

  // Shared memory for the keys: 8 bytes per window position. Up to 48 KiB needs no opt-in;
  // beyond that ask for more (a function attribute, not a stream operation, so it is legal
  // during graph capture).
  const size_t smem = static_cast<size_t>(p.W > 0 ? p.W : 1) * sizeof(unsigned long long);
  if (smem > 48 * 1024) {
    int dev = 0, max_optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (smem > static_cast<size_t>(max_optin)) {
      return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                       "remask (CUDA): window W=%lld needs %zu bytes of shared memory for the "
                       "selection, the device allows %d",
                       static_cast<long long>(p.W), smem, max_optin);
    }
    const cudaError_t e = cudaFuncSetAttribute(
        remask_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) {
      return set_error(LLADA_ERROR_CUDA, "remask: cudaFuncSetAttribute: %s", cudaGetErrorString(e));
    }
  }
  const dim3 grid(static_cast<unsigned>(p.B < 65535 * 1024LL ? p.B : 65535 * 1024LL));
  launch_kernel("remask_select_kernel", remask_select_kernel, grid, kSelectThreads, smem,
                as_stream(p.stream), p);
  return check_launch("remask (selection)");
}

}  // namespace cuda
}  // namespace llada
