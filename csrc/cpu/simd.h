// Vector helpers shared by the CPU kernels (masked cross-entropy, remasking, attention).
//
// The library is built for baseline x86-64, so the AVX2 code paths are compiled per function
// with a target attribute and chosen at run time (cpu_has_avx2). The helpers here are
// header-only; each kernel keeps its own chunk primitives and only the pieces that are the
// same operation for operation live here, so moving code here never changes a result.
//
// Storage: a row of logits is float32, bfloat16 or float16; load_chunk gives a chunk of it
// as float32 (float32 rows in place, 16-bit rows converted into a buffer).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "common/dtypes.h"
#include "llada/llada.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define LLADA_CPU_X86 1
#include <immintrin.h>
// Kernels that convert 16-bit floats with F16C as well as AVX2 + FMA (cpu_has_avx2).
#define LLADA_AVX2_FN __attribute__((target("avx2,fma,f16c")))
// AVX2 + FMA only (the attention rows, which need no F16C); also inlines into LLADA_AVX2_FN code.
#define LLADA_AVX2_FMA_FN __attribute__((target("avx2,fma")))
#else
#define LLADA_CPU_X86 0
#endif

namespace llada {
namespace cpu {

// Bytes per element of a logits row.
inline size_t elem_size(llada_dtype dt) {
  return dt == LLADA_FLOAT32 ? 4 : 2;
}

// 16-bit -> float32 conversion of n elements, portable.
struct ScalarLoads {
  static void load_bf16(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
  static void load_fp16(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(src[i]);
  }
};

// Chunk [v0, v0 + n) of a row as float32: float32 rows are used in place, 16-bit rows are
// converted into `buf` with Ops::load_bf16 / Ops::load_fp16.
template <class Ops>
const float* load_chunk(const void* row, llada_dtype dt, int64_t v0, int64_t n, float* buf) {
  switch (dt) {
    case LLADA_FLOAT32: return static_cast<const float*>(row) + v0;
    case LLADA_BFLOAT16: Ops::load_bf16(static_cast<const uint16_t*>(row) + v0, buf, n); return buf;
    default:  // LLADA_FLOAT16
      Ops::load_fp16(static_cast<const uint16_t*>(row) + v0, buf, n);
      return buf;
  }
}

#if LLADA_CPU_X86

// e^xc for 8 floats already clamped to [ln(FLT_MIN), 88] (or NaN): Cody-Waite range
// reduction xc = n*ln2 + r (ln2 split in two so n*ln2 is exact) + Cephes degree-6 polynomial
// on r (about 1 ulp), times 2^n built in the exponent bits. The common core of exp8 and
// exp8_nonpos, which differ only in how they clamp.
LLADA_AVX2_FN inline __m256 exp8_clamped(__m256 xc) {
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  xc = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  xc = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), xc);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(xc, xc), _mm256_add_ps(xc, _mm256_set1_ps(1.f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// exp for 8 floats (about 1 ulp). Inputs below ln(FLT_MIN) give exactly 0 (so -inf logits
// give 0), NaN stays NaN.
LLADA_AVX2_FN inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447504f);
  const __m256 hi = _mm256_set1_ps(88.0f);
  // max/min return their second operand when one is NaN: keep x second so NaN survives.
  const __m256 y = exp8_clamped(_mm256_min_ps(hi, _mm256_max_ps(lo, x)));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}

// exp for 8 floats known to be <= 0 (or -inf / NaN), whose results are only summed into
// a total >= 1: exp8 without the overflow clamp and the exact-zero underflow select (an
// input below ln(FLT_MIN) gives ~1e-38 instead of 0, invisible in such a sum).
LLADA_AVX2_FN inline __m256 exp8_nonpos(__m256 x) {
  return exp8_clamped(_mm256_max_ps(_mm256_set1_ps(-87.3365447504f), x));  // NaN survives
}

// Horizontal max of 8 lanes by halving shuffles (upper half onto lower, then pairs, then
// the last two). With +0 / -0 ties the lane kept depends on this order.
LLADA_AVX2_FMA_FN inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Horizontal sum of 8 lanes in the same halving order (the rounding depends on it).
LLADA_AVX2_FMA_FN inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Per-lane max over c[0, *end), where *end is n rounded down to a multiple of 8 (two
// accumulators, 16 elements a step). max(x, acc) returns acc when x is NaN, so NaN is
// ignored and the lanes are never NaN; all -inf if nothing is covered. The caller reduces the
// lanes and handles the tail c[*end, n).
LLADA_AVX2_FN inline __m256 max8_lanes(const float* c, int64_t n, int64_t* end) {
  __m256 a0 = _mm256_set1_ps(-INFINITY), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_max_ps(_mm256_loadu_ps(c + i), a0);
    a1 = _mm256_max_ps(_mm256_loadu_ps(c + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_max_ps(_mm256_loadu_ps(c + i), a0);
  *end = i;
  return _mm256_max_ps(a0, a1);
}

// 16-bit -> float32 conversion of n elements, 8 at a time (AVX2 + F16C).
struct Avx2Loads {
  LLADA_AVX2_FN static void load_bf16(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i w =
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
  LLADA_AVX2_FN static void load_fp16(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
  }
};

// Whether LLADA_AVX2_FN code may run here (AVX2, FMA and F16C), checked once.
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

#endif  // LLADA_CPU_X86

}  // namespace cpu
}  // namespace llada
