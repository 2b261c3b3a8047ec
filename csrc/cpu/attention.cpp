// CPU attention, forward and backward (non-causal, GQA/MQA, per-row key padding).
//
// Flash-style tiling: a task owns a block of queries of one head and streams the keys of
// its kv head in blocks. Each tile is two float32 matrix products (scores S = scale * Q K^T,
// then O += P V) around a vectorised online softmax: per query row a running max m and
// denominator l; when a new tile raises m, the row's O and l are rescaled by exp(m_old -
// m_new). Nothing of size Sq x Sk is ever stored.
//
// The backward recomputes P from the saved lse (P = exp(S - lse)) instead of storing it and
// runs two race-free passes:
//   pass 1, one task per (batch, kv head, key block): dV = sum P^T dO, dK = scale sum dS^T Q
//           over every query head of the GQA group and every query block;
//   pass 2, one task per (batch, query head, query block): dQ = scale sum dS K.
// with dS = P * (dP - Di), dP = dO V^T, Di = rowsum(dO * O). Each task accumulates its output
// block in a private float32 tile and writes it once, so no two threads touch the same
// output; the price is computing S, P and dP twice (7 tile products instead of 5).
//
// Forward and backward share one tile grid (see tile_grid), so the backward's recomputed
// scores are bit-identical to the forward's. Blocks shrink when a problem has too few of them
// (small batch * heads or short sequences), so small problems still use every core.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <initializer_list>
#include <new>
#include <vector>

#include "common/dtypes.h"
#include "common/params.h"
#include "cpu/attention_simd.h"
#include "cpu/blas.h"

