// Non-causal attention backward, flash-attention-2 style: the main kernel (included by the
// per-head-dim instantiation files attention_bwd_hdim{64,128,256}.cu only).
//
// One CTA per (key tile of kBlockN keys, step range, kv head, batch). It keeps its K and V
// tiles in shared memory and dK, dV in registers, and walks over the (query head of its GQA
// group, query tile of kBlockM rows) steps of its range, so dK and dV need no atomics and K/V
// are never copied per query head. With one range (the usual plan) it stores dK and dV;
// with several (small grids, attention_bwd_plan.cuh) it writes float32 partials for the
// reduce kernel of attention_bwd.cu. Warp w owns the 16 keys (w % kKeyWarps) and, for dK/dV, the
// head-dim slice (w / kKeyWarps) of width kD / kDSplit (kDSplit = 2 only for the 256 bucket, to
// keep the accumulators within the register file). With kDSplit > 1 the warps of one key row share
// S^T and dP^T instead of computing them twice: each computes the query columns (w / kKeyWarps) of
// width kBlockM / kDSplit, writes P^T and dS^T to shared memory, and after a barrier every warp
// reads all kBlockM columns back as A operands. Per query tile, with all products on tensor cores
// and the transposed layouts chosen so that each warp's results are already the A operand of the
// next product:
//   S^T  = K_w Q^T                 P^T = exp2(S^T * scale * log2 e - lse * log2 e)
//   dP^T = V_w dO^T                dS^T = P^T * (dP^T - Delta)     (Delta = rowsum(dO * O))
//   dV  += P^T dO                  dK  += dS^T Q                   (scale applied at the end)
//   dQ  += scale * dS K            (dS^T through shared memory, float32 atomics into ws_dq;
//                                   8-byte float2 atomics on sm_90)
// Masked keys and queries whose lse is -inf (all keys masked) get P = 0 and so contribute
// nothing: lse = -inf is loaded as +inf, so exp2(S - inf) = 0 without a NaN.
// The next query tile is prefetched with cp.async while the dQ product runs.
#pragma once

#include <math.h>

#include "cuda/attention_bwd_plan.cuh"
#include "cuda/attention_common.cuh"

