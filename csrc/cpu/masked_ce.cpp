// CPU masked cross-entropy with per-token weights, forward and backward.
//
//   loss_i = w_i * (logsumexp(l_i) - l_i[t_i])                      (forward)
//   dl_i   = g_i * w_i * (exp(l_i - lse_i) - onehot(t_i))           (backward)
//
// Only rows with w_i != 0 cost anything: the others are never read. Each active row is
// streamed once per direction in L1-sized chunks; inside a chunk the max, the sum of
// exponentials and the gradient are vector loops (AVX2 + FMA when the CPU has it, chosen at
// run time, else portable scalar code). Accumulation is float32, as the contract says.
// OpenMP runs over rows; when there are fewer active rows than threads the forward splits a
// row's vocabulary across threads and merges the partial (max, sum) states, and the backward
// always works on (row, vocabulary block) tiles.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/dtypes.h"
#include "common/online_softmax.h"
#include "common/params.h"
#include "cpu/simd.h"

namespace llada {
namespace cpu {
namespace {

// Elements per chunk: 8 KiB of float32, so a converted/combined chunk stays in L1 while
// the max and the exponential loops run over it.
constexpr int64_t kChunk = 2048;
// Vocabulary block of one backward tile (rows x blocks are scheduled dynamically).
constexpr int64_t kBwdBlock = 8192;

// ---- chunk primitives -------------------------------------------------------------------
// Every primitive works on float32 data of length n (<= kChunk). Two implementations with
// the same contract: Scalar (portable) and Avx2 (x86 with AVX2/FMA/F16C).

struct Scalar : ScalarLoads {
  // Largest element, ignoring NaN; -inf for an all -inf (or all NaN) chunk.
  static float max(const float* c, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) m = c[i] > m ? c[i] : m;
    return m;
  }
  // sum_i exp(c_i - m), m finite.
  static float sumexp(const float* c, int64_t n, float m) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += expf(c[i] - m);
    return s;
  }
  // out_i = coef * exp(c_i - shift); out may alias c.
  static void scaled_exp(float* out, const float* c, int64_t n, float shift, float coef) {
    for (int64_t i = 0; i < n; ++i) out[i] = coef * expf(c[i] - shift);
  }
  static void store_bf16(const float* src, uint16_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  }
  static void store_fp16(const float* src, uint16_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_fp16(src[i]);
  }
};

#if LLADA_CPU_X86
struct Avx2 : Avx2Loads {
  LLADA_AVX2_FN static float max(const float* c, int64_t n) {
    // NaN is ignored (max8_lanes), as in Scalar::max.
    int64_t i;
    float m = hmax8(max8_lanes(c, n, &i));
    for (; i < n; ++i) m = c[i] > m ? c[i] : m;
    return m;
  }
  LLADA_AVX2_FN static float sumexp(const float* c, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      s0 = _mm256_add_ps(s0, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(c + i), mv)));
      s1 = _mm256_add_ps(s1, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(c + i + 8), mv)));
    }
    for (; i + 8 <= n; i += 8)
      s0 = _mm256_add_ps(s0, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(c + i), mv)));
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; ++i) s += expf(c[i] - m);
    return s;
  }
  LLADA_AVX2_FN static void scaled_exp(float* out, const float* c, int64_t n, float shift,
                                       float coef) {
    const __m256 sv = _mm256_set1_ps(shift), cv = _mm256_set1_ps(coef);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_mul_ps(cv, exp8(_mm256_sub_ps(_mm256_loadu_ps(c + i), sv))));
    for (; i < n; ++i) out[i] = coef * expf(c[i] - shift);
  }
  LLADA_AVX2_FN static void store_bf16(const float* src, uint16_t* dst, int64_t n) {
    // Round to nearest even; NaN -> quiet NaN (the scalar float_to_bf16 rule).
    int64_t i = 0;
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + i));
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
      const __m256i r = _mm256_blendv_epi8(rounded, nan, is_nan);
      // Narrow 8 x u32 (all < 2^16) to 8 x u16; packus works per 128-bit lane.
      const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi32(lo, hi));
    }
    for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  }
  LLADA_AVX2_FN static void store_fp16(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = float_to_fp16(src[i]);
  }
};
#endif  // LLADA_CPU_X86

// ---- storage access ---------------------------------------------------------------------
// Chunks of a row as float32: load_chunk (cpu/simd.h).

