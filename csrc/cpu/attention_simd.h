// Vectorised row kernels of the CPU attention softmax (the part between the tile products).
//
// Compilers do not reliably vectorise an exp written in plain C (the range clamps turn into
// branches), and the library is built for baseline x86-64, so the rows are written with
// intrinsics: an AVX2+FMA version chosen at run time when the CPU has it, an SSE2 version
// (always present on x86-64), and a scalar version for other architectures. All three use the
// same exp: Cody-Waite reduction x = n*ln2 + r with |r| <= ln2/2 (ln2 split in two so n*ln2
// is exact), the cephes expf polynomial on r (about 2 ulp), and 2^n built in the exponent
// bits. Arguments below -87 (e^-87 ~ 1.6e-38, the float32 normal limit) give exactly 0, so
// -inf (a padded key, an empty row) needs no special case; the softmax only ever takes exp of
// x - max <= 0, so the upper clamp at 88 is never active.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "cpu/simd.h"

#if defined(__x86_64__) || defined(_M_X64)
#define LLADA_ATTN_X86 1
#include <immintrin.h>
#endif

namespace llada {
namespace cpu {
namespace attn_simd {

constexpr float kExpLo = -87.f;
constexpr float kExpHi = 88.f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;

inline float exp_scalar(float x) {
  if (!(x >= kExpLo)) return 0.f;
  const float xc = x > kExpHi ? kExpHi : x;
  const float n = nearbyintf(xc * kLog2e);
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float y = kP0;
  y = y * r + kP1;
  y = y * r + kP2;
  y = y * r + kP3;
  y = y * r + kP4;
  y = y * r + kP5;
  y = y * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float pow2n;
  memcpy(&pow2n, &bits, sizeof(float));
  return y * pow2n;
}

// The three row operations the kernels need. `bias` (0 or -inf per key) may be null.
struct RowOps {
  // s[j] += bias[j]; returns max_j s[j] (-inf for n == 0).
  float (*bias_max)(float* s, const float* bias, int64_t n);
  // s[j] = exp(s[j] - m); returns sum_j s[j].
  float (*exp_sum)(float* s, int64_t n, float m);
  // p[j] = exp(p[j] + bias[j] - lse); ds[j] = p[j] * (ds[j] - di).
  void (*grad)(float* p, float* ds, const float* bias, int64_t n, float lse, float di);
};

// ---- scalar ------------------------------------------------------------------------------

inline float bias_max_scalar(float* s, const float* bias, int64_t n) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (bias) s[j] += bias[j];
    mx = std::max(mx, s[j]);
  }
  return mx;
}
inline float exp_sum_scalar(float* s, int64_t n, float m) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_scalar(s[j] - m);
    sum += s[j];
  }
  return sum;
}
inline void grad_scalar(float* p, float* ds, const float* bias, int64_t n, float lse, float di) {
  for (int64_t j = 0; j < n; ++j) {
    const float pj = exp_scalar(p[j] + (bias ? bias[j] : 0.f) - lse);
    p[j] = pj;
    ds[j] = pj * (ds[j] - di);
  }
}

#ifdef LLADA_ATTN_X86

// ---- SSE2 (baseline x86-64) --------------------------------------------------------------

inline __m128 exp_sse2(__m128 x) {
  const __m128 keep = _mm_cmpge_ps(x, _mm_set1_ps(kExpLo));  // false for -inf and NaN
  const __m128 xc = _mm_min_ps(_mm_max_ps(x, _mm_set1_ps(kExpLo)), _mm_set1_ps(kExpHi));
  // Round to nearest without SSE4.1: adding 1.5 * 2^23 pushes the fraction out.
  const __m128 magic = _mm_set1_ps(12582912.f);
  const __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(xc, _mm_set1_ps(kLog2e)), magic), magic);
  __m128 r = _mm_sub_ps(xc, _mm_mul_ps(n, _mm_set1_ps(kLn2Hi)));
  r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(kLn2Lo)));
  __m128 y = _mm_set1_ps(kP0);
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(kP1));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(kP2));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(kP3));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(kP4));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(kP5));
  y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(y, _mm_mul_ps(r, r)), r), _mm_set1_ps(1.f));
  const __m128i e = _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127)), 23);
  return _mm_and_ps(_mm_mul_ps(y, _mm_castsi128_ps(e)), keep);
}