namespace llada {
namespace cuda {
namespace attn {

// Q, dO, K, V tiles; dS^T (and P^T when the warps of a key row split the query columns);
// lse and Delta.
template <int kD>
constexpr size_t bwd_smem_bytes() {
  using C = BwdConfig<kD>;
  return static_cast<size_t>(2 * C::kBlockM + 2 * C::kBlockN) * Pitch<kD>::kValue * 2 +
         static_cast<size_t>(C::kDSplit > 1 ? 2 : 1) * C::kBlockN * (C::kBlockM + 8) * 2 +
         static_cast<size_t>(2 * C::kBlockM) * sizeof(float);
}

// flags bit 0: q, k, v, dout rows are 16-byte aligned; bit 1: dk and dv rows are.
template <typename T, int kD>
__global__ void __launch_bounds__(BwdConfig<kD>::kWarps * 32)
    attention_bwd_kernel(const AttnBwdParams p, float* __restrict__ ws_dq,
                         const float* __restrict__ ws_delta, float* __restrict__ ws_dkv, BwdPlan pl,
                         int flags) {
  using C = BwdConfig<kD>;
  constexpr int kBlockM = C::kBlockM;
  constexpr int kBlockN = C::kBlockN;
  constexpr int kWarps = C::kWarps;
  constexpr int kThreads = kWarps * 32;
  constexpr int kKeyWarps = kWarps / C::kDSplit;
  constexpr int kDW = kD / C::kDSplit;  // dK/dV head-dim slice of one warp
  constexpr int kDWT = kDW / 8;
  constexpr int kMNT = kBlockM / 8;         // n-tiles of S^T (queries)
  constexpr bool kShareP = C::kDSplit > 1;  // P^T, dS^T computed once, shared via smem
  constexpr int kMNTW = kMNT / C::kDSplit;  // n-tiles of S^T this warp computes
  constexpr int kPitch = Pitch<kD>::kValue;
  constexpr int kSPitch = kBlockM + 8;  // dS^T rows (keys) of kBlockM queries, padded
  // dQ product: warp -> (16-query m-tile, head-dim slice of kQD columns)
  constexpr int kQMT = kBlockM / 16;
  constexpr int kQSplit = kWarps / kQMT;
  constexpr int kQD = kD / kQSplit;
  // Register budget (checked with -Xptxas -v, benchmarks/ptxas_report.py): the 256 bucket
  // unrolls the S^T / dP^T head-dim loop by 2 only and the dQ column chunks are not
  // unrolled, which keeps every bucket within 255 registers without spills on sm_80 and sm_90.
  constexpr int kSUnroll = kD >= 256 ? 2 : kD / 16;
  static_assert(kBlockN == 16 * kKeyWarps, "each key warp owns 16 keys");
  static_assert(kDWT % 2 == 0 && kQD % 32 == 0 && kQSplit * kQMT == kWarps, "bad bwd config");
  static_assert(kMNTW % 2 == 0 && kMNTW * C::kDSplit == kMNT, "query columns split by 16s");

  const AttnFwdParams& f = p.fwd;
  LLADA_DYNAMIC_SHARED(__align__(16) unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBlockM][kPitch]
  T* sdO = sQ + kBlockM * kPitch;          // [kBlockM][kPitch]
  T* sK = sdO + kBlockM * kPitch;          // [kBlockN][kPitch]
  T* sV = sK + kBlockN * kPitch;           // [kBlockN][kPitch]
  T* sdS = sV + kBlockN * kPitch;          // [kBlockN][kSPitch]: dS^T
  T* sP = sdS + kBlockN * kSPitch;         // [kBlockN][kSPitch]: P^T (kShareP only)
  float* sLse = reinterpret_cast<float*>(sP + (kShareP ? kBlockN * kSPitch : 0));  // log2
  float* sDelta = sLse + kBlockM;                                                  // [kBlockM]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int kw = warp % kKeyWarps;  // key rows kw*16 .. kw*16+15 of the tile
  const int dg = warp / kKeyWarps;  // dK/dV columns dg*kDW .. dg*kDW+kDW-1
  const int qc0 = dg * kMNTW * 8;   // first query column of this warp's S^T / dP^T

  const int Sq = static_cast<int>(f.Sq);
  const int Sk = static_cast<int>(f.Sk);
  const int D = static_cast<int>(f.D);
  const int Hq = static_cast<int>(f.Hq);
  const int group = static_cast<int>(f.Hq / f.Hkv);
  const int n_tile = blockIdx.x / pl.splits;
  const int split = blockIdx.x - n_tile * pl.splits;
  const int n0 = n_tile * kBlockN;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const bool vec_in = flags & 1;
  const bool vec_out = flags & 2;
  const float scale = f.scale;
  const float scale_log2 = f.scale * kLog2e;

  const T* k = static_cast<const T*>(f.k) + b * f.k_st.b + hk * f.k_st.h;
  const T* v = static_cast<const T*>(f.v) + b * f.v_st.b + hk * f.v_st.h;
  // Masked keys are zero-filled: their K/V rows are never read.
  const uint8_t* kpm =
      f.key_padding_mask ? f.key_padding_mask + b * f.kpm_sb + n0 * f.kpm_ss : nullptr;
  load_tile<T, kBlockN, kD, kThreads>(sK, k + n0 * f.k_st.s, f.k_st.s, min(kBlockN, Sk - n0), D,
                                      vec_in, tid, kpm, f.kpm_ss);
  load_tile<T, kBlockN, kD, kThreads>(sV, v + n0 * f.v_st.s, f.v_st.s, min(kBlockN, Sk - n0), D,
                                      vec_in, tid, kpm, f.kpm_ss);

  // The two keys (accumulator rows g and g + 8 of S^T) this thread scores.
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kw * 16 + g + 8 * r;
    key_ok[r] = key < Sk && (f.key_padding_mask == nullptr ||
                             f.key_padding_mask[b * f.kpm_sb + key * f.kpm_ss] != 0);
  }

  const int n_mblocks = (Sq + kBlockM - 1) / kBlockM;
  // this CTA's (query head, query tile) steps [it0, it_end) of group * n_mblocks
  const int it0 = split * pl.steps_per_split;
  const int it_end = min(group * n_mblocks, it0 + pl.steps_per_split);

