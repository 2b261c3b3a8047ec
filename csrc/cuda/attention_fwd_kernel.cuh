// Non-causal attention forward, flash-attention-2 style (included by the per-head-dim
// instantiation files attention_fwd_hdim{64,128,256}.cu only).
//
// One CTA per (query tile of kBlockM rows, key range, head or packed GQA group, batch); see
// attention_fwd_plan.cuh for the packing of a group's query heads along M and for the
// split of the keys into ranges. Each warp owns kMT * 16 query rows. The Q tile stays in
// shared memory for the whole CTA; K and V tiles of kBlockN keys stream through a double
// buffer filled by cp.async while the previous tile is in use.
// Per key tile and warp:
//   S  = Q K^T                 (mma, float32; Q and K fragments via ldmatrix)
//   masked keys (beyond Sk, or key_padding_mask == 0) -> S = -inf
//   online softmax in the log2 domain: m = running row max, l = running row sum; when m
//   grows, O and l are rescaled by 2^(m_old - m_new)
//   O += P V                   (P re-packed from the S accumulators, V via ldmatrix.trans)
// Finally out = O / l and lse = ln(sum exp(scale * q.k)) = (m + log2 l) * ln 2; with split
// keys the CTA writes (O, m, l) of its range instead and attention_fwd_combine_kernel merges.
// A row whose keys are all masked keeps m = -inf and l = 0: out = 0, lse = -inf. The
// subtraction base is 0 rather than m while m is -inf, so no (-inf) - (-inf) = NaN appears.
#pragma once

#include <math.h>

#include "cuda/attention_common.cuh"
#include "cuda/attention_fwd_plan.cuh"

namespace llada {
namespace cuda {
namespace attn {

template <int kD, bool kShort = false>
constexpr size_t fwd_smem_bytes() {
  using C = FwdConfig<kD, kShort>;
  return static_cast<size_t>(C::kBlockM + 4 * C::kBlockN) * Pitch<kD>::kValue * 2;
}

// flags bit 0: q, k, v rows are 16-byte aligned; bit 1: out rows are.
template <typename T, int kD, bool kShort>
__global__ void __launch_bounds__(FwdConfig<kD, kShort>::kWarps * 32)
    attention_fwd_kernel(const AttnFwdParams p, int flags, FwdPlan pl) {
  using C = FwdConfig<kD, kShort>;
  constexpr int kBlockM = C::kBlockM;
  constexpr int kBlockN = C::kBlockN;
  constexpr int kThreads = C::kWarps * 32;
  constexpr int kMT = kBlockM / (16 * C::kWarps);  // 16-row m-tiles per warp
  constexpr int kNT = kBlockN / 8;                 // 8-key n-tiles of S
  constexpr int kDT = kD / 8;                      // 8-column n-tiles of O
  constexpr int kPitch = Pitch<kD>::kValue;
  static_assert(kMT >= 1 && kBlockM == kMT * 16 * C::kWarps, "bad forward tile config");
  static_assert(kBlockN % 16 == 0 && kD % 16 == 0, "tiles must be multiples of 16");
  // Register budget (-Xptxas -v, benchmarks/ptxas_report.py): two m-tiles per warp with the
  // 128 head dim fill all 255 registers, and a fully unrolled S = Q K^T loop spills a few
  // bytes; unrolling it by 4 keeps every configuration clear of spills.
  constexpr int kSUnroll = kMT >= 2 && kD >= 128 ? 4 : kD / 16;

  LLADA_DYNAMIC_SHARED(__align__(16) unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBlockM][kPitch]
  T* sK = sQ + kBlockM * kPitch;           // [2][kBlockN][kPitch]
  T* sV = sK + 2 * kBlockN * kPitch;       // [2][kBlockN][kPitch]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // accumulator row within a 16-row tile (and row + 8)
  const int t = lane % 4;  // accumulator column pair

  const int Sq = static_cast<int>(p.Sq);
  const int rows_total = pl.group * Sq;  // query rows of this head or packed group
  const int D = static_cast<int>(p.D);
  const int m_tile = blockIdx.x / pl.splits;
  const int split = blockIdx.x - m_tile * pl.splits;
  const int m0 = m_tile * kBlockM;
  const int h0 = blockIdx.y * pl.group;  // query head of row 0 (rows r: head h0 + r / Sq)
  const int b = blockIdx.z;
  const int hk = h0 / static_cast<int>(p.Hq / p.Hkv);  // GQA: kv head of these query heads
  const bool vec_in = flags & 1;
  const bool vec_out = flags & 2;
  // this CTA's key range [kv0, kv0 + Sk)
  const int kv0 = split * pl.tiles_per_split * kBlockN;
  const int Sk = max(0, min(static_cast<int>(p.Sk) - kv0, pl.tiles_per_split * kBlockN));

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h0 * p.q_st.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h + kv0 * p.k_st.s;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h + kv0 * p.v_st.s;
  const uint8_t* kpm =
      p.key_padding_mask ? p.key_padding_mask + b * p.kpm_sb + kv0 * p.kpm_ss : nullptr;

  const int n_tiles = (Sk + kBlockN - 1) / kBlockN;
  load_rows<T, kBlockM, kD, kThreads>(sQ, q, PackedRows{m0, Sq, p.q_st.s, p.q_st.h},
                                      min(kBlockM, rows_total - m0), D, vec_in, tid);
  load_tile<T, kBlockN, kD, kThreads>(sK, k, p.k_st.s, min(kBlockN, Sk), D, vec_in, tid, kpm,
                                      p.kpm_ss);
  load_tile<T, kBlockN, kD, kThreads>(sV, v, p.v_st.s, min(kBlockN, Sk), D, vec_in, tid, kpm,
                                      p.kpm_ss);
  cp_async_commit();

  const int wrow0 = warp * kMT * 16;                 // first row of this warp in the tile
  const bool warp_active = m0 + wrow0 < rows_total;  // warps past the rows only help load
  const float scale_log2 = p.scale * kLog2e;

  float o[kMT][kDT][4];
  float row_max[kMT][2];  // log2 domain, quad-uniform
  float row_sum[kMT][2];  // per-thread partial sums, reduced over the quad at the end
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      // Prefetch the next K/V tile into the other buffer; its last readers finished before
      // the barrier that closed iteration j - 1.
      const int n1 = (j + 1) * kBlockN;
      T* dK = sK + (buf ^ 1) * kBlockN * kPitch;
      T* dV = sV + (buf ^ 1) * kBlockN * kPitch;
      const uint8_t* kpm1 = kpm ? kpm + n1 * p.kpm_ss : nullptr;
      load_tile<T, kBlockN, kD, kThreads>(dK, k + n1 * p.k_st.s, p.k_st.s, min(kBlockN, Sk - n1), D,
                                          vec_in, tid, kpm1, p.kpm_ss);
      load_tile<T, kBlockN, kD, kThreads>(dV, v + n1 * p.v_st.s, p.v_st.s, min(kBlockN, Sk - n1), D,
                                          vec_in, tid, kpm1, p.kpm_ss);
    }
    cp_async_commit();   // always commit (maybe an empty group) so the count below holds
    cp_async_wait<1>();  // everything but the group just committed: Q and tile j are in
    __syncthreads();

