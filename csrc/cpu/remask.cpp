// CPU confidence remasking: one pass over each candidate's vocabulary row, then per-row
// top-k / threshold selection.
//
// Phase 1 (OpenMP over window positions): for every candidate (x[b, offset + j] == mask_id)
//   stream the row in L1-sized chunks (after the optional CFG combine), reduce each chunk
//   to a RemaskRowState with vector loops (max, second max, sum of exp, entropy sum) and
//   merge the chunk states; the argmax key is exact, so x0 matches the CUDA kernel, which
//   merges per-thread states of the same type (common/remask_row.h). With a temperature
//   the chunk's Philox counters are drawn eight at a time, and a float pre-test discards
//   the tokens whose key provably cannot beat the best so far before the exact double
//   key (two logs) is computed for the few that remain.
// Phase 2 (OpenMP over rows): rank each row's candidates by confidence (ties: lower
//   position first), select the top k (and, with a threshold, every candidate above it) and
//   write x_out.
// The phases are separate parallel regions, so x_out may be the very buffer x is read from.
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/dtypes.h"
#include "common/params.h"
#include "common/philox.h"
#include "common/remask_row.h"
#include "cpu/simd.h"

// The CFG combine must be rounded after every operation (see remask_cfg_combine); the build
// already passes -ffp-contract=off, this keeps it so whatever the flags.
#if defined(__GNUC__) && !defined(__clang__)
#define LLADA_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define LLADA_NO_CONTRACT
#endif

namespace llada {
namespace cpu {
namespace {

// Elements per chunk: a converted / combined chunk (8 KiB of float32) stays in L1 while the
// max and exponential loops run over it.
constexpr int64_t kChunk = 2048;

// ---- chunk primitives on float32 data of length n (<= kChunk) ----------------------------

struct Scalar : ScalarLoads {
  // Largest element ignoring NaN (-inf if none).
  static float max(const float* c, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) m = c[i] > m ? c[i] : m;
    return m;
  }
  // Largest and second-largest element (a repeated maximum counts twice).
  static void max_top2(const float* c, int64_t n, float* m1, float* m2) {
    float a = -INFINITY, b = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      const float x = c[i];
      if (x > a) {
        b = a;
        a = x;
      } else if (x > b) {
        b = x;
      }
    }
    *m1 = a;
    *m2 = b;
  }
  // s = sum exp(c - m); with t != nullptr also t = sum exp(c - m) * (c - m). m finite.
  static void sums(const float* c, int64_t n, float m, float* s, float* t) {
    float as = 0.f, at = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float d = std::max(c[i] - m, -200.f);  // -inf -> a finite d with exp(d) == 0
      const float e = expf(d);
      as += e;
      at += e * d;
    }
    *s = as;
    if (t) *t = at;
  }
  LLADA_NO_CONTRACT static void combine(float* out, const float* c, const float* u, int64_t n,
                                        float cfg) {
    for (int64_t i = 0; i < n; ++i) out[i] = remask_cfg_combine(c[i], u[i], cfg);
  }
  static void philox_block(uint64_t ctr0, int64_t count, uint64_t seed, uint32_t* out);
  static void gumbel_chunk(const float* c, int64_t n, int64_t v0, uint64_t gbase, float temperature,
                           const uint32_t* words, RemaskRowState* st);
};

