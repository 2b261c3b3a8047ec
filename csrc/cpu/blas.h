// Single-threaded float32 matrix products for the CPU kernels' tiles.
//
// With LLADA_HAVE_OPENBLAS the products go to OpenBLAS from the scipy-openblas32 wheel (its
// cblas symbols carry the `scipy_` prefix). The CPU kernels parallelise with OpenMP over
// independent tiles and call these from inside their parallel regions, so OpenBLAS itself is
// pinned to one thread: nested BLAS threads would only oversubscribe the cores.
// Without OpenBLAS a plain-loop fallback with vectorisable inner loops keeps the library
// self-contained (slower, same results up to float32 rounding order).
#pragma once

#include <stdint.h>

#include <climits>

#ifdef LLADA_HAVE_OPENBLAS
#include <cblas.h>

#include <mutex>
#endif

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

#ifdef LLADA_HAVE_OPENBLAS

// OpenBLAS's thread count is process-global; set it once before the first product.
inline void blas_single_thread_once() {
  static std::once_flag flag;
  std::call_once(flag, [] { scipy_openblas_set_num_threads(1); });
}

inline void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  scipy_cblas_sgemm(
      CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
      static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
      static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

#else  // plain loops

inline void blas_single_thread_once() {}

inline void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f) {
      for (int64_t j = 0; j < N; ++j) c[j] = 0.f;
    } else if (beta != 1.f) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
  if (K <= 0 || alpha == 0.f) return;
  if (!trans_b) {
    // B rows are contiguous along N: accumulate C[i,:] += a_ik * B[k,:] (axpy form, the
    // inner loop vectorises and C's row stays in L1).
    for (int64_t i = 0; i < M; ++i) {
      float* c = C + i * ldc;
      for (int64_t kk = 0; kk < K; ++kk) {
        const float a = alpha * (trans_a ? A[kk * lda + i] : A[i * lda + kk]);
        const float* b = B + kk * ldb;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
    return;
  }
  // B stored [N,K]: each C entry is a dot product along K. With trans_a the A column is
  // gathered once into a contiguous row first.
  float arow_buf[256];
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    for (int64_t k0 = 0; k0 < K; k0 += 256) {
      const int64_t kn = K - k0 < 256 ? K - k0 : 256;
      const float* a;
      if (trans_a) {
        for (int64_t kk = 0; kk < kn; ++kk) arow_buf[kk] = A[(k0 + kk) * lda + i];
        a = arow_buf;
      } else {
        a = A + i * lda + k0;
      }
      for (int64_t j = 0; j < N; ++j) {
        const float* b = B + j * ldb + k0;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t kk = 0; kk < kn; ++kk) acc += a[kk] * b[kk];
        c[j] += alpha * acc;
      }
    }
  }
}

#endif  // LLADA_HAVE_OPENBLAS

}  // namespace cpu
}  // namespace llada
