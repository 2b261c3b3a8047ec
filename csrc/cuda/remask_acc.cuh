// Per-thread accumulator of the CUDA remask row pass (csrc/cuda/remask.cu), kept in its own
// header so that its logic can also be compiled for the host and checked against a plain
// reference without a GPU. No torch, no CUDA runtime calls.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/philox.h"
#include "common/remask_row.h"

#if defined(__CUDACC__)
#define LLADA_ACC_FN __device__ __forceinline__
#else
#define LLADA_ACC_FN inline
#endif

namespace llada {
namespace cuda {

// exp for the softmax sums: the SFU approximation on the device (the sums only feed the
// confidence), the libm one on the host.
LLADA_ACC_FN float acc_fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}

// double -> float rounded toward -inf (a float lower bound of x).
LLADA_ACC_FN float acc_float_rd(double x) {
#if defined(__CUDA_ARCH__)
  return __double2float_rd(x);
#else
  float f = static_cast<float>(x);
  if (static_cast<double>(f) > x) f = nextafterf(f, -INFINITY);
  return f;
#endif
}

// A thread's running summary of its slice of one vocabulary row. It carries the same
// information as RemaskRowState (remask_row.h) but is folded a vector at a time: one
// rescale per vector, __expf for the softmax sums (they only feed the confidence, which
// may differ from the CPU in the last bits), and for temperature 0 the argmax compared in
// float (float -> double is exact and monotonic, so the key order is the same). The
// prediction itself follows remask_row.h exactly: key = (double)l at temperature 0,
// remask_gumbel_key otherwise, larger key wins, ties -> lower id, NaN keys never win.
template <bool kGumbel>
struct ThreadAcc {
  float m;           // running max of the logits (NaN ignored)
  float s;           // sum exp(l - m)
  float t;           // sum exp(l - m) * (l - m)
  float a1, a2;      // largest and second-largest logit (a repeated maximum counts twice)
  double key;        // best key so far (Gumbel path; temperature 0 uses key_l)
  float key_l;       // logit of the best token
  int64_t idx;       // its id, -1 while none
  float skip_below;  // Gumbel path: logits below this can no longer win in this thread

  LLADA_ACC_FN void init() {
    m = -INFINITY;
    s = 0.f;
    t = 0.f;
    a1 = -INFINITY;
    a2 = -INFINITY;
    key = -INFINITY;
    key_l = -INFINITY;
    idx = -1;
    skip_below = -INFINITY;
  }

  // Softmax statistics of kN values.
  template <int kN>
  LLADA_ACC_FN void stats(const float (&v)[kN]) {
    float vmax = v[0];
#pragma unroll
    for (int i = 1; i < kN; ++i) vmax = fmaxf(vmax, v[i]);  // fmaxf skips NaN
    if (vmax > m) {
      if (m != -INFINITY) {
        const float d = m - vmax;
        const float sc = acc_fast_exp(d);
        t = sc * (t + d * s);
        s *= sc;
      }
      m = vmax;
    }
    if (m == -INFINITY) {  // only -inf (or NaN) so far: NaN must still poison the sums
#pragma unroll
      for (int i = 0; i < kN; ++i)
        if (v[i] != v[i]) s = t = v[i];
      return;
    }
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const float d = v[i] - m;
      const float e = acc_fast_exp(d);
      s += e;
      t += (d == -INFINITY) ? 0.f : e * d;  // a -inf logit adds nothing; NaN propagates
    }
  }

  // Top-2 and, at temperature 0, the argmax. Values arrive in increasing id within a
  // thread, so strict comparisons keep the lowest id among equal logits. Only a logit above
  // -inf can be the argmax (NaN never is), as in the CPU twin: a row with none predicts 0.
  LLADA_ACC_FN void order(float l, int64_t v) {
    if (l > a1) {
      a2 = a1;
      a1 = l;
    } else if (l > a2) {
      a2 = l;
    }
    if (!kGumbel && l > key_l) {
      key_l = l;
      idx = v;
    }
  }