inline float hmax_sse2(__m128 v) {
  v = _mm_max_ps(v, _mm_movehl_ps(v, v));
  v = _mm_max_ss(v, _mm_shuffle_ps(v, v, 1));
  return _mm_cvtss_f32(v);
}
inline float hsum_sse2(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
  return _mm_cvtss_f32(v);
}

inline float bias_max_sse2(float* s, const float* bias, int64_t n) {
  __m128 mx = _mm_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m128 v = _mm_loadu_ps(s + j);
    if (bias) {
      v = _mm_add_ps(v, _mm_loadu_ps(bias + j));
      _mm_storeu_ps(s + j, v);
    }
    mx = _mm_max_ps(mx, v);
  }
  return std::max(hmax_sse2(mx), bias_max_scalar(s + j, bias ? bias + j : nullptr, n - j));
}
inline float exp_sum_sse2(float* s, int64_t n, float m) {
  const __m128 mv = _mm_set1_ps(m);
  __m128 acc = _mm_setzero_ps();
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m128 e = exp_sse2(_mm_sub_ps(_mm_loadu_ps(s + j), mv));
    _mm_storeu_ps(s + j, e);
    acc = _mm_add_ps(acc, e);
  }
  return hsum_sse2(acc) + exp_sum_scalar(s + j, n - j, m);
}
inline void grad_sse2(float* p, float* ds, const float* bias, int64_t n, float lse, float di) {
  const __m128 lv = _mm_set1_ps(lse), dv = _mm_set1_ps(di);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m128 x = _mm_loadu_ps(p + j);
    if (bias) x = _mm_add_ps(x, _mm_loadu_ps(bias + j));
    const __m128 pj = exp_sse2(_mm_sub_ps(x, lv));
    _mm_storeu_ps(p + j, pj);
    _mm_storeu_ps(ds + j, _mm_mul_ps(pj, _mm_sub_ps(_mm_loadu_ps(ds + j), dv)));
  }
  grad_scalar(p + j, ds + j, bias ? bias + j : nullptr, n - j, lse, di);
}

// ---- AVX2 + FMA (chosen at run time) ---------------------------------------------------
// The 8-lane reductions are hmax8 / hsum8 (cpu/simd.h): the same halving order as
// hmax_sse2 / hsum_sse2 after folding the upper 128 bits onto the lower.

LLADA_AVX2_FMA_FN inline __m256 exp_avx2(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_GE_OQ);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kP0);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP5));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}

LLADA_AVX2_FMA_FN inline float bias_max_avx2(float* s, const float* bias, int64_t n) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(s + j);
    if (bias) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
      _mm256_storeu_ps(s + j, v);
    }
    mx = _mm256_max_ps(mx, v);
  }
  return std::max(hmax8(mx), bias_max_sse2(s + j, bias ? bias + j : nullptr, n - j));
}
LLADA_AVX2_FMA_FN inline float exp_sum_avx2(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum8(acc) + exp_sum_sse2(s + j, n - j, m);
}
LLADA_AVX2_FMA_FN inline void grad_avx2(float* p, float* ds, const float* bias, int64_t n,
                                        float lse, float di) {
  const __m256 lv = _mm256_set1_ps(lse), dv = _mm256_set1_ps(di);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 x = _mm256_loadu_ps(p + j);
    if (bias) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + j));
    const __m256 pj = exp_avx2(_mm256_sub_ps(x, lv));
    _mm256_storeu_ps(p + j, pj);
    _mm256_storeu_ps(ds + j, _mm256_mul_ps(pj, _mm256_sub_ps(_mm256_loadu_ps(ds + j), dv)));
  }
  grad_sse2(p + j, ds + j, bias ? bias + j : nullptr, n - j, lse, di);
}

inline RowOps pick_row_ops() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return RowOps{bias_max_avx2, exp_sum_avx2, grad_avx2};
  return RowOps{bias_max_sse2, exp_sum_sse2, grad_sse2};
}

#else  // not x86-64

inline RowOps pick_row_ops() {
  return RowOps{bias_max_scalar, exp_sum_scalar, grad_scalar};
}

#endif

// The best row kernels for this CPU, chosen once.
inline const RowOps& row_ops() {
  static const RowOps ops = pick_row_ops();
  return ops;
}

}  // namespace attn_simd
}  // namespace cpu
}  // namespace llada
