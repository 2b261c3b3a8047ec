// Calling the llada kernels from C++17 via the installed CMake package (llada::kernels).
//
// A host framework usually owns its tensors; this example stands in for one with a tiny
// owning `HostTensor<T>` (a std::vector plus shape and strides) whose `view()` is the
// non-owning llada_tensor the C ABI takes, and turns every non-OK status into a C++
// exception carrying llada_last_error(). It runs masked cross-entropy forward + backward and
// attention forward + backward (GQA, key padding, Sq != Sk) and checks them against plain
// double-precision loops. Exit code 0 only when every check passes.
//
//   cmake -S examples/cpp -B build-example-cpp -DCMAKE_PREFIX_PATH=<install prefix>
//   cmake --build build-example-cpp && ./build-example-cpp/llada_example_cpp
#include <llada/llada.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// ---- a minimal C++ face for the C ABI ------------------------------------------------------

class Error : public std::runtime_error {
 public:
  Error(llada_status status, const std::string& what)
      : std::runtime_error(std::string(llada_status_string(status)) + ": " + what),
        status_(status) {}
  llada_status status() const { return status_; }

 private:
  llada_status status_;
};

// The library reports errors by status; the message is thread-local and valid until this
// thread's next call, so it is copied into the exception right away.
void check(llada_status status) {
  if (status != LLADA_OK) throw Error(status, llada_last_error());
}

// The llada_dtype of a C++ element type (uint8_t stands for BOOL: one byte, 0 or 1).
template <typename T>
constexpr llada_dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>) {
    return LLADA_FLOAT32;
  } else if constexpr (std::is_same_v<T, double>) {
    return LLADA_FLOAT64;
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return LLADA_INT64;
  } else if constexpr (std::is_same_v<T, int32_t>) {
    return LLADA_INT32;
  } else {
    static_assert(std::is_same_v<T, uint8_t>, "no llada_dtype for this element type");
    return LLADA_BOOL;
  }
}

// Owns a dense row-major host buffer. view() hands the library a borrowed llada_tensor: the
// library never keeps it past the call and never frees it, so RAII here is the whole story.
template <typename T>
class HostTensor {
 public:
  HostTensor(std::initializer_list<int64_t> shape, T fill = T()) : shape_(shape) {
    if (shape_.size() > LLADA_MAX_DIMS) throw std::invalid_argument("too many dimensions");
    size_t n = 1;
    for (int64_t s : shape_) n *= static_cast<size_t>(s);
    data_.assign(n, fill);
  }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  size_t size() const { return data_.size(); }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

  llada_tensor view() const {
    llada_tensor t{};
    t.data = const_cast<T*>(data_.data());  // the ABI is const-agnostic; inputs are not written
    t.dtype = dtype_of<T>();
    t.device_type = LLADA_CPU;
    t.device_id = 0;
    t.ndim = static_cast<int32_t>(shape_.size());
    int64_t stride = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      t.shape[i] = shape_[i];
      t.strides[i] = stride;
      stride *= shape_[i];
    }
    return t;
  }

 private:
  std::vector<int64_t> shape_;
  std::vector<T> data_;
};

// ---- checks ---------------------------------------------------------------------------------

int g_failures = 0;

void expect_close(double got, double want, double atol, double rtol, const std::string& what) {
  const bool ok = (std::isinf(want) || std::isinf(got))
                      ? got == want
                      : std::abs(got - want) <= atol + rtol * std::abs(want);
  if (!ok) {
    std::fprintf(stderr, "FAIL %s: got %.8g, expected %.8g\n", what.c_str(), got, want);
    ++g_failures;
  }
}

std::mt19937_64 g_rng(20240607);

template <typename T>
void fill_uniform(HostTensor<T>& t, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(u(g_rng));
}