#if LLADA_CPU_X86
struct Avx2 : Avx2Loads {
  LLADA_AVX2_FN static float max(const float* c, int64_t n) {
    // NaN is ignored (max8_lanes), as in Scalar::max. The lanes are reduced in lane order
    // through memory, not with hmax8: with +0 / -0 ties the two can keep different zeros.
    int64_t i;
    alignas(32) float lane[8];
    _mm256_store_ps(lane, max8_lanes(c, n, &i));
    float m = -INFINITY;
    for (int k = 0; k < 8; ++k) m = lane[k] > m ? lane[k] : m;
    for (; i < n; ++i) m = c[i] > m ? c[i] : m;
    return m;
  }
  LLADA_AVX2_FN static void max_top2(const float* c, int64_t n, float* m1, float* m2) {
    // Per lane: top2 = max(top2, min(top1, x)); top1 = max(top1, x). Then the second
    // largest of all lanes' (top1, top2) pairs.
    __m256 t1 = _mm256_set1_ps(-INFINITY), t2 = t1;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(c + i);
      t2 = _mm256_max_ps(_mm256_min_ps(x, t1), t2);
      t1 = _mm256_max_ps(x, t1);
    }
    alignas(32) float a[8], b[8];
    _mm256_store_ps(a, t1);
    _mm256_store_ps(b, t2);
    float top = -INFINITY, second = -INFINITY;
    auto push = [&](float x) {
      if (x > top) {
        second = top;
        top = x;
      } else if (x > second) {
        second = x;
      }
    };
    for (int k = 0; k < 8; ++k) {
      push(a[k]);
      push(b[k]);
    }
    for (; i < n; ++i) push(c[i]);
    *m1 = top;
    *m2 = second;
  }
  LLADA_AVX2_FN static void sums(const float* c, int64_t n, float m, float* s, float* t) {
    const __m256 mv = _mm256_set1_ps(m), floor_d = _mm256_set1_ps(-200.f);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    if (t == nullptr) {
      for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_ps(s0, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(c + i), mv)));
        s1 = _mm256_add_ps(s1, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(c + i + 8), mv)));
      }
      float as = hsum8(_mm256_add_ps(s0, s1));
      for (; i < n; ++i) as += expf(c[i] - m);
      *s = as;
      return;
    }
    __m256 t0 = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      // d >= -200 keeps e * d finite (0 * -inf would be NaN); NaN d stays NaN.
      const __m256 d = _mm256_max_ps(floor_d, _mm256_sub_ps(_mm256_loadu_ps(c + i), mv));
      const __m256 e = exp8(d);
      s0 = _mm256_add_ps(s0, e);
      t0 = _mm256_fmadd_ps(e, d, t0);
    }
    float as = hsum8(s0), at = hsum8(t0);
    for (; i < n; ++i) {
      const float d = std::max(c[i] - m, -200.f);
      const float e = expf(d);
      as += e;
      at += e * d;
    }
    *s = as;
    *t = at;
  }
  // No FMA here: each of sub, mul, add is rounded (LLADA_NO_CONTRACT keeps the compiler
  // from fusing the intrinsics).
  LLADA_AVX2_FN LLADA_NO_CONTRACT static void combine(float* out, const float* c, const float* u,
                                                      int64_t n, float cfg) {
    const __m256 w = _mm256_set1_ps(cfg + 1.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 uv = _mm256_loadu_ps(u + i);
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(c + i), uv);
      _mm256_storeu_ps(out + i, _mm256_add_ps(uv, _mm256_mul_ps(w, d)));
    }
    for (; i < n; ++i) out[i] = remask_cfg_combine(c[i], u[i], cfg);
  }
  static void philox_block(uint64_t ctr0, int64_t count, uint64_t seed, uint32_t* out);
  LLADA_AVX2_FN static void gumbel_chunk(const float* c, int64_t n, int64_t v0, uint64_t gbase,
                                         float temperature, const uint32_t* words,
                                         RemaskRowState* st);
};

#endif  // LLADA_CPU_X86

// Philox words of `count` consecutive counters ctr0, ctr0 + 1, ... of the Gumbel stream:
// out[4 * i + w] is word w of counter ctr0 + i (philox4x32_10 of common/philox.h).
void philox_block_scalar(uint64_t ctr0, int64_t count, uint64_t seed, uint32_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t ctr = ctr0 + static_cast<uint64_t>(i);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32),
                                    LLADA_STREAM_GUMBEL, 0u, static_cast<uint32_t>(seed),
                                    static_cast<uint32_t>(seed >> 32));
    for (int w = 0; w < 4; ++w) out[4 * i + w] = r.x[w];
  }
}

#if LLADA_CPU_X86
// 32 x 32 -> 64-bit products of 8 lanes with one multiplier: high and low words.
LLADA_AVX2_FN inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

// The same words, eight counters at a time (the same rounds, bit for bit).
LLADA_AVX2_FN void philox_block_avx2(uint64_t ctr0, int64_t count, uint64_t seed, uint32_t* out) {
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int k = 0; k < 8; ++k) {
      const uint64_t ctr = ctr0 + static_cast<uint64_t>(i + k);
      lo[k] = static_cast<uint32_t>(ctr);
      hi[k] = static_cast<uint32_t>(ctr >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(LLADA_STREAM_GUMBEL));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, &hi0, &lo0);
      mulhilo8(c2, m1, &hi1, &lo1);
      const __m256i n0 =
          _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 =
          _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    alignas(32) uint32_t w[4][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[0]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[1]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[2]), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[3]), c3);
    for (int k = 0; k < 8; ++k)
      for (int q = 0; q < 4; ++q) out[4 * (i + k) + q] = w[q][k];
  }
  philox_block_scalar(ctr0 + static_cast<uint64_t>(i), count - i, seed, out + 4 * i);
}
#endif

