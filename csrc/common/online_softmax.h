// Running (max, sum of exponentials) state of an online softmax / logsumexp, shared by
// the CPU and CUDA kernels. -inf inputs are allowed; an empty state has m = -inf, s = 0.
#pragma once

#include <math.h>

#include "macros.h"

namespace llada {

struct OnlineSoftmax {
  float m;
  float s;

  LLADA_HD static OnlineSoftmax empty() { return OnlineSoftmax{-INFINITY, 0.f}; }

  LLADA_HD void add(float x) {
    if (x == -INFINITY) return;
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }

  LLADA_HD void merge(const OnlineSoftmax& o) {
    if (o.m == -INFINITY) return;
    if (m == -INFINITY) {
      *this = o;
      return;
    }
    if (o.m > m) {
      s = s * expf(m - o.m) + o.s;
      m = o.m;
    } else {
      s += o.s * expf(o.m - m);
    }
  }

  // log(sum exp(x)); -inf when nothing finite was added.
  LLADA_HD float lse() const { return m == -INFINITY ? -INFINITY : m + logf(s); }
};

}  // namespace llada