void masked_ce() {
  const int64_t N = 9, V = 37;
  HostTensor<float> logits({N, V}), weights({N}), loss({N}), lse({N}), grad_loss({N});
  HostTensor<float> grad_logits({N, V}, -1.0f);
  HostTensor<int64_t> targets({N});
  fill_uniform(logits, -5.0, 5.0);
  fill_uniform(grad_loss, 0.5, 1.5);
  for (int64_t i = 0; i < N; ++i) {
    targets[i] = (i * 7 + 3) % V;
    weights[i] = i % 3 == 1 ? 0.0f : 1.0f / (0.1f + 0.1f * static_cast<float>(i));  // 1 / t
  }
  const llada_tensor tl = logits.view(), tt = targets.view(), tw = weights.view();
  llada_tensor tloss = loss.view(), tlse = lse.view(), tgl = grad_loss.view();
  llada_tensor tg = grad_logits.view();
  check(llada_masked_ce_fwd(&tl, &tt, &tw, &tloss, &tlse, nullptr));
  check(llada_masked_ce_bwd(&tl, &tt, &tw, &tlse, &tgl, &tg, nullptr));

  for (int64_t i = 0; i < N; ++i) {
    const float* row = logits.data() + i * V;
    double m = row[0], z = 0.0;
    for (int64_t j = 1; j < V; ++j) m = std::max(m, static_cast<double>(row[j]));
    for (int64_t j = 0; j < V; ++j) z += std::exp(row[j] - m);
    const double ref_lse = m + std::log(z);
    const double w = weights[i];
    expect_close(loss[i], w == 0 ? 0.0 : w * (ref_lse - row[targets[i]]), 1e-5, 1e-5,
                 "masked CE loss[" + std::to_string(i) + "]");
    for (int64_t j = 0; j < V; ++j) {
      const double p = std::exp(row[j] - ref_lse);
      const double ref = grad_loss[i] * w * (p - (j == targets[i] ? 1.0 : 0.0));
      expect_close(grad_logits[i * V + j], ref, 1e-6, 1e-4,
                   "masked CE grad[" + std::to_string(i) + "," + std::to_string(j) + "]");
    }
  }
  std::printf("masked CE forward + backward: ok\n");
}