  // Loads Q, dO, lse and Delta of step `it` (Q/dO asynchronously when vec_in).
  auto load_step = [&](int it) {
    const int h = hk * group + it / n_mblocks;
    const int m0 = (it % n_mblocks) * kBlockM;
    const int rows = min(kBlockM, Sq - m0);
    const T* q = static_cast<const T*>(f.q) + b * f.q_st.b + h * f.q_st.h + m0 * f.q_st.s;
    const T* dout =
        static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + m0 * p.dout_st.s;
    load_tile<T, kBlockM, kD, kThreads>(sQ, q, f.q_st.s, rows, D, vec_in, tid);
    load_tile<T, kBlockM, kD, kThreads>(sdO, dout, p.dout_st.s, rows, D, vec_in, tid);
    const int64_t row_base = (static_cast<int64_t>(b) * Hq + h) * Sq + m0;
    for (int i = tid; i < kBlockM; i += kThreads) {
      float lse2 = INFINITY;  // rows past Sq and fully masked rows: P = 0
      float delta = 0.f;
      if (i < rows) {
        const float lse =
            f.lse[b * f.lse_sb + h * f.lse_sh + static_cast<int64_t>(m0 + i) * f.lse_ss];
        if (lse != -INFINITY) lse2 = lse * kLog2e;
        delta = ws_delta[row_base + i];
      }
      sLse[i] = lse2;
      sDelta[i] = delta;
    }
  };

  if (it0 < it_end) load_step(it0);
  cp_async_commit();

  float dk[kDWT][4];
  float dv[kDWT][4];
#pragma unroll
  for (int dt = 0; dt < kDWT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  }

  for (int it = it0; it < it_end; ++it) {
    const int h = hk * group + it / n_mblocks;
    const int m0 = (it % n_mblocks) * kBlockM;
    cp_async_wait<0>();
    __syncthreads();  // Q, dO, lse, Delta of this step (and K, V) visible to all warps

    // ---- S^T = K_w Q^T and dP^T = V_w dO^T (16 keys x kBlockM queries per warp) ----
    float st[kMNTW][4];
    float dpt[kMNTW][4];
#pragma unroll
    for (int nt = 0; nt < kMNTW; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
    }
#pragma unroll(kSUnroll)
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t ak[4], av[4];  // A = rows of K / V (keys) over head-dim kk*16 .. +15
      const int a_off = (kw * 16 + (lane % 16)) * kPitch + kk * 16 + (lane / 16) * 8;
      ldmatrix_x4(ak, smem_addr(sK + a_off));
      ldmatrix_x4(av, smem_addr(sV + a_off));
#pragma unroll
      for (int nt2 = 0; nt2 < kMNTW / 2; ++nt2) {
        // B = Q^T / dO^T (k = head dim, n = query), non-transposed rows of Q / dO.
        uint32_t bq[4], bo[4];
        const int b_off = (qc0 + nt2 * 16 + (lane % 8) + (lane / 16) * 8) * kPitch + kk * 16 +
                          ((lane / 8) % 2) * 8;
        ldmatrix_x4(bq, smem_addr(sQ + b_off));
        ldmatrix_x4(bo, smem_addr(sdO + b_off));
        mma_16816<T>(st[2 * nt2], ak, bq[0], bq[1]);
        mma_16816<T>(st[2 * nt2 + 1], ak, bq[2], bq[3]);
        mma_16816<T>(dpt[2 * nt2], av, bo[0], bo[1]);
        mma_16816<T>(dpt[2 * nt2 + 1], av, bo[2], bo[3]);
      }
    }

    // ---- P^T and dS^T, in place (element e: key row g + 8*(e/2), query qc0 + nt*8 + 2t +
    // e%2) ----
#pragma unroll
    for (int nt = 0; nt < kMNTW; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = qc0 + nt * 8 + 2 * t + (e & 1);
        const float pv = key_ok[e >> 1] ? exp2f(st[nt][e] * scale_log2 - sLse[qi]) : 0.f;
        st[nt][e] = pv;
        dpt[nt][e] = pv * (dpt[nt][e] - sDelta[qi]);
      }
    }

    // dS^T (and P^T when shared) to shared memory; dS^T feeds the dQ product. Without
    // sharing it is stored after the dK/dV product, which keeps d128 clear of spills.
    auto store_tiles = [&]() {
#pragma unroll
      for (int nt = 0; nt < kMNTW; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int off = (kw * 16 + g + 8 * r) * kSPitch + qc0 + nt * 8 + 2 * t;
          *reinterpret_cast<uint32_t*>(sdS + off) = pack2<T>(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
          if constexpr (kShareP) {
            *reinterpret_cast<uint32_t*>(sP + off) = pack2<T>(st[nt][2 * r], st[nt][2 * r + 1]);
          }
        }
      }
    };
    if constexpr (kShareP) {
      store_tiles();
      __syncthreads();  // P^T, dS^T of every query column are in
    }