void Scalar::philox_block(uint64_t ctr0, int64_t count, uint64_t seed, uint32_t* out) {
  philox_block_scalar(ctr0, count, seed, out);
}
#if LLADA_CPU_X86
void Avx2::philox_block(uint64_t ctr0, int64_t count, uint64_t seed, uint32_t* out) {
  philox_block_avx2(ctr0, count, seed, out);
}
#endif

// Exact Gumbel step for token v (global uniform index g): offers it to st unless it
// provably cannot beat the best key so far (equal keys go to the earlier, lower id).
// `words` holds the Philox output of the counters from ctr0 on.
inline void gumbel_exact(float l, int64_t v, uint64_t g, float temperature, const uint32_t* words,
                         uint64_t ctr0, RemaskRowState* st) {
  // A -inf logit (probability 0) is never drawn, nor a NaN one; a row with no other
  // logit predicts 0, as at temperature 0 and on CUDA.
  if (!(l > -INFINITY)) return;
  const double lk = static_cast<double>(l) / static_cast<double>(temperature);
  double gap = 0.0;  // the Gumbel value needed to beat the best key
  if (st->idx >= 0) {
    gap = st->key - lk;
    if (!(gap < kRemaskGumbelMax)) return;  // G <= kRemaskGumbelMax always
  }
  // One counter yields the uniforms of indices 2c (words 0, 1) and 2c + 1 (words 2, 3).
  const uint32_t* r = words + 4 * ((g >> 1) - ctr0) + 2 * (g & 1);
  const double u = philox_to_unit_double(r[0], r[1]);
  if (st->idx >= 0 && gap > 0.0) {
    // Winning needs G > gap, i.e. log(u) > -exp(-gap). As log(u) <= u - 1, a u with
    // 1 - u >= exp(-gap) cannot win; the 1e-4 margin covers the float exp's error, and
    // skipped tokens then have G <= gap - 1e-4, far from any rounding tie. This avoids the
    // two double logs for almost every token.
    const float e = expf(-static_cast<float>(gap));
    if (1.0 - u >= static_cast<double>(e) * (1.0 + 1e-4)) return;
  }
  st->offer(remask_gumbel_key_from_uniform(l, temperature, u), l, v);
}

// Gumbel-argmax over chunk [v0, v0 + n) of a row, offered into st; `words` holds the
// Philox output of the chunk's counters, from the one of uniform index gbase + v0 on.
void Scalar::gumbel_chunk(const float* c, int64_t n, int64_t v0, uint64_t gbase, float temperature,
                          const uint32_t* words, RemaskRowState* st) {
  const uint64_t g0 = gbase + static_cast<uint64_t>(v0);
  for (int64_t i = 0; i < n; ++i)
    gumbel_exact(c[i], v0 + i, g0 + static_cast<uint64_t>(i), temperature, words, g0 >> 1, st);
}

