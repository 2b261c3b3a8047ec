// Non-causal attention forward, flash-attention-2 style (included by the per-head-dim
// instantiation files attention_fwd_hdim{64,128,256}.cu only).
//
// One CTA per (query tile of kBlockM rows, query head, batch). Each warp owns kMT * 16 query
// rows. The Q tile stays in shared memory for the whole CTA; K and V tiles of kBlockN keys
// stream through a double buffer filled by cp.async while the previous tile is in use.
// Per key tile and warp:
//   S  = Q K^T                 (mma, float32; Q and K fragments via ldmatrix)
//   masked keys (beyond Sk, or key_padding_mask == 0) -> S = -inf
//   online softmax in the log2 domain: m = running row max, l = running row sum; when m
//   grows, O and l are rescaled by 2^(m_old - m_new)
//   O += P V                   (P re-packed from the S accumulators, V via ldmatrix.trans)
// Finally out = O / l and lse = ln(sum exp(scale * q.k)) = (m + log2 l) * ln 2.
// A row whose keys are all masked keeps m = -inf and l = 0: out = 0, lse = -inf. The
// subtraction base is 0 rather than m while m is -inf, so no (-inf) - (-inf) = NaN appears.
#pragma once

#include <math.h>

#include "cuda/attention_common.cuh"

namespace llada {
namespace cuda {
namespace attn {

template <int kD>
struct FwdConfig;
// kBlockM query rows x kBlockN keys, kWarps warps (each owns kBlockM / kWarps rows, i.e.
// kMT = 2 m-tiles, so every K/V fragment read from shared memory feeds two mma). The key
// tile is sized so the O and S accumulators fit the 255-register budget without spills
// (checked with -Xptxas -v: 64 -> 234 registers; 128 -> 255 with a 4-byte spill on sm_90).
template <>
struct FwdConfig<64> {
  static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 4;  // 54 KiB shared memory
};
template <>
struct FwdConfig<128> {
  static constexpr int kBlockM = 128, kBlockN = 32, kWarps = 4;  // 68 KiB
};
// 256: one m-tile per warp keeps 128 float32 O accumulators per thread; 99 KiB also fits
// an A100's shared memory.
template <>
struct FwdConfig<256> {
  static constexpr int kBlockM = 64, kBlockN = 32, kWarps = 4;
};

template <int kD>
constexpr size_t fwd_smem_bytes() {
  using C = FwdConfig<kD>;
  return static_cast<size_t>(C::kBlockM + 4 * C::kBlockN) * Pitch<kD>::kValue * 2;
}

// flags bit 0: q, k, v rows are 16-byte aligned; bit 1: out rows are.
template <typename T, int kD>
__global__ void __launch_bounds__(FwdConfig<kD>::kWarps * 32)
    attention_fwd_kernel(const AttnFwdParams p, int flags) {
  using C = FwdConfig<kD>;
  constexpr int kBlockM = C::kBlockM;
  constexpr int kBlockN = C::kBlockN;
  constexpr int kThreads = C::kWarps * 32;
  constexpr int kMT = kBlockM / (16 * C::kWarps);  // 16-row m-tiles per warp
  constexpr int kNT = kBlockN / 8;                 // 8-key n-tiles of S
  constexpr int kDT = kD / 8;                      // 8-column n-tiles of O
  constexpr int kPitch = Pitch<kD>::kValue;
  static_assert(kMT >= 1 && kBlockM == kMT * 16 * C::kWarps, "bad forward tile config");
  static_assert(kBlockN % 16 == 0 && kD % 16 == 0, "tiles must be multiples of 16");

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
  const int Sk = static_cast<int>(p.Sk);
  const int D = static_cast<int>(p.D);
  const int m0 = blockIdx.x * kBlockM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / static_cast<int>(p.Hq / p.Hkv);  // GQA: kv head of this query head
  const bool vec_in = flags & 1;
  const bool vec_out = flags & 2;

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + m0 * p.q_st.s;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.kpm_sb : nullptr;

  const int n_tiles = (Sk + kBlockN - 1) / kBlockN;
  load_tile<T, kBlockM, kD, kThreads>(sQ, q, p.q_st.s, min(kBlockM, Sq - m0), D, vec_in, tid);
  load_tile<T, kBlockN, kD, kThreads>(sK, k, p.k_st.s, min(kBlockN, Sk), D, vec_in, tid, kpm,
                                      p.kpm_ss);
  load_tile<T, kBlockN, kD, kThreads>(sV, v, p.v_st.s, min(kBlockN, Sk), D, vec_in, tid, kpm,
                                      p.kpm_ss);
  cp_async_commit();

  const int wrow0 = warp * kMT * 16;         // first row of this warp in the tile
  const bool warp_active = m0 + wrow0 < Sq;  // warps past Sq only help with loads
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

#pragma unroll
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

  // ---- epilogue: normalise, write lse, stage O through this warp's own Q rows ----
  T* stage = sQ;  // rows wrow0 .. wrow0 + kMT*16 are read and written by this warp only
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[mt][r]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = wrow0 + mt * 16 + g + 8 * r;
      if (t == 0 && m0 + row < Sq) {
        p.lse[b * p.lse_sb + h * p.lse_sh + static_cast<int64_t>(m0 + row) * p.lse_ss] =
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
  T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h +
           static_cast<int64_t>(m0 + wrow0) * p.out_st.s;
  store_tile<T, kMT * 16, kD, 32>(out, p.out_st.s, stage + wrow0 * kPitch, Sq - m0 - wrow0, D,
                                  vec_out, lane);
}

template <typename T, int kD>
llada_status run_attention_fwd(const AttnFwdParams& p) {
  using C = FwdConfig<kD>;
  constexpr size_t smem = fwd_smem_bytes<kD>();
  auto kernel = attention_fwd_kernel<T, kD>;
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
  const dim3 grid(static_cast<unsigned>((p.Sq + C::kBlockM - 1) / C::kBlockM),
                  static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B));
  launch_kernel("attention_fwd_kernel", kernel, grid, C::kWarps * 32, smem, as_stream(p.stream), p,
                flags);
  return check_launch("attention_fwd");
}

}  // namespace attn
}  // namespace cuda
}  // namespace llada
