// Tile configuration of the attention forward and the plan of a call: how the grid covers
// queries and keys. Shared by the kernel header and the host-side workspace query.
//
// Three shape-driven choices make decode-shaped calls (few query rows against a long cached
// K/V, as in diffusion sampling) fill the GPU:
//   - GQA packing: the query heads of one KV head are stacked along the tile's M dimension
//     (row = head-in-group * Sq + query), so the grid covers KV heads and each K/V tile is read
//     once per KV head instead of once per query head;
//   - split-KV (flash-decoding): when the grid would be small, each row's keys are cut into
//     `splits` ranges of whole key tiles handled by separate CTAs, which write unnormalised
//     partial (max, sum, O) rows to a workspace; a combine kernel merges them exactly;
//   - the short tile: a head (or packed group) of at most 64 query rows, such as a sampler
//     block of 32, takes a 64-row tile in which every warp owns one 16-row m-tile, instead of
//     the 128-row tile in which only the first warp of four would compute.
// The plan depends on the shapes only (not on the device), so the same call always takes the
// same path, and it needs no host synchronisation or allocation (the workspace comes from
// llada_attention_fwd_workspace_size).
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace llada {
namespace cuda {
namespace attn {

template <int kD, bool kShort = false>
struct FwdConfig;
// kBlockM query rows x kBlockN keys, kWarps warps (each owns kBlockM / kWarps rows, i.e.
// kMT = 2 m-tiles, so every K/V fragment read from shared memory feeds two mma). The key
// tile is sized so the O and S accumulators fit the 255-register budget (-Xptxas -v, see
// benchmarks/results/ptxas-sm80-sm90.md: 64 -> about 240 registers, no spill; 128 -> 255 with
// a 4-8 byte spill since the split/packing coordinates were added; 256 -> no spill).
template <>
struct FwdConfig<64, false> {
  static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 4;  // 54 KiB shared memory
};
template <>
struct FwdConfig<128, false> {
  static constexpr int kBlockM = 128, kBlockN = 32, kWarps = 4;  // 68 KiB
};
// 256: one m-tile per warp keeps 128 float32 O accumulators per thread; 99 KiB also fits
// an A100's shared memory.
template <>
struct FwdConfig<256, false> {
  static constexpr int kBlockM = 64, kBlockN = 32, kWarps = 4;
};
// The short tile (64 and 128 only; the 256 tile already has 64 rows): one m-tile per warp
// halves the O accumulators, which leaves room for 64-key tiles (fewer barriers per key).
template <>
struct FwdConfig<64, true> {
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4;  // 45 KiB
};
template <>
struct FwdConfig<128, true> {
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4;  // 85 KiB
};
template <int kD>
constexpr bool kHasShortTile = kD <= 128;
constexpr int64_t kFwdShortRows = 64;  // rows per head or packed group that take it

// Split the keys while the grid has fewer CTAs than this (about two waves of a 132-SM GPU;
// a fixed number so that the plan never depends on the device), giving every split at least
// kFwdMinTilesPerSplit key tiles and using at most kFwdMaxSplits.
constexpr int64_t kFwdTargetCtas = 264;
constexpr int64_t kFwdMinTilesPerSplit = 2;
constexpr int64_t kFwdMaxSplits = 64;

struct FwdPlan {
  int group;            // query heads stacked per tile (1: no packing)
  int splits;           // key ranges per row (1: single pass, no workspace)
  int tiles_per_split;  // key tiles per range
  int64_t m_tiles;      // query tiles per (packed) head
  bool short_tile;      // FwdConfig<kD, true>
};

inline int fwd_packed_group(int64_t Sq, int64_t Hq, int64_t Hkv) {
  const int64_t group = Hkv > 0 ? Hq / Hkv : 1;
  return group > 1 && group * Sq <= INT32_MAX ? static_cast<int>(group) : 1;
}

template <int kD, bool kShort>
FwdPlan fwd_plan_for(int64_t B, int64_t Sq, int64_t Hq, int64_t Hkv, int64_t Sk, bool can_split) {
  using C = FwdConfig<kD, kShort>;
  FwdPlan pl;
  pl.short_tile = kShort;
  pl.group = fwd_packed_group(Sq, Hq, Hkv);
  pl.m_tiles = (pl.group * Sq + C::kBlockM - 1) / C::kBlockM;
  const int64_t n_tiles = (Sk + C::kBlockN - 1) / C::kBlockN;
  const int64_t ctas = pl.m_tiles * (Hq / pl.group) * B;
  int64_t splits = 1;
  if (can_split && ctas > 0 && ctas < kFwdTargetCtas) {
    splits = (kFwdTargetCtas + ctas - 1) / ctas;
    if (splits > n_tiles / kFwdMinTilesPerSplit) splits = n_tiles / kFwdMinTilesPerSplit;
    if (splits > kFwdMaxSplits) splits = kFwdMaxSplits;
    if (splits < 1) splits = 1;
  }
  int64_t per = splits > 1 ? (n_tiles + splits - 1) / splits : n_tiles;
  if (splits > 1) splits = (n_tiles + per - 1) / per;  // no empty range
  pl.splits = static_cast<int>(splits);
  pl.tiles_per_split = static_cast<int>(per > 0 ? per : 1);
  return pl;
}

// The plan for these shapes; `can_split` is false when the caller gave no workspace.
template <int kD>
FwdPlan fwd_plan(int64_t B, int64_t Sq, int64_t Hq, int64_t Hkv, int64_t Sk, bool can_split) {
  if constexpr (kHasShortTile<kD>) {
    if (fwd_packed_group(Sq, Hq, Hkv) * Sq <= kFwdShortRows) {
      return fwd_plan_for<kD, true>(B, Sq, Hq, Hkv, Sk, can_split);
    }
  }
  return fwd_plan_for<kD, false>(B, Sq, Hq, Hkv, Sk, can_split);
}

// Workspace of a split plan: per (b, head, query, split) kD float32 partial outputs, then
// (max in the log2 domain, sum) pairs.
template <int kD>
size_t fwd_workspace_bytes(int64_t B, int64_t Sq, int64_t Hq, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(B * Hq * Sq * splits) * (kD + 2) * sizeof(float);
}

}  // namespace attn
}  // namespace cuda
}  // namespace llada