namespace llada {
namespace cpu {
namespace {

// ---- scalar helpers ---------------------------------------------------------------------

inline float to_float(float x) {
  return x;
}
inline float to_float(bf16 x) {
  return bf16_to_float(x.bits);
}
inline void from_float(float x, float* dst) {
  *dst = x;
}
inline void from_float(float x, bf16* dst) {
  dst->bits = float_to_bf16(x);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T>
inline const T* row_ptr(const void* base, const BSHStrides& st, int64_t b, int64_t s, int64_t h) {
  return static_cast<const T*>(base) + b * st.b + s * st.s + h * st.h;
}
template <typename T>
inline T* row_ptr(void* base, const BSHStrides& st, int64_t b, int64_t s, int64_t h) {
  return static_cast<T*>(base) + b * st.b + s * st.s + h * st.h;
}

// A [rows, D] slab of a [B, S, H, D] tensor (fixed b and h, consecutive s) as float32 rows
// for the tile products. float32 rows whose stride the BLAS accepts are used in place;
// anything else (bfloat16, a stride below D or beyond 32 bits) is converted into buf.
template <typename T>
inline const float* load_rows(const T* first, int64_t row_stride, int64_t rows, int64_t D,
                              float* buf, int64_t* ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = first + r * row_stride;
    float* dst = buf + r * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
  }
  *ld = D;
  return buf;
}
template <>
inline const float* load_rows<float>(const float* first, int64_t row_stride, int64_t rows,
                                     int64_t D, float* buf, int64_t* ld) {
  if (rows <= 1 || blas_ld_ok(row_stride, D)) {
    *ld = rows <= 1 ? D : row_stride;
    return first;
  }
  for (int64_t r = 0; r < rows; ++r) memcpy(buf + r * D, first + r * row_stride, D * 4);
  *ld = D;
  return buf;
}

// Writes float rows (times an optional per-row scale) into a [B, S, H, D] slab.
template <typename T>
inline void store_rows(const float* src, int64_t ld, const float* row_scale, T* first,
                       int64_t row_stride, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const float sc = row_scale ? row_scale[r] : 1.f;
    const float* s = src + r * ld;
    T* dst = first + r * row_stride;
    for (int64_t d = 0; d < D; ++d) from_float(s[d] * sc, dst + d);
  }
}

// Additive mask of one key block: 0 for attended keys, -inf for padded ones. Returns the
// number of attended keys (0 lets the caller skip the block altogether).
inline int64_t key_block_bias(const AttnFwdParams& p, int64_t b, int64_t k0, int64_t nk,
                              float* bias) {
  if (p.key_padding_mask == nullptr) {
    for (int64_t j = 0; j < nk; ++j) bias[j] = 0.f;
    return nk;
  }
  const uint8_t* m = p.key_padding_mask + b * p.kpm_sb + k0 * p.kpm_ss;
  int64_t active = 0;
  for (int64_t j = 0; j < nk; ++j) {
    const bool on = m[j * p.kpm_ss] != 0;
    bias[j] = on ? 0.f : -INFINITY;
    active += on;
  }
  return active;
}

// K and V rows of one key block (kv head kvh, keys k0 .. k0 + nk) as float rows for the tile
// products. When the block has masked keys (active < nk) their rows are zeroed instead of
// read: a masked key is never read, so NaN or inf there cannot reach a product (0 * NaN
// would be NaN even where the softmax weight is exactly 0).
struct KVRows {
  const float* K;
  const float* V;
  int64_t ldk, ldv;
};

template <typename T>
inline const float* load_key_rows(const T* first, int64_t row_stride, int64_t nk, int64_t D,
                                  const float* bias, bool any_masked, float* buf, int64_t* ld) {
  if (!any_masked) return load_rows(first, row_stride, nk, D, buf, ld);
  for (int64_t r = 0; r < nk; ++r) {
    float* dst = buf + r * D;
    const T* src = first + r * row_stride;
    for (int64_t d = 0; d < D; ++d) dst[d] = bias[r] == 0.f ? to_float(src[d]) : 0.f;
  }
  *ld = D;
  return buf;
}

template <typename T>
inline KVRows load_kv(const AttnFwdParams& p, int64_t b, int64_t k0, int64_t kvh, int64_t nk,
                      const float* bias, int64_t active, float* kbuf, float* vbuf) {
  KVRows kv;
  const bool masked = active < nk;
  kv.K = load_key_rows(row_ptr<T>(p.k, p.k_st, b, k0, kvh), p.k_st.s, nk, p.D, bias, masked, kbuf,
                       &kv.ldk);
  kv.V = load_key_rows(row_ptr<T>(p.v, p.v_st, b, k0, kvh), p.v_st.s, nk, p.D, bias, masked, vbuf,
                       &kv.ldv);
  return kv;
}

// The tile grid: query blocks of `bq` rows and key blocks of `bk` keys, both starting at 0.
// The forward and both backward passes use the very same grid and the same product calls
// per tile. That is what makes the backward's recomputed scores bit-identical to the
// forward's: a BLAS result depends on the shape of the call and the position of an element
// inside it, so a different blocking would give scores a few ulps apart, and with large
// scores (|S| ~ 1e4, ulp ~ 1e-3) P = exp(S - lse) would then miss by a visible fraction.
// The grid depends on the shapes only (not on the thread count), so results are also
// reproducible across thread counts. Blocks shrink while there are too few of them to
// spread over the threads of a many-core CPU (small batch * heads or short sequences).
struct TileGrid {
  int64_t bq, bk;
};
constexpr int64_t kBlockQ = 128, kMinBlockQ = 16;
constexpr int64_t kBlockK = 256, kMinBlockK = 32;
constexpr int64_t kMinTasks = 16;

inline TileGrid tile_grid(const AttnFwdParams& p) {
  TileGrid g{kBlockQ, kBlockK};
  while (g.bq > kMinBlockQ && p.B * p.Hq * ceil_div(p.Sq, g.bq) < kMinTasks) g.bq /= 2;
  while (g.bk > kMinBlockK && p.B * p.Hkv * ceil_div(p.Sk, g.bk) < kMinTasks) g.bk /= 2;
  g.bq = std::max<int64_t>(1, std::min(g.bq, p.Sq));
  g.bk = std::max<int64_t>(1, std::min(g.bk, p.Sk));
  return g;
}

// One float buffer per thread, carved into tiles that start whole cache lines apart.
struct Arena {
  static size_t padded(int64_t n) { return static_cast<size_t>(n + 15) / 16 * 16; }
  // Room for tiles of the given sizes.
  static size_t floats_for(std::initializer_list<int64_t> sizes) {
    size_t total = 0;
    for (int64_t n : sizes) total += padded(n);
    return total;
  }
  std::vector<float> mem;
  size_t used = 0;
  // Allocates the thread's tiles; false if memory ran out (the caller reports it once the
  // parallel region ends, so no exception crosses an OpenMP boundary).
  bool reserve(size_t floats) {
    try {
      mem.resize(floats);
      return true;
    } catch (const std::bad_alloc&) {
      return false;
    }
  }
  float* take(int64_t n) {
    float* ptr = mem.data() + used;
    used += padded(n);
    return ptr;
  }
};

// ---- forward ----------------------------------------------------------------------------

template <typename T>
llada_status attention_fwd_impl(const AttnFwdParams& p) {
  const int64_t B = p.B, Sq = p.Sq, Sk = p.Sk, Hq = p.Hq, D = p.D;
  const int64_t group = Hq / p.Hkv;
  const TileGrid grid = tile_grid(p);
  const int64_t BQ = grid.bq, BK = grid.bk;
  const int64_t n_qblocks = ceil_div(Sq, BQ);
  const int64_t n_tasks = B * Hq * n_qblocks;
  const size_t arena_floats =
      Arena::floats_for({BQ * D, BK * D, BK * D, BQ * BK, BQ * D, BQ, BQ, BK});
  blas_single_thread_once();
  const attn_simd::RowOps& ops = attn_simd::row_ops();

  bool alloc_failed = false;
#pragma omp parallel
  {
    Arena arena;
    const bool ok = arena.reserve(arena_floats);
    if (!ok) {
#pragma omp atomic write
      alloc_failed = true;
    }
    float* qbuf = ok ? arena.take(BQ * D) : nullptr;
    float* kbuf = ok ? arena.take(BK * D) : nullptr;
    float* vbuf = ok ? arena.take(BK * D) : nullptr;
    float* S = ok ? arena.take(BQ * BK) : nullptr;
    float* O = ok ? arena.take(BQ * D) : nullptr;
    float* m = ok ? arena.take(BQ) : nullptr;
    float* l = ok ? arena.take(BQ) : nullptr;
    float* bias = ok ? arena.take(BK) : nullptr;

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      if (!ok) continue;
      const int64_t qb = task % n_qblocks;
      const int64_t h = (task / n_qblocks) % Hq;
      const int64_t b = task / (n_qblocks * Hq);
      const int64_t kvh = h / group;
      const int64_t q0 = qb * BQ;
      const int64_t nq = std::min(BQ, Sq - q0);

      int64_t ldq;
      const float* Q = load_rows(row_ptr<T>(p.q, p.q_st, b, q0, h), p.q_st.s, nq, D, qbuf, &ldq);
      for (int64_t i = 0; i < nq * D; ++i) O[i] = 0.f;
      for (int64_t i = 0; i < nq; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
      }

      for (int64_t k0 = 0; k0 < Sk; k0 += BK) {
        const int64_t nk = std::min(BK, Sk - k0);
        const int64_t active = key_block_bias(p, b, k0, nk, bias);
        if (active == 0) continue;  // a fully padded block adds nothing to any row
        const KVRows kv = load_kv<T>(p, b, k0, kvh, nk, bias, active, kbuf, vbuf);
        const float *K = kv.K, *V = kv.V;
        const int64_t ldk = kv.ldk, ldv = kv.ldv;

        sgemm(false, true, nq, nk, D, p.scale, Q, ldq, K, ldk, 0.f, S, nk);

        for (int64_t i = 0; i < nq; ++i) {
          float* s = S + i * nk;
          const float mx = ops.bias_max(s, active < nk ? bias : nullptr, nk);
          const float m_new = std::max(m[i], mx);
          const float sum = ops.exp_sum(s, nk, m_new);
          if (m_new > m[i] && m[i] != -INFINITY) {  // rescale what earlier tiles added
            const float alpha = attn_simd::exp_scalar(m[i] - m_new);
            float* o = O + i * D;
            for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
            l[i] *= alpha;
          }
          l[i] += sum;
          m[i] = m_new;
        }

        sgemm(false, false, nq, D, nk, 1.f, S, nk, V, ldv, 1.f, O, D);
      }

      // Normalise; a row that saw no attended key (l == 0) is exactly 0 with lse = -inf.
      for (int64_t i = 0; i < nq; ++i) {
        const bool empty = !(l[i] > 0.f);
        if (p.lse != nullptr)
          p.lse[b * p.lse_sb + h * p.lse_sh + (q0 + i) * p.lse_ss] =
              empty ? -INFINITY : m[i] + logf(l[i]);
        l[i] = empty ? 0.f : 1.f / l[i];  // l now holds the row's output scale
      }
      store_rows(O, D, l, row_ptr<T>(p.out, p.out_st, b, q0, h), p.out_st.s, nq, D);
    }
  }
  if (alloc_failed)
    return set_error(LLADA_ERROR_INTERNAL, "attention_fwd: out of memory for tile buffers");
  return LLADA_OK;
}

// ---- backward ---------------------------------------------------------------------------

// The per-query-block inputs of the backward, shared by both passes: Q and dO as float rows,
// Di = rowsum(dO * O) and the row's lse, where an empty row (lse = -inf) is stored as +inf so
// that exp(s - lse) is exactly 0 for every key and the row contributes nothing.
struct QBlock {
  const float* Q;
  const float* dO;
  int64_t ldq, lddo;
  bool any_active;
};

template <typename T>
inline QBlock load_qblock(const AttnBwdParams& p, int64_t b, int64_t h, int64_t q0, int64_t nq,
                          float* qbuf, float* dobuf, float* Di, float* L) {
  const AttnFwdParams& f = p.fwd;
  const int64_t D = f.D;
  QBlock blk;
  blk.Q = load_rows(row_ptr<T>(f.q, f.q_st, b, q0, h), f.q_st.s, nq, D, qbuf, &blk.ldq);
  blk.dO = load_rows(row_ptr<T>(p.dout, p.dout_st, b, q0, h), p.dout_st.s, nq, D, dobuf, &blk.lddo);
  blk.any_active = false;
  for (int64_t i = 0; i < nq; ++i) {
    const float lse = f.lse[b * f.lse_sb + h * f.lse_sh + (q0 + i) * f.lse_ss];
    const bool empty = lse == -INFINITY;
    L[i] = empty ? INFINITY : lse;
    blk.any_active |= !empty;
    // Di from the stored output (in its own dtype), as the forward's consumer saw it.
    const T* o = row_ptr<T>(f.out, f.out_st, b, q0 + i, h);
    const float* dor = blk.dO + i * blk.lddo;
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += dor[d] * to_float(o[d]);
    Di[i] = empty ? 0.f : acc;
  }
  return blk;
}

// For one (query block, key block) tile: S = scale Q K^T, then P = exp(S + bias - L) in
// place of S, dP = dO V^T, and dS = P * (dP - Di) in place of dP.
inline void tile_dS(const QBlock& qb, const float* K, int64_t ldk, const float* V, int64_t ldv,
                    const float* bias, const float* Di, const float* L, int64_t nq, int64_t nk,
                    int64_t D, float scale, float* P, float* dS) {
  sgemm(false, true, nq, nk, D, scale, qb.Q, qb.ldq, K, ldk, 0.f, P, nk);
  sgemm(false, true, nq, nk, D, 1.f, qb.dO, qb.lddo, V, ldv, 0.f, dS, nk);
  const attn_simd::RowOps& ops = attn_simd::row_ops();
  for (int64_t i = 0; i < nq; ++i) ops.grad(P + i * nk, dS + i * nk, bias, nk, L[i], Di[i]);
}

template <typename T>
inline void zero_rows(void* base, const BSHStrides& st, int64_t b, int64_t s0, int64_t h,
                      int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = row_ptr<T>(base, st, b, s0 + r, h);
    for (int64_t d = 0; d < D; ++d) from_float(0.f, dst + d);
  }
}