float load_one(const void* row, llada_dtype dt, int64_t v) {
  switch (dt) {
    case LLADA_FLOAT32: return static_cast<const float*>(row)[v];
    case LLADA_BFLOAT16: return bf16_to_float(static_cast<const uint16_t*>(row)[v]);
    default: return fp16_to_float(static_cast<const uint16_t*>(row)[v]);
  }
}

const void* row_ptr(const void* base, llada_dtype dt, int64_t i, int64_t rs) {
  return static_cast<const char*>(base) + i * rs * static_cast<int64_t>(elem_size(dt));
}
void* row_ptr(void* base, llada_dtype dt, int64_t i, int64_t rs) {
  return static_cast<char*>(base) + i * rs * static_cast<int64_t>(elem_size(dt));
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// (max, sum of exp) of l[v0, v1) of one row.
template <class Ops>
OnlineSoftmax row_lse_state(const void* row, llada_dtype dt, int64_t v0, int64_t v1) {
  float buf[kChunk];
  OnlineSoftmax st = OnlineSoftmax::empty();
  bool nan_seen = false;
  for (int64_t c0 = v0; c0 < v1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, v1 - c0);
    const float* c = load_chunk<Ops>(row, dt, c0, n, buf);
    const float cm = Ops::max(c, n);
    if (cm == -INFINITY) {
      // Nothing finite here (max ignores NaN); a NaN among -inf must still poison the row.
      for (int64_t i = 0; i < n; ++i) nan_seen |= c[i] != c[i];
      continue;
    }
    // Sum relative to the chunk's own max (a NaN makes it NaN), then merge: one extra
    // expf per chunk instead of a rescale per element.
    st.merge(OnlineSoftmax{cm, Ops::sumexp(c, n, cm)});
  }
  if (nan_seen) st.s = NAN;
  return st;
}

float finish_loss(const CEParams& p, int64_t i, const void* row, float lse, float w) {
  const int64_t t = p.targets[i * p.targets_s];
  if (t < 0 || t >= p.V) return NAN;
  return w * (lse - load_one(row, p.dtype, t));
}

template <class Ops>
void ce_fwd(const CEParams& p) {
  const int64_t N = p.N, V = p.V;
  const int nthreads = max_threads();
  int64_t n_active = 0;
  for (int64_t i = 0; i < N; ++i) n_active += p.weights[i * p.weights_s] != 0.f;

  // Few active rows and a long vocabulary: split every row across the threads.
  constexpr int kMaxSplit = 256;
  const bool split =
      nthreads > 1 && n_active < 2 * static_cast<int64_t>(nthreads) && V >= 4 * kChunk;
  if (!split) {
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < N; ++i) {
      const float w = p.weights[i * p.weights_s];
      float loss = 0.f, lse = 0.f;
      if (w != 0.f) {
        const void* row = row_ptr(p.logits, p.dtype, i, p.logits_rs);
        lse = row_lse_state<Ops>(row, p.dtype, 0, V).lse();
        loss = finish_loss(p, i, row, lse, w);
      }
      p.loss[i * p.loss_s] = loss;
      if (p.lse) p.lse[i * p.lse_s] = lse;
    }
    return;
  }

  OnlineSoftmax part[kMaxSplit];
  const int nt_use = std::min(nthreads, kMaxSplit);
#pragma omp parallel num_threads(nt_use)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int tid = 0, nt = 1;
#endif
    const int64_t v0 = V * tid / nt, v1 = V * (tid + 1) / nt;
    for (int64_t i = 0; i < N; ++i) {
      const float w = p.weights[i * p.weights_s];
      if (w == 0.f) {
#pragma omp single nowait
        {
          p.loss[i * p.loss_s] = 0.f;
          if (p.lse) p.lse[i * p.lse_s] = 0.f;
        }
        continue;
      }
      const void* row = row_ptr(p.logits, p.dtype, i, p.logits_rs);
      part[tid] = row_lse_state<Ops>(row, p.dtype, v0, v1);
#pragma omp barrier
#pragma omp single
      {
        OnlineSoftmax st = OnlineSoftmax::empty();
        bool nan_seen = false;
        for (int k = 0; k < nt; ++k) {
          nan_seen |= part[k].s != part[k].s;
          st.merge(part[k]);
        }
        const float lse = nan_seen ? NAN : st.lse();
        p.loss[i * p.loss_s] = finish_loss(p, i, row, lse, w);
        if (p.lse) p.lse[i * p.lse_s] = lse;
      }  // implicit barrier: part[] is free again
    }
  }
}

