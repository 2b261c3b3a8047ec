// Tile configuration of the attention backward and the plan of a call: how the grid covers
// keys and (query head, query tile) steps. Shared by the kernel header and the host-side
// workspace query.
//
// The main kernel gives each CTA one key tile of one KV head and walks every (query head of
// the GQA group, query tile) step, so dK and dV need no atomics. When that grid is small
// (few KV heads, short keys: a GQA model at short lengths), the steps are cut into `splits`
// ranges over separate CTAs; each writes float32 partial dK and dV of its key tile to the
// workspace, and a reduce kernel adds the ranges in a fixed order (deterministic) and
// converts them. The plan depends on the shapes only (not on the device), and the workspace
// comes from llada_attention_bwd_workspace_size: no host synchronisation, no allocation.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace llada {
namespace cuda {
namespace attn {

template <int kD>
struct BwdConfig;
// kBlockN keys per CTA (16 per key warp) x kBlockM queries per step. dK and dV take
// 2 * kD / kDSplit * 16 / 32 float32 registers per thread (128), so the query step is kept
// short for the wider head dims (smaller S^T / dP^T tiles next to them).
template <>
struct BwdConfig<64> {
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kDSplit = 1;
};
template <>
struct BwdConfig<128> {
  static constexpr int kBlockM = 32, kBlockN = 64, kWarps = 4, kDSplit = 1;
};
template <>
struct BwdConfig<256> {
  static constexpr int kBlockM = 32, kBlockN = 64, kWarps = 8, kDSplit = 2;
};

// Split the steps while the grid has fewer CTAs than this (about two waves of a 132-SM GPU,
// as the forward's split-KV; fixed, so the plan never depends on the device), giving every
// range at least kBwdMinStepsPerSplit steps and using at most kBwdMaxSplits ranges.
constexpr int64_t kBwdTargetCtas = 264;
constexpr int64_t kBwdMinStepsPerSplit = 2;
constexpr int64_t kBwdMaxSplits = 16;

struct BwdPlan {
  int splits;           // step ranges per key tile (1: dK, dV stored directly)
  int steps_per_split;  // (query head, query tile) steps per range
};

template <int kD>
BwdPlan bwd_plan(int64_t B, int64_t Sq, int64_t Hq, int64_t Hkv, int64_t Sk) {
  using C = BwdConfig<kD>;
  const int64_t group = Hkv > 0 ? Hq / Hkv : 1;
  const int64_t steps = group * ((Sq + C::kBlockM - 1) / C::kBlockM);
  const int64_t ctas = ((Sk + C::kBlockN - 1) / C::kBlockN) * Hkv * B;
  int64_t splits = 1;
  if (ctas > 0 && ctas < kBwdTargetCtas) {
    splits = (kBwdTargetCtas + ctas - 1) / ctas;
    if (splits > steps / kBwdMinStepsPerSplit) splits = steps / kBwdMinStepsPerSplit;
    if (splits > kBwdMaxSplits) splits = kBwdMaxSplits;
    if (splits < 1) splits = 1;
  }
  const int64_t per = (steps + splits - 1) / splits;
  BwdPlan pl;
  pl.splits = static_cast<int>(per > 0 ? (steps + per - 1) / per : 1);  // no empty range
  pl.steps_per_split = static_cast<int>(per > 0 ? per : 1);
  return pl;
}

// The workspace of one call as attention_bwd.cu carves it, with the plan it was sized for:
// the float32 dQ accumulator [B, Hq, Sq, D], Delta [B, Hq, Sq], and the partial dK/dV when
// the plan splits (null otherwise).
struct BwdWorkspace {
  float* dq;
  float* delta;
  float* dkv;
  BwdPlan plan;
};

// Float32 partial dK and dV of a split plan: [splits][2 (dK, dV)][B][Hkv][Sk][D].
inline size_t bwd_partials_bytes(int64_t B, int64_t Hkv, int64_t Sk, int64_t D, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(2 * splits) * static_cast<size_t>(B * Hkv * Sk * D) * sizeof(float);
}

}  // namespace attn
}  // namespace cuda
}  // namespace llada
