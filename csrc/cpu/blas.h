// Single-threaded float32 matrix products for the CPU kernels' tiles.
//
// The products go to an OpenBLAS found at run time (csrc/cpu/blas.cpp): the copy of the
// scipy-openblas32 wheel (symbols prefixed `scipy_`) or a system OpenBLAS, from the library
// named by LLADA_BLAS_LIB or among the libraries already loaded into the process (the Python
// package loads the wheel's before the kernels). The build never looks for a BLAS, so no
// install path can silently drop it. The CPU kernels parallelise with OpenMP over independent
// tiles and call these from inside their parallel regions, so OpenBLAS itself is pinned to one
// thread. Without any BLAS a plain-loop fallback with vectorisable inner loops is used (slower,
// same results up to float32 rounding order); llada_blas_info() says which one runs.
#pragma once

#include <stdint.h>

#include <climits>

namespace llada {
namespace cpu {

// Row-major C[M,N] = alpha * op(A) * op(B) + beta * C, where op(A) is [M,K] and op(B) is
// [K,N]. A is stored [M,K] (trans_a false) or [K,M] (trans_a true), likewise B is [K,N] or
// [N,K]; lda/ldb/ldc are row strides in elements. beta == 0 overwrites C (never reads it).
inline void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc);

// True when a row stride can be handed to the BLAS as a leading dimension (it uses 32-bit
// ints and needs ld >= the number of columns).
inline bool blas_ld_ok(int64_t ld, int64_t cols) {
  return ld >= cols && ld >= 1 && ld <= static_cast<int64_t>(INT_MAX);
}

// The BLAS in use, resolved once: its sgemm (cblas row-major interface), or nullptr when none
// was found and the plain loops below run.
using cblas_sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int,
                                const float*, int, float, float*, int);
cblas_sgemm_fn blas_sgemm();
// Name and origin of the BLAS in use ("none: plain loops" without one).
const char* blas_description();

// Pins the BLAS to one thread (once per process; the tiles parallelise with OpenMP).
void blas_single_thread_once();

void sgemm_loops(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc);

inline void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  static const cblas_sgemm_fn fn = blas_sgemm();
  if (fn == nullptr) {
    sgemm_loops(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // the CBLAS enum values
  fn(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(M),
     static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B,
     static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}

}  // namespace cpu
}  // namespace llada
