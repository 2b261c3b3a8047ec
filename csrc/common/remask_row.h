// Per-row vocabulary statistics of the remask kernels, shared by CPU and CUDA.
//
// For one candidate position the remask step needs, in a single pass over the vocabulary:
//   - the prediction x0: argmax of a key, key = l (temperature 0) or l / T + Gumbel
//     (temperature T > 0), ties -> lowest token id;
//   - softmax statistics of the (untempered) logits l: running max m, sum of exp(l - m),
//     the second-largest logit (for the margin) and sum exp(l - m) * (l - m) (for the
//     entropy).
// RemaskRowState holds exactly that and is *mergeable*: a CUDA block lets every thread
// accumulate a slice of the vocabulary and then merges the partial states; the CPU kernel
// merges per-chunk states computed with vector instructions. The key comparison is exact
// (no rounding depends on the merge order), so x0 is the same on every device for the same
// seed; the confidences agree to float rounding.
#pragma once

#include <stdint.h>

#include <math.h>

#include "llada/llada.h"
#include "macros.h"
#include "philox.h"

namespace llada {

// Largest possible standard Gumbel value from philox_uniform: u <= 1 - 2^-53 gives
// -log(-log(u)) <= 36.74. A token whose scaled logit l / T is below the best key by more
// than this can never win, so its random number need not even be drawn.
constexpr double kRemaskGumbelMax = 37.5;

// CFG combine l = u + (cfg_scale + 1) * (c - u), every operation rounded to float in this
// order (no fused multiply-add) so CPU, CUDA and the PyTorch formula agree bit for bit.
// Host code that vectorises this must also be compiled without FP contraction.
LLADA_HD float remask_cfg_combine(float cond, float uncond, float cfg_scale) {
#if defined(__CUDA_ARCH__)
  const float w = __fadd_rn(cfg_scale, 1.f);
  return __fadd_rn(uncond, __fmul_rn(w, __fsub_rn(cond, uncond)));
#else
  const float w = cfg_scale + 1.f;
  const float d = cond - uncond;
  const float wd = w * d;
  return uncond + wd;
#endif
}

// Gumbel-perturbed key of token v at temperature T > 0: (double)l / T + G, with
// G = -log(-log(u)) and u the uniform of index `gumbel_index` ((b * W + j) * V + v) in
// the Gumbel stream. Division (not multiplication by 1/T) keeps the key reproducible by a
// float64 reference.
LLADA_HD double remask_gumbel_key(float l, float temperature, uint64_t seed,
                                  uint64_t gumbel_index) {
  return static_cast<double>(l) / static_cast<double>(temperature) +
         philox_gumbel(seed, gumbel_index);
}

// Same key from an already drawn uniform u (lets a caller draw two uniforms per Philox call).
LLADA_HD double remask_gumbel_key_from_uniform(float l, float temperature, double u) {
  return static_cast<double>(l) / static_cast<double>(temperature) + (-log(-log(u)));
}

// True if candidate (ka, ia) beats (kb, ib): larger key, ties -> lower token id. An index
// < 0 means "no candidate yet".
LLADA_HD bool remask_key_better(double ka, int64_t ia, double kb, int64_t ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  if (ka != kb) return ka > kb;
  return ia < ib;
}

struct RemaskRowState {
  float m;      // max of the logits seen (-inf while none was finite)
  float s;      // sum of exp(l - m)
  float t;      // sum of exp(l - m) * (l - m): the entropy numerator
  float top2;   // second-largest logit seen (a repeated maximum counts twice); -inf if none
  double key;   // best prediction key so far
  float key_l;  // logit of the token holding the best key (for softmax(l)[x0])
  int64_t idx;  // token id of the best key; -1 while none

  LLADA_HD static RemaskRowState empty() {
    RemaskRowState st;
    st.m = -INFINITY;
    st.s = 0.f;
    st.t = 0.f;
    st.top2 = -INFINITY;
    st.key = -INFINITY;
    st.key_l = -INFINITY;
    st.idx = -1;
    return st;
  }