#if LLADA_CPU_X86
// Same result; eight tokens at a time go through a float pre-test that only discards
// tokens which provably cannot win (a superset of what gumbel_exact keeps is kept):
//   gap_lo <= key - l / T: float rounding of l * (1/T), key and their difference is below
//     4e-7 * (|key| + |l / T|), subtracted (used while |key| < 1e6);
//   1 - u > LB = (2^24 - 1 - top 24 bits of u) * 2^-24, from u's first Philox word alone;
//   skip when gap_lo >= kRemaskGumbelMax, or when LB >= exp(-gap_lo) * (1 + 1e-4), which
//     implies 1 - u >= exp(-gap) with margin, as in gumbel_exact.
// The best key only grows, so testing a group against the key at its start is safe.
LLADA_AVX2_FN void Avx2::gumbel_chunk(const float* c, int64_t n, int64_t v0, uint64_t gbase,
                                      float temperature, const uint32_t* words,
                                      RemaskRowState* st) {
  const uint64_t g0 = gbase + static_cast<uint64_t>(v0), ctr0 = g0 >> 1;
  // The first word of token i's uniform is a[2 * i] (word index 4 * (g >> 1) + 2 * (g & 1)
  // = 2 * g relative to counter ctr0).
  const uint32_t* a = words + 2 * (g0 - 2 * ctr0);
  const __m256 inv_t = _mm256_set1_ps(1.f / temperature);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    int skip = 0;
    if (st->idx >= 0 && fabs(st->key) < 1e6) {
      const __m256 key = _mm256_set1_ps(static_cast<float>(st->key));
      const __m256 lk = _mm256_mul_ps(_mm256_loadu_ps(c + i), inv_t);
      const __m256 err =
          _mm256_mul_ps(_mm256_set1_ps(4e-7f),
                        _mm256_add_ps(_mm256_and_ps(key, abs_mask), _mm256_and_ps(lk, abs_mask)));
      const __m256 gap_lo = _mm256_sub_ps(_mm256_sub_ps(key, lk), err);
      const __m256i w0 = _mm256_permutevar8x32_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2 * i)), even);
      const __m256i w1 = _mm256_permutevar8x32_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2 * i + 8)), even);
      const __m256i first = _mm256_blend_epi32(w0, w1, 0xF0);
      const __m256i q =
          _mm256_sub_epi32(_mm256_set1_epi32((1 << 24) - 1), _mm256_srli_epi32(first, 8));
      const __m256 lb =
          _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(5.9604644775390625e-8f));
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gap_lo));
      const __m256 far =
          _mm256_cmp_ps(gap_lo, _mm256_set1_ps(static_cast<float>(kRemaskGumbelMax)), _CMP_GE_OQ);
      const __m256 loses = _mm256_cmp_ps(lb, _mm256_mul_ps(e, _mm256_set1_ps(1.0001f)), _CMP_GE_OQ);
      skip = _mm256_movemask_ps(_mm256_or_ps(far, loses));
    }
    if (skip == 0xFF) continue;
    for (int k = 0; k < 8; ++k)
      if (!((skip >> k) & 1))
        gumbel_exact(c[i + k], v0 + i + k, g0 + static_cast<uint64_t>(i + k), temperature, words,
                     ctr0, st);
  }
  for (; i < n; ++i)
    gumbel_exact(c[i], v0 + i, g0 + static_cast<uint64_t>(i), temperature, words, ctr0, st);
}
#endif

// The full row state of candidate (b, j).
template <class Ops>
RemaskRowState row_state(const RemaskParams& p, int64_t b, int64_t j) {
  const llada_dtype dt = p.dtype;
  const int64_t esz = static_cast<int64_t>(elem_size(dt));
  const void* lrow = static_cast<const char*>(p.logits) + (b * p.logits_sb + j * p.logits_sw) * esz;
  const void* urow =
      p.uncond ? static_cast<const char*>(p.uncond) + (b * p.uncond_sb + j * p.uncond_sw) * esz
               : nullptr;
  const int32_t strategy = p.p.strategy;
  const bool need_sums = strategy != LLADA_REMASK_RANDOM;
  const bool need_top2 = strategy == LLADA_REMASK_MARGIN;
  const bool need_t = strategy == LLADA_REMASK_ENTROPY;
  const bool gumbel = p.p.temperature > 0.f;
  const uint64_t gbase = static_cast<uint64_t>(b * p.W + j) * static_cast<uint64_t>(p.V);

  alignas(32) float buf[kChunk];
  alignas(32) float ubuf[kChunk];
  uint32_t words[4 * (kChunk / 2 + 1)];  // Philox output of one chunk's counters
  RemaskRowState st = RemaskRowState::empty();
  bool nan_seen = false;
  for (int64_t c0 = 0; c0 < p.V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p.V - c0);
    const float* c = load_chunk<Ops>(lrow, dt, c0, n, buf);
    if (urow) {
      const float* u = load_chunk<Ops>(urow, dt, c0, n, ubuf);
      Ops::combine(buf, c, u, n, p.p.cfg_scale);
      c = buf;
    }
    RemaskRowState cs = RemaskRowState::empty();
    if (need_top2)
      Ops::max_top2(c, n, &cs.m, &cs.top2);
    else
      cs.m = Ops::max(c, n);
    if (cs.m == -INFINITY) {
      // No finite logit in this chunk (max ignores NaN); remember a NaN for the stats.
      for (int64_t i = 0; i < n; ++i) nan_seen |= c[i] != c[i];
    } else if (need_sums) {
      Ops::sums(c, n, cs.m, &cs.s, need_t ? &cs.t : nullptr);
    } else {
      cs.s = 1.f;  // RANDOM needs no statistics; any state with a finite max will do
    }
    if (gumbel) {
      const uint64_t first = (gbase + static_cast<uint64_t>(c0)) >> 1;
      const uint64_t last = (gbase + static_cast<uint64_t>(c0 + n - 1)) >> 1;
      Ops::philox_block(first, static_cast<int64_t>(last - first + 1), p.p.seed, words);
      Ops::gumbel_chunk(c, n, c0, gbase, p.p.temperature, words, &st);
    } else if (cs.m > -INFINITY && (st.idx < 0 || static_cast<double>(cs.m) > st.key)) {
      // Plain argmax: the chunk's first maximal element, if it beats the earlier chunks.
      int64_t i = 0;
      while (c[i] != cs.m) ++i;
      cs.offer(static_cast<double>(cs.m), cs.m, c0 + i);
    }
    st.merge(cs);
  }
  if (nan_seen) st.s = NAN;
  return st;
}