    // ---- dV += P^T dO and dK += dS^T Q over this warp's head-dim slice ----
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t ap[4], ads[4];  // A operands over queries kk*16 .. +15 (n-tiles 2kk, 2kk+1)
      if constexpr (kShareP) {
        // rows = this warp's 16 keys, columns = queries, as the A loads of sK above
        const int a_off = (kw * 16 + (lane % 16)) * kSPitch + kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(ap, smem_addr(sP + a_off));
        ldmatrix_x4(ads, smem_addr(sdS + a_off));
      } else {
        ap[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
        ap[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
        ap[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        ap[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        ads[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
        ads[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
        ads[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        ads[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      }
#pragma unroll
      for (int dt2 = 0; dt2 < kDWT / 2; ++dt2) {
        // B = dO / Q (k = query, n = head dim) from their rows with .trans: matrices
        // (queries 0-7, d 0-7), (queries 8-15, d 0-7), (queries 0-7, d 8-15), (8-15, 8-15).
        const int off = (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + dg * kDW +
                        dt2 * 16 + (lane / 16) * 8;
        uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, smem_addr(sdO + off));
        ldmatrix_x4_trans(bq, smem_addr(sQ + off));
        mma_16816<T>(dv[2 * dt2], ap, bo[0], bo[1]);
        mma_16816<T>(dv[2 * dt2 + 1], ap, bo[2], bo[3]);
        mma_16816<T>(dk[2 * dt2], ads, bq[0], bq[1]);
        mma_16816<T>(dk[2 * dt2 + 1], ads, bq[2], bq[3]);
      }
    }

    if constexpr (!kShareP) store_tiles();  // kDSplit == 1: every warp holds all columns
    __syncthreads();  // dS^T complete; every read of sQ, sdO, sLse, sDelta is done

    if (it + 1 < it_end) load_step(it + 1);  // overlaps with the dQ product below
    cp_async_commit();

    // ---- dQ[m0 .., :] += scale * dS K: warp -> 16 queries x kQD head-dim columns ----
    {
      const int mq = warp % kQMT;
      const int qd0 = (warp / kQMT) * kQD;
      float* dq_row0 = ws_dq + ((static_cast<int64_t>(b) * Hq + h) * Sq + m0 + mq * 16) *
                                   static_cast<int64_t>(D);
#pragma unroll 1
      for (int dc = 0; dc < kQD; dc += 32) {
        if (qd0 + dc >= D) break;  // zero-padded head-dim columns: nothing to add
        float acc[4][4];
#pragma unroll
        for (int dt = 0; dt < 4; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          // A = dS (query rows, key cols) read from dS^T with .trans: matrices (keys 0-7,
          // queries 0-7) -> a[0], (keys 0-7, queries 8-15) -> a[1], (keys 8-15, queries
          // 0-7) -> a[2], (keys 8-15, queries 8-15) -> a[3]. Reloaded per column chunk
          // rather than held, to stay clear of register spills next to dK and dV.
          uint32_t ads[4];
          ldmatrix_x4_trans(
              ads, smem_addr(sdS + (kk * 16 + (lane % 8) + (lane / 16) * 8) * kSPitch + mq * 16 +
                             ((lane / 8) % 2) * 8));
#pragma unroll
          for (int dt2 = 0; dt2 < 2; ++dt2) {
            // B = K (k = key, n = head dim) from rows of K with .trans.
            uint32_t bk[4];
            const int off = (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + qd0 + dc +
                            dt2 * 16 + (lane / 16) * 8;
            ldmatrix_x4_trans(bk, smem_addr(sK + off));
            mma_16816<T>(acc[2 * dt2], ads, bk[0], bk[1]);
            mma_16816<T>(acc[2 * dt2 + 1], ads, bk[2], bk[3]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int qrow = mq * 16 + g + 8 * r;
          if (m0 + qrow >= Sq) continue;
          float* dst = dq_row0 + static_cast<int64_t>(g + 8 * r) * D;
#pragma unroll
          for (int dt = 0; dt < 4; ++dt) {
            const int col = qd0 + dc + dt * 8 + 2 * t;  // D % 8 == 0: col < D => col + 1 < D
            if (col < D) {
              const float v0 = acc[dt][2 * r] * scale;
              const float v1 = acc[dt][2 * r + 1] * scale;
#if defined(LLADA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
              // sm_90: one 8-byte vector atomic per column pair, half the atomic instructions
              // (col is even and D % 8 == 0, so the pair is 8-byte aligned in ws_dq); the
              // executor runs this variant
              atomicAdd(reinterpret_cast<float2*>(dst + col), make_float2(v0, v1));
#else
              atomicAdd(dst + col, v0);
              atomicAdd(dst + col + 1, v1);
#endif
            }
          }
        }
      }
    }
    // The next iteration's barrier keeps sdS alive until every warp has read it.
  }

  cp_async_wait<0>();
  if (pl.splits > 1) {
    // ---- partial dK * scale and dV of this step range, float32 [split][2][B][Hkv][Sk][D] ----
    const int64_t plane = static_cast<int64_t>(f.B) * f.Hkv * Sk * D;
    float* part = ws_dkv + 2 * split * plane + ((static_cast<int64_t>(b) * f.Hkv + hk) * Sk) * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = n0 + kw * 16 + g + 8 * r;
      if (key >= Sk) continue;
#pragma unroll
      for (int dt = 0; dt < kDWT; ++dt) {
        const int col = dg * kDW + dt * 8 + 2 * t;  // D % 8 == 0: col < D => col + 1 < D
        if (col >= D) continue;
        float* dst = part + static_cast<int64_t>(key) * D + col;
        *reinterpret_cast<float2*>(dst) =
            make_float2(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
        *reinterpret_cast<float2*>(dst + plane) = make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
    return;
  }
  // ---- epilogue: stage dK * scale and dV through sK / sV, then 16-byte stores ----
  __syncthreads();  // every warp is done with sK (dQ product) and sV
#pragma unroll
  for (int dt = 0; dt < kDWT; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int off = (kw * 16 + g + 8 * r) * kPitch + dg * kDW + dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(sK + off) =
          pack2<T>(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(sV + off) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
  __syncthreads();
  T* dk_out = static_cast<T*>(p.dk) + b * p.dk_st.b + hk * p.dk_st.h + n0 * p.dk_st.s;
  T* dv_out = static_cast<T*>(p.dv) + b * p.dv_st.b + hk * p.dv_st.h + n0 * p.dv_st.s;
  store_tile<T, kBlockN, kD, kThreads>(dk_out, p.dk_st.s, sK, Sk - n0, D, vec_out, tid);
  store_tile<T, kBlockN, kD, kThreads>(dv_out, p.dv_st.s, sV, Sk - n0, D, vec_out, tid);
}

template <typename T, int kD>
llada_status run_attention_bwd(const AttnBwdParams& p, const BwdWorkspace& ws) {
  using C = BwdConfig<kD>;
  const AttnFwdParams& f = p.fwd;
  constexpr size_t smem = bwd_smem_bytes<kD>();
  auto kernel = attention_bwd_kernel<T, kD>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) {
    return set_error(LLADA_ERROR_CUDA,
                     "attention_bwd: cannot reserve %zu bytes of shared memory: %s", smem,
                     cudaGetErrorString(e));
  }
  const int flags = (rows_aligned16(f.q, f.q_st) && rows_aligned16(f.k, f.k_st) &&
                             rows_aligned16(f.v, f.v_st) && rows_aligned16(p.dout, p.dout_st)
                         ? 1
                         : 0) |
                    (rows_aligned16(p.dk, p.dk_st) && rows_aligned16(p.dv, p.dv_st) ? 2 : 0);
  const dim3 grid(static_cast<unsigned>((f.Sk + C::kBlockN - 1) / C::kBlockN * ws.plan.splits),
                  static_cast<unsigned>(f.Hkv), static_cast<unsigned>(f.B));
  launch_kernel("attention_bwd_kernel", kernel, grid, C::kWarps * 32, smem, as_stream(f.stream), p,
                ws.dq, ws.delta, ws.dkv, ws.plan, flags);
  return check_launch("attention_bwd");
}

}  // namespace attn
}  // namespace cuda
}  // namespace llada