template <typename T>
llada_status attention_bwd_impl(const AttnBwdParams& p) {
  const AttnFwdParams& f = p.fwd;
  const int64_t B = f.B, Sq = f.Sq, Sk = f.Sk, Hq = f.Hq, Hkv = f.Hkv, D = f.D;
  const int64_t group = Hq / Hkv;
  const float scale = f.scale;
  const TileGrid grid = tile_grid(f);
  const int64_t BQ = grid.bq, BK = grid.bk;
  blas_single_thread_once();
  bool alloc_failed = false;

  // Pass 1: dK and dV, one task per (b, kv head, key block).
  {
    const int64_t n_kblocks = ceil_div(Sk, BK);
    const int64_t n_tasks = B * Hkv * n_kblocks;
    const size_t arena_floats = Arena::floats_for(
        {BK * D, BK * D, BQ * D, BQ * D, BQ * BK, BQ * BK, BK * D, BK * D, BQ, BQ, BK});
#pragma omp parallel
    {
      Arena arena;
      const bool ok = arena.reserve(arena_floats);
      if (!ok) {
#pragma omp atomic write
        alloc_failed = true;
      }
      float* kbuf = ok ? arena.take(BK * D) : nullptr;
      float* vbuf = ok ? arena.take(BK * D) : nullptr;
      float* qbuf = ok ? arena.take(BQ * D) : nullptr;
      float* dobuf = ok ? arena.take(BQ * D) : nullptr;
      float* P = ok ? arena.take(BQ * BK) : nullptr;
      float* dS = ok ? arena.take(BQ * BK) : nullptr;
      float* dK = ok ? arena.take(BK * D) : nullptr;
      float* dV = ok ? arena.take(BK * D) : nullptr;
      float* Di = ok ? arena.take(BQ) : nullptr;
      float* L = ok ? arena.take(BQ) : nullptr;
      float* bias = ok ? arena.take(BK) : nullptr;

#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < n_tasks; ++task) {
        if (!ok) continue;
        const int64_t kb = task % n_kblocks;
        const int64_t kvh = (task / n_kblocks) % Hkv;
        const int64_t b = task / (n_kblocks * Hkv);
        const int64_t k0 = kb * BK;
        const int64_t nk = std::min(BK, Sk - k0);
        const int64_t active = key_block_bias(f, b, k0, nk, bias);
        if (active == 0) {  // padded keys get zero gradients
          zero_rows<T>(p.dk, p.dk_st, b, k0, kvh, nk, D);
          zero_rows<T>(p.dv, p.dv_st, b, k0, kvh, nk, D);
          continue;
        }
        const KVRows kv = load_kv<T>(f, b, k0, kvh, nk, bias, active, kbuf, vbuf);
        const float *K = kv.K, *V = kv.V;
        const int64_t ldk = kv.ldk, ldv = kv.ldv;
        for (int64_t i = 0; i < nk * D; ++i) dK[i] = dV[i] = 0.f;

        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          for (int64_t q0 = 0; q0 < Sq; q0 += BQ) {
            const int64_t nq = std::min(BQ, Sq - q0);
            const QBlock qb = load_qblock<T>(p, b, h, q0, nq, qbuf, dobuf, Di, L);
            if (!qb.any_active) continue;
            tile_dS(qb, K, ldk, V, ldv, bias, Di, L, nq, nk, D, scale, P, dS);
            sgemm(true, false, nk, D, nq, 1.f, P, nk, qb.dO, qb.lddo, 1.f, dV, D);
            sgemm(true, false, nk, D, nq, scale, dS, nk, qb.Q, qb.ldq, 1.f, dK, D);
          }
        }
        store_rows(dK, D, nullptr, row_ptr<T>(p.dk, p.dk_st, b, k0, kvh), p.dk_st.s, nk, D);
        store_rows(dV, D, nullptr, row_ptr<T>(p.dv, p.dv_st, b, k0, kvh), p.dv_st.s, nk, D);
      }
    }
  }
  if (alloc_failed)
    return set_error(LLADA_ERROR_INTERNAL, "attention_bwd: out of memory for tile buffers");

  // Pass 2: dQ, one task per (b, query head, query block).
  {
    const int64_t n_qblocks = ceil_div(Sq, BQ);
    const int64_t n_tasks = B * Hq * n_qblocks;
    const size_t arena_floats =
        Arena::floats_for({BK * D, BK * D, BQ * D, BQ * D, BQ * BK, BQ * BK, BQ * D, BQ, BQ, BK});
#pragma omp parallel
    {
      Arena arena;
      const bool ok = arena.reserve(arena_floats);
      if (!ok) {
#pragma omp atomic write
        alloc_failed = true;
      }
      float* kbuf = ok ? arena.take(BK * D) : nullptr;
      float* vbuf = ok ? arena.take(BK * D) : nullptr;
      float* qbuf = ok ? arena.take(BQ * D) : nullptr;
      float* dobuf = ok ? arena.take(BQ * D) : nullptr;
      float* P = ok ? arena.take(BQ * BK) : nullptr;
      float* dS = ok ? arena.take(BQ * BK) : nullptr;
      float* dQ = ok ? arena.take(BQ * D) : nullptr;
      float* Di = ok ? arena.take(BQ) : nullptr;
      float* L = ok ? arena.take(BQ) : nullptr;
      float* bias = ok ? arena.take(BK) : nullptr;

#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < n_tasks; ++task) {
        if (!ok) continue;
        const int64_t qblk = task % n_qblocks;
        const int64_t h = (task / n_qblocks) % Hq;
        const int64_t b = task / (n_qblocks * Hq);
        const int64_t kvh = h / group;
        const int64_t q0 = qblk * BQ;
        const int64_t nq = std::min(BQ, Sq - q0);
        const QBlock qb = load_qblock<T>(p, b, h, q0, nq, qbuf, dobuf, Di, L);
        for (int64_t i = 0; i < nq * D; ++i) dQ[i] = 0.f;
        if (qb.any_active) {
          for (int64_t k0 = 0; k0 < Sk; k0 += BK) {
            const int64_t nk = std::min(BK, Sk - k0);
            const int64_t active = key_block_bias(f, b, k0, nk, bias);
            if (active == 0) continue;
            const KVRows kv = load_kv<T>(f, b, k0, kvh, nk, bias, active, kbuf, vbuf);
            const float *K = kv.K, *V = kv.V;
            const int64_t ldk = kv.ldk, ldv = kv.ldv;
            tile_dS(qb, K, ldk, V, ldv, bias, Di, L, nq, nk, D, scale, P, dS);
            sgemm(false, false, nq, D, nk, scale, dS, nk, K, ldk, 1.f, dQ, D);
          }
        }
        store_rows(dQ, D, nullptr, row_ptr<T>(p.dq, p.dq_st, b, q0, h), p.dq_st.s, nq, D);
      }
    }
  }
  if (alloc_failed)
    return set_error(LLADA_ERROR_INTERNAL, "attention_bwd: out of memory for tile buffers");
  return LLADA_OK;
}