// One backward tile: row i, vocabulary [v0, v1).
template <class Ops>
void ce_bwd_tile(const CEParams& p, float lse_override, bool have_lse, int64_t i, int64_t v0,
                 int64_t v1) {
  const llada_dtype dt = p.dtype;
  void* grow = row_ptr(p.grad_logits, dt, i, p.grad_logits_rs);
  const float w = p.weights[i * p.weights_s];
  const int64_t n_all = v1 - v0;
  if (w == 0.f) {
    // Zeros; the logits of this row are never read (also not when the buffer is shared).
    memset(static_cast<char*>(grow) + static_cast<size_t>(v0) * elem_size(dt), 0,
           static_cast<size_t>(n_all) * elem_size(dt));
    return;
  }
  const void* row = row_ptr(p.logits, dt, i, p.logits_rs);
  const int64_t t = p.targets[i * p.targets_s];
  const float coef = p.grad_loss[i * p.grad_loss_s] * w;
  float lse = have_lse ? p.lse[i * p.lse_s] : lse_override;
  // An invalid target has no gradient; mark the row NaN like its loss.
  const bool bad_target = t < 0 || t >= p.V;
  if (bad_target) lse = NAN;
  float buf[kChunk];
  for (int64_t c0 = v0; c0 < v1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, v1 - c0);
    if (dt == LLADA_FLOAT32) {
      // In place is safe: each element is read before it is written.
      float* g = static_cast<float*>(grow) + c0;
      Ops::scaled_exp(g, static_cast<const float*>(row) + c0, n, lse, coef);
      if (t >= c0 && t < c0 + n) g[t - c0] -= coef;
      continue;
    }
    const float* c = load_chunk<Ops>(row, dt, c0, n, buf);  // whole chunk read first
    Ops::scaled_exp(buf, c, n, lse, coef);
    if (t >= c0 && t < c0 + n) buf[t - c0] -= coef;
    uint16_t* g = static_cast<uint16_t*>(grow) + c0;
    if (dt == LLADA_BFLOAT16)
      Ops::store_bf16(buf, g, n);
    else
      Ops::store_fp16(buf, g, n);
  }
}

template <class Ops>
void ce_bwd(const CEParams& p) {
  const int64_t N = p.N, V = p.V;
  const int64_t nblk = (V + kBwdBlock - 1) / kBwdBlock;
  const bool have_lse = p.lse != nullptr;
#pragma omp parallel for schedule(dynamic, 2)
  for (int64_t task = 0; task < N * nblk; ++task) {
    const int64_t i = task / nblk, b = task % nblk;
    float lse = 0.f;
    if (!have_lse && p.weights[i * p.weights_s] != 0.f) {
      // No saved lse: recompute it (each tile of the row repeats this; a fallback only).
      lse = row_lse_state<Ops>(row_ptr(p.logits, p.dtype, i, p.logits_rs), p.dtype, 0, V).lse();
    }
    ce_bwd_tile<Ops>(p, lse, have_lse, i, b * kBwdBlock, std::min(V, (b + 1) * kBwdBlock));
  }
}

llada_status check_dtype(const CEParams& p) {
  if (p.dtype != LLADA_FLOAT32 && p.dtype != LLADA_BFLOAT16 && p.dtype != LLADA_FLOAT16)
    return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE,
                     "masked cross-entropy (CPU): logits must be float32, bfloat16 or float16");
  if (p.V <= 0)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "logits: vocabulary size must be > 0");
  return LLADA_OK;
}

}  // namespace

llada_status masked_ce_fwd(const CEParams& p) {
  if (llada_status s = check_dtype(p); s != LLADA_OK) return s;
  if (p.N <= 0) return LLADA_OK;
#if LLADA_CPU_X86
  if (cpu_has_avx2()) {
    ce_fwd<Avx2>(p);
    return LLADA_OK;
  }
#endif
  ce_fwd<Scalar>(p);
  return LLADA_OK;
}

llada_status masked_ce_bwd(const CEParams& p) {
  if (llada_status s = check_dtype(p); s != LLADA_OK) return s;
  if (p.N <= 0) return LLADA_OK;
#if LLADA_CPU_X86
  if (cpu_has_avx2()) {
    ce_bwd<Avx2>(p);
    return LLADA_OK;
  }
#endif
  ce_bwd<Scalar>(p);
  return LLADA_OK;
}

}  // namespace cpu
}  // namespace llada
