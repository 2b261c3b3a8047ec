// The BLAS of the CPU tiles, found at run time (see blas.h), and the plain-loop fallback.
#include "cpu/blas.h"

#include <dlfcn.h>
#include <stdlib.h>

#include <mutex>
#include <string>

namespace llada {
namespace cpu {

namespace {

struct Resolved {
  cblas_sgemm_fn sgemm = nullptr;
  void (*set_threads)(int) = nullptr;
  std::string description =
      "none: plain loops (no OpenBLAS loaded; install scipy-openblas32 or set LLADA_BLAS_LIB)";
};

// OpenBLAS under the names of the scipy-openblas32 wheel, then under its own. Both need the
// thread-count setter too, which also tells OpenBLAS apart from other BLAS with a cblas_sgemm.
bool take_from(void* handle, Resolved* r) {
  static const char* const kNames[][3] = {
      {"scipy_cblas_sgemm", "scipy_openblas_set_num_threads", "scipy-openblas32"},
      {"cblas_sgemm", "openblas_set_num_threads", "OpenBLAS"},
  };
  for (const auto& n : kNames) {
    void* f = dlsym(handle, n[0]);
    void* t = dlsym(handle, n[1]);
    if (f == nullptr || t == nullptr) continue;
    r->sgemm = reinterpret_cast<cblas_sgemm_fn>(f);
    r->set_threads = reinterpret_cast<void (*)(int)>(t);
    Dl_info info{};
    const char* where = dladdr(f, &info) != 0 && info.dli_fname ? info.dli_fname : "?";
    r->description = std::string(n[2]) + " (" + where + ")";
    return true;
  }
  return false;
}

const Resolved& resolved() {
  static const Resolved r = [] {
    Resolved out;
    const char* lib = getenv("LLADA_BLAS_LIB");
    if (lib != nullptr && *lib != '\0') {
      void* h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
      if (h == nullptr || !take_from(h, &out)) {
        out.description = std::string("none: plain loops (LLADA_BLAS_LIB=") + lib +
                          " is not a loadable OpenBLAS)";
      }
      return out;
    }
    take_from(RTLD_DEFAULT, &out);  // a library the process already loaded globally
    return out;
  }();
  return r;
}

}  // namespace

cblas_sgemm_fn blas_sgemm() {
  return resolved().sgemm;
}

const char* blas_description() {
  return resolved().description.c_str();
}

void blas_single_thread_once() {
  static std::once_flag flag;
  std::call_once(flag, [] {
    if (resolved().set_threads != nullptr) resolved().set_threads(1);
  });
}

void sgemm_loops(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
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

}  // namespace cpu
}  // namespace llada