    if (warp_active) {
      const T* tK = sK + buf * kBlockN * kPitch;
      const T* tV = sV + buf * kBlockN * kPitch;
      const int n0 = j * kBlockN;

      // ---- S = Q K^T ----
      float s[kMT][kNT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
          s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;

#pragma unroll(kSUnroll)
      for (int kk = 0; kk < kD / 16; ++kk) {
        // A (Q rows): matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) of the 16x16 block.
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          const T* src = sQ + (wrow0 + mt * 16 + (lane % 16)) * kPitch + kk * 16 + (lane / 16) * 8;
          ldmatrix_x4(a[mt], smem_addr(src));
        }
#pragma unroll
        for (int nt2 = 0; nt2 < kNT / 2; ++nt2) {
          // B = K^T for two n-tiles: matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15),
          // (keys 8-15, d 0-7), (keys 8-15, d 8-15) -> b[0..1] of n-tile 2*nt2, b[2..3] of
          // n-tile 2*nt2 + 1 (non-transposed: lane holds K[key g][d 2t..2t+1] = B[k][n]).
          uint32_t bk[4];
          const T* src = tK + (nt2 * 16 + (lane % 8) + (lane / 16) * 8) * kPitch + kk * 16 +
                         ((lane / 8) % 2) * 8;
          ldmatrix_x4(bk, smem_addr(src));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(s[mt][2 * nt2], a[mt], bk[0], bk[1]);
            mma_16816<T>(s[mt][2 * nt2 + 1], a[mt], bk[2], bk[3]);
          }
        }
      }