template <class Ops>
void remask_impl(const RemaskParams& p) {
  const int64_t B = p.B, W = p.W;
  const int64_t mask_id = p.p.mask_id, off = p.p.offset;

  // Phase 1: predictions and confidences of every window position.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < B * W; ++task) {
    const int64_t b = task / W, j = task % W;
    const int64_t xv = p.x[b * p.x_sb + (off + j) * p.x_sl];
    int64_t* x0 = p.x0 + b * p.x0_sb + j * p.x0_sw;
    float* conf = p.conf + b * p.conf_sb + j * p.conf_sw;
    if (xv != mask_id) {
      *x0 = xv;
      *conf = -INFINITY;
      continue;
    }
    const RemaskRowState st = row_state<Ops>(p, b, j);
    const double u =
        p.p.strategy == LLADA_REMASK_RANDOM ? remask_random_uniform(p.p.seed, b, j, W) : 0.0;
    *x0 = remask_prediction(st);
    *conf = remask_confidence(st, p.p.strategy, u);
  }

  // Phase 2: per-row selection.
#pragma omp parallel
  {
    std::vector<int64_t> cand;
    std::vector<float> key;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      cand.clear();
      key.assign(static_cast<size_t>(W), 0.f);
      for (int64_t j = 0; j < W; ++j) {
        if (p.x[b * p.x_sb + (off + j) * p.x_sl] != mask_id) continue;
        const float c = p.conf[b * p.conf_sb + j * p.conf_sw];
        key[j] = c != c ? -INFINITY : c;  // NaN ranks last, and keeps the order strict
        cand.push_back(j);
      }
      const int64_t ncand = static_cast<int64_t>(cand.size());
      int64_t k = p.num_transfer[b * p.nt_s];
      k = std::max<int64_t>(0, std::min(k, ncand));
      int64_t nsel = k;
      if (p.p.has_threshold) {
        int64_t above = 0;
        for (int64_t j : cand) above += key[j] > p.p.threshold;
        nsel = std::max(nsel, above);  // everything above the threshold sorts first
      }
      auto better = [&](int64_t a, int64_t c) {
        return key[a] > key[c] || (key[a] == key[c] && a < c);
      };
      if (nsel > 0 && nsel < ncand)
        std::partial_sort(cand.begin(), cand.begin() + nsel, cand.end(), better);

      int64_t* xo = p.x_out + b * p.x_out_sb;
      if (p.x_out != p.x) {
        const int64_t* xi = p.x + b * p.x_sb;
        for (int64_t l = 0; l < p.L; ++l) xo[l * p.x_out_sl] = xi[l * p.x_sl];
      }
      for (int64_t s = 0; s < nsel; ++s) {
        const int64_t j = cand[s];
        xo[(off + j) * p.x_out_sl] = p.x0[b * p.x0_sb + j * p.x0_sw];
      }
    }
  }
}

}  // namespace

llada_status remask(const RemaskParams& p) {
  if (p.dtype != LLADA_FLOAT32 && p.dtype != LLADA_BFLOAT16 && p.dtype != LLADA_FLOAT16)
    return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE,
                     "remask (CPU): logits must be float32, bfloat16 or float16");
  if (p.V <= 0)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "logits: vocabulary size must be > 0");
  if (p.B <= 0 || p.W < 0) return LLADA_OK;
#if LLADA_CPU_X86
  if (cpu_has_avx2()) {
    remask_impl<Avx2>(p);
    return LLADA_OK;
  }
#endif
  remask_impl<Scalar>(p);
  return LLADA_OK;
}

}  // namespace cpu
}  // namespace llada