  // Gumbel path: offers token v whose uniform is u. Keys are compared in double exactly as
  // remask_row.h does; remask_key_better keeps the lower id on equal keys.
  LLADA_ACC_FN void offer_gumbel(float l, int64_t v, double u, float temperature) {
    if (!(l > -INFINITY)) return;  // -inf and NaN logits are never drawn, as on the CPU
    const double k = remask_gumbel_key_from_uniform(l, temperature, u);
    if (k != k) return;
    if (remask_key_better(k, v, key, idx)) {
      key = k;
      key_l = l;
      idx = v;
      // A token can beat this key only if l / T + G_max >= key. The bound is taken one unit
      // (plus a relative margin for the rounding of the division) lower, then rounded down
      // to float, so a skipped token provably cannot win or tie.
      const double bound =
          (key - kRemaskGumbelMax - 1.0 - fabs(key) * 1e-12) * static_cast<double>(temperature);
      skip_below = acc_float_rd(bound);
    }
  }

  // Gumbel path, float pre-test: true if a token of logit l whose uniform starts with the
  // Philox word `a` provably cannot beat this thread's best key, so the exact double key (a
  // division and two logs) is never computed for it. The proof is the CPU twin's
  // (csrc/cpu/remask.cpp, Avx2::gumbel_chunk):
  //   gap_lo <= key - l / T, since the float rounding of l * (1/T), of key and of their
  //     difference stays below 4e-7 * (|key| + |l / T|) (used while |key| < 1e6);
  //   1 - u > lb = (2^24 - 1 - (a >> 8)) * 2^-24, as u's top 24 bits are a's
  //     (philox_to_unit_double);
  //   winning needs G = -log(-log u) > gap, i.e. -log(u) < exp(-gap); log(u) <= u - 1, so
  //     lb >= exp(-gap_lo) * (1 + 1e-4) (expf's error is far below the margin) implies
  //     G < gap - 0.99e-4: strictly below the best key, also after double rounding.
  // The best key only grows, so a token skipped now would also lose later.
  LLADA_ACC_FN bool cannot_win(float l, uint32_t a, float inv_t) const {
    if (idx < 0 || !(fabs(key) < 1e6)) return false;
    const float kf = static_cast<float>(key);
    const float lk = l * inv_t;
    const float gap_lo = (kf - lk) - 4e-7f * (fabsf(kf) + fabsf(lk));
    if (gap_lo >= static_cast<float>(kRemaskGumbelMax)) return true;
    const float lb = static_cast<float>((1u << 24) - 1u - (a >> 8)) * 5.9604644775390625e-8f;
    return lb >= expf(-gap_lo) * 1.0001f;  // NaN (an infinite l / T) never skips
  }

  LLADA_ACC_FN RemaskRowState to_row_state() const {
    RemaskRowState r;
    r.m = m;
    r.s = s;
    r.t = t;
    r.top2 = a2;
    r.key = kGumbel ? key : static_cast<double>(key_l);
    r.key_l = key_l;
    r.idx = idx;
    return r;
  }
};

// Uniform of Gumbel index `index` given the Philox output of its counter (index >> 1).
LLADA_ACC_FN double uniform_half(const Philox4& r, uint64_t index) {
  return (index & 1) ? philox_to_unit_double(r.x[2], r.x[3])
                     : philox_to_unit_double(r.x[0], r.x[1]);
}

// First Philox word of the uniform of Gumbel index `index` (its top bits are u's).
LLADA_ACC_FN uint32_t uniform_first_word(const Philox4& r, uint64_t index) {
  return (index & 1) ? r.x[2] : r.x[0];
}

LLADA_ACC_FN Philox4 philox_at(uint64_t seed, uint64_t index) {
  const uint64_t ctr = index >> 1;
  return philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32),
                       LLADA_STREAM_GUMBEL, 0u, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

}  // namespace cuda
}  // namespace llada