void attention() {
  const int64_t B = 2, Sq = 6, Sk = 9, Hq = 6, Hkv = 2, D = 16, G = Hq / Hkv;
  HostTensor<float> q({B, Sq, Hq, D}), k({B, Sk, Hkv, D}), v({B, Sk, Hkv, D});
  HostTensor<float> dout({B, Sq, Hq, D}), out({B, Sq, Hq, D}), lse({B, Hq, Sq});
  HostTensor<float> dq({B, Sq, Hq, D}), dk({B, Sk, Hkv, D}), dv({B, Sk, Hkv, D});
  HostTensor<uint8_t> mask({B, Sk});
  fill_uniform(q, -1.0, 1.0);
  fill_uniform(k, -1.0, 1.0);
  fill_uniform(v, -1.0, 1.0);
  fill_uniform(dout, -1.0, 1.0);
  for (int64_t b = 0; b < B; ++b)  // left padding of b keys in row b
    for (int64_t t = 0; t < Sk; ++t) mask[b * Sk + t] = t >= b * 2 ? 1 : 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));

  const llada_tensor tq = q.view(), tk = k.view(), tv = v.view(), tm = mask.view();
  const llada_tensor tdo = dout.view();
  llada_tensor to = out.view(), tlse = lse.view(), tdq = dq.view(), tdk = dk.view(),
               tdv = dv.view();
  check(llada_attention_fwd(&tq, &tk, &tv, &tm, scale, &to, &tlse, nullptr));
  size_t ws_bytes = 0;
  check(llada_attention_bwd_workspace_size(&tq, &tk, &ws_bytes));
  std::vector<unsigned char> workspace(ws_bytes);  // the caller owns every workspace
  check(llada_attention_bwd(&tq, &tk, &tv, &tm, &to, &tdo, &tlse, scale, &tdq, &tdk, &tdv,
                            ws_bytes ? workspace.data() : nullptr, ws_bytes, nullptr));

  // Element offset of row (b, s, h) of a dense [B, S, H, D] tensor.
  auto at = [D](int64_t b, int64_t s, int64_t h, int64_t S, int64_t H) {
    return ((b * S + s) * H + h) * D;
  };
  std::vector<double> ref_dk(dk.size(), 0.0), ref_dv(dv.size(), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / G;
      for (int64_t s = 0; s < Sq; ++s) {
        const float* qr = q.data() + at(b, s, h, Sq, Hq);
        std::vector<double> p(Sk, 0.0);
        double m = -std::numeric_limits<double>::infinity(), z = 0.0;
        for (int64_t t = 0; t < Sk; ++t) {
          if (!mask[b * Sk + t]) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += double(qr[d]) * k[at(b, t, hk, Sk, Hkv) + d];
          p[t] = dot * scale;
          m = std::max(m, p[t]);
        }
        for (int64_t t = 0; t < Sk; ++t) {
          p[t] = mask[b * Sk + t] ? std::exp(p[t] - m) : 0.0;
          z += p[t];
        }
        for (double& pt : p) pt /= z;
        expect_close(lse[(b * Hq + h) * Sq + s], m + std::log(z), 1e-5, 1e-5, "attention lse");
        // Forward output, then the backward: dP = dO V^T, dS = P (dP - sum(dO * O)),
        // dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO (summed over the GQA group).
        const float* gor = dout.data() + at(b, s, h, Sq, Hq);
        std::vector<double> o(D, 0.0);
        for (int64_t t = 0; t < Sk; ++t)
          for (int64_t d = 0; d < D; ++d) o[d] += p[t] * v[at(b, t, hk, Sk, Hkv) + d];
        double delta = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          expect_close(out[at(b, s, h, Sq, Hq) + d], o[d], 1e-5, 1e-4, "attention out");
          delta += gor[d] * o[d];
        }
        std::vector<double> dqr(D, 0.0);
        for (int64_t t = 0; t < Sk; ++t) {
          double dp = 0.0;
          for (int64_t d = 0; d < D; ++d) dp += double(gor[d]) * v[at(b, t, hk, Sk, Hkv) + d];
          const double ds = p[t] * (dp - delta);
          for (int64_t d = 0; d < D; ++d) {
            dqr[d] += scale * ds * k[at(b, t, hk, Sk, Hkv) + d];
            ref_dk[at(b, t, hk, Sk, Hkv) + d] += scale * ds * qr[d];
            ref_dv[at(b, t, hk, Sk, Hkv) + d] += p[t] * gor[d];
          }
        }
        for (int64_t d = 0; d < D; ++d)
          expect_close(dq[at(b, s, h, Sq, Hq) + d], dqr[d], 1e-5, 1e-4, "attention dq");
      }
    }
  for (size_t i = 0; i < dk.size(); ++i) {
    expect_close(dk[i], ref_dk[i], 1e-5, 1e-4, "attention dk[" + std::to_string(i) + "]");
    expect_close(dv[i], ref_dv[i], 1e-5, 1e-4, "attention dv[" + std::to_string(i) + "]");
  }
  std::printf("attention forward + backward: ok\n");
}

void errors_become_exceptions() {
  HostTensor<float> logits({2, 3}, 0.5f), weights({2}, 1.0f), loss({2});
  HostTensor<int64_t> targets({2}, 1);
  HostTensor<int32_t> wrong_targets({2}, 1);
  const llada_tensor tl = logits.view(), tw = weights.view(), tbad = wrong_targets.view();
  llada_tensor tloss = loss.view();
  try {
    check(llada_masked_ce_fwd(&tl, &tbad, &tw, &tloss, nullptr, nullptr));
    std::fprintf(stderr, "FAIL int32 targets were accepted\n");
    ++g_failures;
  } catch (const Error& e) {
    if (e.status() != LLADA_ERROR_UNSUPPORTED_DTYPE) {
      std::fprintf(stderr, "FAIL int32 targets: %s\n", e.what());
      ++g_failures;
    }
    std::printf("caught: %s\n", e.what());
  }
}

}  // namespace

int main() {
  std::printf("llada kernels %d (header %d), CUDA kernels: %s\n", llada_version(), LLADA_VERSION,
              llada_has_cuda() ? "yes" : "no");
  if (llada_version() / 10000 != LLADA_VERSION_MAJOR) {
    std::fprintf(stderr, "FAIL runtime major version differs from the header's\n");
    return 1;
  }
  try {
    masked_ce();
    attention();
    errors_become_exceptions();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL unexpected error: %s\n", e.what());
    return 1;
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