llada_status check_fwd(const AttnFwdParams& p, const char* who) {
  if (p.B < 0 || p.Sq < 0 || p.Sk < 0 || p.Hq < 0 || p.Hkv <= 0 || p.D <= 0)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "%s: bad sizes B=%lld Sq=%lld Sk=%lld Hq=%lld Hkv=%lld D=%lld", who,
                     (long long)p.B, (long long)p.Sq, (long long)p.Sk, (long long)p.Hq,
                     (long long)p.Hkv, (long long)p.D);
  if (p.Hq % p.Hkv != 0)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "%s: query heads (%lld) must be a multiple of kv heads (%lld)", who,
                     (long long)p.Hq, (long long)p.Hkv);
  // Empty tensors may come with null data pointers; anything holding data may not.
  const bool q_empty = p.B * p.Sq * p.Hq == 0, k_empty = p.B * p.Sk == 0;
  if ((!q_empty && (p.q == nullptr || p.out == nullptr)) ||
      (!k_empty && (p.k == nullptr || p.v == nullptr)))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "%s: null q, k, v or out pointer", who);
  if (p.dtype != LLADA_FLOAT32 && p.dtype != LLADA_BFLOAT16)
    return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE,
                     "%s: CPU attention supports float32 and bfloat16 (dtype code %d given)", who,
                     static_cast<int>(p.dtype));
  return LLADA_OK;
}

}  // namespace

llada_status attention_fwd(const AttnFwdParams& p) {
  const llada_status st = check_fwd(p, "attention_fwd");
  if (st != LLADA_OK) return st;
  if (p.dtype == LLADA_FLOAT32) return attention_fwd_impl<float>(p);
  return attention_fwd_impl<bf16>(p);
}

llada_status attention_bwd(const AttnBwdParams& p) {
  const llada_status st = check_fwd(p.fwd, "attention_bwd");
  if (st != LLADA_OK) return st;
  const AttnFwdParams& f = p.fwd;
  if ((f.B * f.Sq * f.Hq != 0 && (f.lse == nullptr || p.dout == nullptr || p.dq == nullptr)) ||
      (f.B * f.Sk != 0 && (p.dk == nullptr || p.dv == nullptr)))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "attention_bwd: null lse, dout, dq, dk or dv pointer");
  if (p.fwd.dtype == LLADA_FLOAT32) return attention_bwd_impl<float>(p);
  return attention_bwd_impl<bf16>(p);
}

}  // namespace cpu
}  // namespace llada