      // ---- mask and scale (log2 domain) ----
      // This thread's keys: n0 + nt * 8 + 2t + {0, 1}; the same for both of its rows.
      const bool full_tile = n0 + kBlockN <= Sk && kpm == nullptr;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          bool valid = true;
          if (!full_tile) {
            const int key = n0 + nt * 8 + 2 * t + e;
            valid = key < Sk && (kpm == nullptr || kpm[key * p.kpm_ss] != 0);
          }
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            s[mt][nt][e] = valid ? s[mt][nt][e] * scale_log2 : -INFINITY;
            s[mt][nt][e + 2] = valid ? s[mt][nt][e + 2] * scale_log2 : -INFINITY;
          }
        }
      }

      // ---- online softmax ----
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // r = 0: row g (c0, c1); r = 1: row g + 8 (c2, c3)
          float mx = row_max[mt][r];
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
            mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
          mx = quad_max(mx);
          const float base = mx == -INFINITY ? 0.f : mx;
          const float corr = exp2f(row_max[mt][r] - base);  // 0 while the old max is -inf
          row_max[mt][r] = mx;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            s[mt][nt][2 * r] = exp2f(s[mt][nt][2 * r] - base);
            s[mt][nt][2 * r + 1] = exp2f(s[mt][nt][2 * r + 1] - base);
            sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
          }
          row_sum[mt][r] = row_sum[mt][r] * corr + sum;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            o[mt][dt][2 * r] *= corr;
            o[mt][dt][2 * r + 1] *= corr;
          }
        }
      }

      // ---- O += P V ----
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        // P as the A operand of keys kk*16 .. kk*16+15: n-tiles 2kk (cols 0-7) and 2kk+1.
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dt2 = 0; dt2 < kDT / 2; ++dt2) {
          // B = V (k = key, n = d) from rows of V with .trans: matrices (keys 0-7, d 0-7),
          // (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15).
          uint32_t bv[4];
          const T* src = tV + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + dt2 * 16 +
                         (lane / 16) * 8;
          ldmatrix_x4_trans(bv, smem_addr(src));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(o[mt][2 * dt2], a[mt], bv[0], bv[1]);
            mma_16816<T>(o[mt][2 * dt2 + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
    }
    __syncthreads();  // buffer `buf` is refilled at iteration j + 1
  }
  // With Sk == 0 the loop never ran: make sure no copy into sQ (the staging area below)
  // is still in flight, from this thread or any other.
  cp_async_wait<0>();
  __syncthreads();

  if (!warp_active) return;

  if (pl.splits > 1) {
    // ---- epilogue of a key range: unnormalised O and (m, l) per row, for the combine ----
    float* part_o = static_cast<float*>(p.workspace);
    float* part_ml = part_o + static_cast<int64_t>(p.B * p.Hq * p.Sq) * pl.splits * kD;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(row_sum[mt][r]);
        const int row = m0 + wrow0 + mt * 16 + g + 8 * r;
        if (row >= rows_total) continue;
        const int64_t hq = h0 + row / Sq;
        const int64_t part = ((b * p.Hq + hq) * p.Sq + row % Sq) * pl.splits + split;
        if (t == 0) {
          part_ml[2 * part] = row_max[mt][r];
          part_ml[2 * part + 1] = l;
        }
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
          *reinterpret_cast<float2*>(part_o + part * kD + dt * 8 + 2 * t) =
              make_float2(o[mt][dt][2 * r], o[mt][dt][2 * r + 1]);
      }
    }
    return;
  }

  // ---- epilogue: normalise, write lse, stage O through this warp's own Q rows ----
  T* stage = sQ;  // rows wrow0 .. wrow0 + kMT*16 are read and written by this warp only
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[mt][r]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = wrow0 + mt * 16 + g + 8 * r;
      if (t == 0 && m0 + row < rows_total) {
        const int64_t hq = h0 + (m0 + row) / Sq;
        p.lse[b * p.lse_sb + hq * p.lse_sh + static_cast<int64_t>((m0 + row) % Sq) * p.lse_ss] =
            l > 0.f ? (row_max[mt][r] + log2f(l)) * kLn2 : -INFINITY;
      }
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(stage + row * kPitch + dt * 8 + 2 * t) =
            pack2<T>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
      }
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + b * p.out_st.b + h0 * p.out_st.h;
  store_rows<T, kMT * 16, kD, 32>(out, PackedRows{m0 + wrow0, Sq, p.out_st.s, p.out_st.h},
                                  stage + wrow0 * kPitch, rows_total - m0 - wrow0, D, vec_out,
                                  lane);
}