  // Adds one logit to the softmax statistics (not to the argmax; see offer()).
  // -inf contributes nothing; NaN poisons s and t as it should.
  LLADA_HD void add_stats(float l) {
    if (l == -INFINITY) return;
    if (l > m) {
      if (m == -INFINITY) {
        s = 1.f;
        t = 0.f;
      } else {
        // Rescale to the new max: each old term e * (l_v - m) becomes
        // e * sc * ((l_v - m) + d) with d = m - l and sc = exp(d).
        const float d = m - l;
        const float sc = expf(d);
        t = sc * (t + d * s);
        s = s * sc + 1.f;
        top2 = m;
      }
      m = l;
    } else {
      const float d = l - m;
      const float e = expf(d);
      s += e;
      t += e * d;
      if (l > top2) top2 = l;
    }
  }

  // Offers token v with prediction key `k` and logit `l` to the argmax. NaN keys never win.
  LLADA_HD void offer(double k, float l, int64_t v) {
    if (k != k) return;
    if (remask_key_better(k, v, key, idx)) {
      key = k;
      key_l = l;
      idx = v;
    }
  }

  // Merges another partial state (of a disjoint set of tokens) into this one. The result
  // does not depend on the order of merging except for float rounding of s and t.
  LLADA_HD void merge(const RemaskRowState& o) {
    if (remask_key_better(o.key, o.idx, key, idx)) {
      key = o.key;
      key_l = o.key_l;
      idx = o.idx;
    }
    const RemaskRowState* hi = this;
    const RemaskRowState* lo = &o;
    if (o.m > m) {
      hi = &o;
      lo = this;
    }
    float nm = hi->m, ns, nt, ntop2;
    if (lo->m == -INFINITY) {
      ns = hi->s + lo->s;  // lo->s is 0, or NaN that must propagate
      nt = hi->t + lo->t;
      ntop2 = hi->top2;
    } else {
      const float d = lo->m - hi->m;  // <= 0
      const float sc = expf(d);
      ns = hi->s + lo->s * sc;
      nt = hi->t + sc * (lo->t + d * lo->s);
      ntop2 = hi->top2 > lo->m ? hi->top2 : lo->m;
    }
    m = nm;
    s = ns;
    t = nt;
    top2 = ntop2;
  }
};

// The prediction x0 of a finished row state: the best key's token (0 if no token had a
// usable key, e.g. a row that is NaN everywhere; torch.argmax also answers 0 there).
LLADA_HD int64_t remask_prediction(const RemaskRowState& st) {
  return st.idx < 0 ? 0 : st.idx;
}

// Confidence of a finished row state for `strategy` (llada_remask_strategy), computed the
// way softmax is (p_v = exp(l_v - m) / s). `random_u` is this position's uniform in the
// LLADA_STREAM_RANDOM stream (used by LLADA_REMASK_RANDOM only). A candidate whose logits
// are all -inf has no distribution and gets -inf: the least confident.
LLADA_HD float remask_confidence(const RemaskRowState& st, int32_t strategy, double random_u) {
  if (strategy == LLADA_REMASK_RANDOM) return static_cast<float>(random_u);
  if (st.m == -INFINITY) return -INFINITY;
  switch (strategy) {
    case LLADA_REMASK_MARGIN: return 1.f / st.s - expf(st.top2 - st.m) / st.s;
    case LLADA_REMASK_ENTROPY:
      // sum_v p_v log p_v with log p_v = (l_v - m) - log s.
      return st.t / st.s - logf(st.s);
    default:  // LLADA_REMASK_LOW_CONFIDENCE: softmax(l)[x0], untempered
      return expf(st.key_l - st.m) / st.s;
  }
}

// Uniform of window position (b, j) in the "random" strategy's stream.
LLADA_HD double remask_random_uniform(uint64_t seed, int64_t b, int64_t j, int64_t W) {
  return philox_uniform(seed, LLADA_STREAM_RANDOM, static_cast<uint64_t>(b * W + j));
}

}  // namespace llada
