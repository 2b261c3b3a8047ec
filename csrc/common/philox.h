// Philox4x32-10 counter-based generator (Salmon et al., SC'11), shared by CPU and CUDA
// so that the same seed gives the same random numbers on either device.
//
// Streams used by the library (the stream id is the third counter word):
//   LLADA_STREAM_GUMBEL  one uniform per logit: index ((b * W + j) * V + v)
//   LLADA_STREAM_RANDOM  one uniform per window position: index (b * W + j)
// Each counter yields four 32-bit words = two 53-bit doubles, so uniform index i uses
// counter i >> 1 and the half i & 1.
#pragma once

#include <stdint.h>

#include <math.h>

#include "macros.h"

namespace llada {

constexpr uint32_t LLADA_STREAM_GUMBEL = 0;
constexpr uint32_t LLADA_STREAM_RANDOM = 1;

struct Philox4 {
  uint32_t x[4];
};

LLADA_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

LLADA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(M0, c0, &hi0, &lo0);
    philox_mulhilo(M1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  Philox4 out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// 53 random bits from two words, mapped to the open interval (0, 1). The top value
// (2^53 - 0.5) * 2^-53 rounds to exactly 1.0 in double, which would make -log(-log(u)) an
// infinite Gumbel key: it is clamped to the largest double below 1, 1 - 2^-53.
LLADA_HD double philox_to_unit_double(uint32_t a, uint32_t b) {
  const uint64_t bits = (static_cast<uint64_t>(a >> 5) << 26) | static_cast<uint64_t>(b >> 6);
  const double u = (static_cast<double>(bits) + 0.5) * (1.0 / 9007199254740992.0);  // 2^-53
  return u < 1.0 ? u : 0x1.fffffffffffffp-1;
}

// The uniform number with this index in this stream, in (0, 1), double precision.
LLADA_HD double philox_uniform(uint64_t seed, uint32_t stream, uint64_t index) {
  const uint64_t ctr = index >> 1;
  const Philox4 r =
      philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), stream, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (index & 1) ? philox_to_unit_double(r.x[2], r.x[3])
                     : philox_to_unit_double(r.x[0], r.x[1]);
}

// Standard Gumbel noise -log(-log(u)) computed in double precision (a float32 uniform
// truncates the tail and biases sampling, so the double path is the contract).
LLADA_HD double philox_gumbel(uint64_t seed, uint64_t index) {
  const double u = philox_uniform(seed, LLADA_STREAM_GUMBEL, index);
  return -log(-log(u));
}

}  // namespace llada