// Merges the key ranges of a split plan: one warp per (b, query head, query). With
// w_i = 2^(m_i - M), M = max_i m_i: out = sum_i w_i O_i / sum_i w_i l_i and
// lse = (M + log2 sum_i w_i l_i) ln 2 (a row without any attended key: out 0, lse -inf).
// The ranges are merged in order, so the result is deterministic.
template <typename T, int kD>
__global__ void __launch_bounds__(128)
    attention_fwd_combine_kernel(const AttnFwdParams p, int splits) {
  constexpr int kCols = (kD + 31) / 32;  // columns per lane
  const float* part_o = static_cast<const float*>(p.workspace);
  const float* part_ml = part_o + static_cast<int64_t>(p.B * p.Hq * p.Sq) * splits * kD;
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.B * p.Hq * p.Sq;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x / 32) {
    const int64_t s = row % p.Sq;
    const int64_t h = (row / p.Sq) % p.Hq;
    const int64_t b = row / (p.Sq * p.Hq);
    const int64_t part0 = row * splits;
    float mx = -INFINITY;
    for (int i = 0; i < splits; ++i) mx = fmaxf(mx, part_ml[2 * (part0 + i)]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float l = 0.f;
    float acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
    for (int i = 0; i < splits; ++i) {
      const float w = exp2f(part_ml[2 * (part0 + i)] - base);  // 0 for an empty range
      l += w * part_ml[2 * (part0 + i) + 1];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < kD) acc[c] += w * part_o[(part0 + i) * kD + d];
      }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* out = static_cast<T*>(p.out) + b * p.out_st.b + s * p.out_st.s + h * p.out_st.h;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < p.D) out[d] = DType<T>::from_float(acc[c] * inv);
    }
    if (lane == 0) {
      p.lse[b * p.lse_sb + h * p.lse_sh + s * p.lse_ss] =
          l > 0.f ? (mx + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

// Launches the main kernel of one tile configuration (explicitly instantiated per file:
// attention_fwd_hdim{64,128,256}.cu the 128-row tile, attention_fwd_hdim{64,128}_short.cu
// the short one).
template <typename T, int kD, bool kShort>
llada_status launch_attention_fwd(const AttnFwdParams& p, const FwdPlan& pl) {
  using C = FwdConfig<kD, kShort>;
  constexpr size_t smem = fwd_smem_bytes<kD, kShort>();
  auto kernel = attention_fwd_kernel<T, kD, kShort>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) {
    return set_error(LLADA_ERROR_CUDA,
                     "attention_fwd: cannot reserve %zu bytes of shared memory: %s", smem,
                     cudaGetErrorString(e));
  }
  const int flags =
      (rows_aligned16(p.q, p.q_st) && rows_aligned16(p.k, p.k_st) && rows_aligned16(p.v, p.v_st)
           ? 1
           : 0) |
      (rows_aligned16(p.out, p.out_st) ? 2 : 0);
  const dim3 grid(static_cast<unsigned>(pl.m_tiles * pl.splits),
                  static_cast<unsigned>(p.Hq / pl.group), static_cast<unsigned>(p.B));
  launch_kernel("attention_fwd_kernel", kernel, grid, C::kWarps * 32, smem, as_stream(p.stream), p,
                flags, pl);
  return LLADA_OK;
}

#define LLADA_FWD_SHORT_DECLARE(T, D)                                                 \
  extern template llada_status launch_attention_fwd<T, D, true>(const AttnFwdParams&, \
                                                                const FwdPlan&);
LLADA_FWD_SHORT_DECLARE(__half, 64)
LLADA_FWD_SHORT_DECLARE(__half, 128)
LLADA_FWD_SHORT_DECLARE(__nv_bfloat16, 64)
LLADA_FWD_SHORT_DECLARE(__nv_bfloat16, 128)
#undef LLADA_FWD_SHORT_DECLARE

template <typename T, int kD>
llada_status run_attention_fwd(const AttnFwdParams& p) {
  const FwdPlan pl = fwd_plan<kD>(p.B, p.Sq, p.Hq, p.Hkv, p.Sk, p.workspace != nullptr);
  if (pl.splits > 1 && p.workspace_bytes < fwd_workspace_bytes<kD>(p.B, p.Sq, p.Hq, pl.splits)) {
    return set_error(LLADA_ERROR_INSUFFICIENT_WORKSPACE,
                     "attention_fwd: workspace of %zu bytes, %zu needed", p.workspace_bytes,
                     fwd_workspace_bytes<kD>(p.B, p.Sq, p.Hq, pl.splits));
  }
  llada_status st = LLADA_OK;
  if constexpr (kHasShortTile<kD>) {
    st = pl.short_tile ? launch_attention_fwd<T, kD, true>(p, pl)
                       : launch_attention_fwd<T, kD, false>(p, pl);
  } else {
    st = launch_attention_fwd<T, kD, false>(p, pl);
  }
  if (st != LLADA_OK) return st;
  if (pl.splits > 1) {
    const int64_t warps = p.B * p.Hq * p.Sq;  // one per row
    const int64_t blocks = (warps + 3) / 4;
    launch_kernel("attention_fwd_combine_kernel", attention_fwd_combine_kernel<T, kD>,
                  dim3(static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX)), 128, 0,
                  as_stream(p.stream), p, pl.splits);
  }
  return check_launch("attention_fwd");
}

}  // namespace attn
}  // namespace cuda
}  // namespace llada
