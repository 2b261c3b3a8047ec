// Independent check of the CPU executor's tensor-core fragment maps (emu/lane_maps.h) against
// CuTe's layouts, for all 32 lanes, every register and every 16-bit half.
//
//   mma_a_elem / mma_b_elem / mma_c_elem  vs  MMA_Traits<SM80_16x8x16_F32{F16F16,BF16BF16}F32_TN>
//   ldmatrix_row_lane / ldmatrix_dst_elem vs  Copy_Traits<SM75_U32x{1,2,4}_LDSM_N>
//                                              Copy_Traits<SM75_U16x{2,4,8}_LDSM_T>
//
// CuTe conventions used (printed at start-up, and checked where they can be):
//  * MMA ALayout / BLayout / CLayout map (thread, value) to a linear index of the (M,K) / (N,K) /
//    (M,N) tile of Shape_MNK; the index is turned into a coordinate with CuTe's own idx2crd
//    (column-major: A = m + 16 k, B = n + 8 k, C = m + 16 n). Value v of A and B is register
//    v / 2, half v % 2 (two 16-bit elements per 32-bit register); value v of C is register v.
//  * Copy_Traits Src/DstLayout map (thread, value) to a bit of the reference space: the stacked
//    8x8 b16 matrices as laid out by the row addresses, 128 bits per row, 1024 per matrix. So bit
//    = 1024 * matrix + 128 * row + 16 * col + b, with (row, col) in the matrix as it is stored in
//    shared memory (for the _T traits too). A lane's SrcLayout(lane, 0) is the start of the row
//    whose address it supplies. DstLayout value = 32 * register + 16 * half + b (register i holds
//    matrix i). The check also confirms CuTe's recast to 16-bit elements gives the same elements.
//
// Build: g++ -std=c++17 -I<cutlass>/include -I<cuda>/include/cccl -I<cuda>/include -I csrc
//          csrc/emu/tests/cute_lane_maps.cpp
// Prints one line per mismatch and a summary; exits non-zero on any mismatch or on no checks.
#include <cstdio>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/copy_traits_sm75.hpp>

#include "emu/lane_maps.h"

namespace {

using llada::emu::RowCol;

long g_checked = 0;
long g_mismatches = 0;

void expect_eq(const char* map, const char* atom, int lane, int reg, int half, RowCol want,
               RowCol got) {
  ++g_checked;
  if (want.row == got.row && want.col == got.col) return;
  ++g_mismatches;
  std::printf(
      "MISMATCH %s vs %s: lane=%d reg=%d half=%s expected(CuTe)=(row %d, col %d) "
      "got(lane_maps.h)=(row %d, col %d)\n",
      map, atom, lane, reg,
      half < 0    ? "-"
      : half == 0 ? "0"
                  : "1",
      want.row, want.col, got.row, got.col);
}

void expect_lane(const char* atom, int matrix, int row, int want, int got) {
  ++g_checked;
  if (want == got) return;
  ++g_mismatches;
  std::printf(
      "MISMATCH ldmatrix_row_lane vs %s: matrix=%d row=%d expected(CuTe) lane=%d "
      "got(lane_maps.h) lane=%d\n",
      atom, matrix, row, want, got);
}

// A convention failure (CuTe not shaped the way this check reads it).
void expect_true(bool ok, const char* what, const char* atom, int lane, int reg, int half) {
  ++g_checked;
  if (ok) return;
  ++g_mismatches;
  std::printf("MISMATCH convention %s in %s: lane=%d reg=%d half=%d\n", what, atom, lane, reg,
              half);
}

template <class Op>
void check_mma(const char* atom) {
  using TR = cute::MMA_Traits<Op>;
  const auto A = typename TR::ALayout{};
  const auto B = typename TR::BLayout{};
  const auto C = typename TR::CLayout{};
  const auto mnk = typename TR::Shape_MNK{};
  const auto shape_mk = cute::select<0, 2>(mnk);
  const auto shape_nk = cute::select<1, 2>(mnk);
  const auto shape_mn = cute::select<0, 1>(mnk);

  std::printf("%s\n  Shape_MNK: ", atom);
  cute::print(mnk);
  std::printf("\n  ALayout (thr,val)->(M,K) idx: ");
  cute::print(A);
  std::printf("\n  BLayout (thr,val)->(N,K) idx: ");
  cute::print(B);
  std::printf("\n  CLayout (thr,val)->(M,N) idx: ");
  cute::print(C);
  std::printf("\n");
  // The index convention, as CuTe's idx2crd reads it (column-major: idx = m + 16 k, etc.).
  for (int idx : {1, 16, 17, 255}) {
    const auto mk = cute::idx2crd(idx, shape_mk);
    const int m = int(cute::get<0>(mk)), k = int(cute::get<1>(mk));
    expect_true(m == idx % 16 && k == idx / 16, "idx2crd (M,K) column-major", atom, -1, -1, idx);
  }
  std::printf("  lane 5 (g=1, t=1): A v0..7 ->");
  for (int v = 0; v < 8; ++v) {
    const auto mk = cute::idx2crd(int(A(5, v)), shape_mk);
    std::printf(" (m%d,k%d)", int(cute::get<0>(mk)), int(cute::get<1>(mk)));
  }
  std::printf("\n  lane 5: B v0..3 ->");
  for (int v = 0; v < 4; ++v) {
    const auto nk = cute::idx2crd(int(B(5, v)), shape_nk);
    std::printf(" (n%d,k%d)", int(cute::get<0>(nk)), int(cute::get<1>(nk)));
  }
  std::printf("\n  lane 5: C v0..3 ->");
  for (int v = 0; v < 4; ++v) {
    const auto mn = cute::idx2crd(int(C(5, v)), shape_mn);
    std::printf(" (m%d,n%d)", int(cute::get<0>(mn)), int(cute::get<1>(mn)));
  }
  std::printf("\n");

  // Shape checks: 32 threads; A 8 values (4 regs x 2 halves), B 4 (2 x 2), C 4 floats.
  expect_true(int(cute::size<0>(A)) == 32 && int(cute::size<1>(A)) == 8, "A shape 32x8", atom, -1,
              -1, -1);
  expect_true(int(cute::size<0>(B)) == 32 && int(cute::size<1>(B)) == 4, "B shape 32x4", atom, -1,
              -1, -1);
  expect_true(int(cute::size<0>(C)) == 32 && int(cute::size<1>(C)) == 4, "C shape 32x4", atom, -1,
              -1, -1);
  expect_true(int(cute::size(shape_mk)) == 256 && int(cute::size(shape_nk)) == 128 &&
                  int(cute::size(shape_mn)) == 128,
              "Shape_MNK 16x8x16", atom, -1, -1, -1);

  // Each layout must cover its tile exactly once (a bijection), so a coordinate is unambiguous.
  bool seen_a[256] = {}, seen_b[128] = {}, seen_c[128] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {
      for (int half = 0; half < 2; ++half) {
        const int idx = int(A(lane, 2 * reg + half));
        const auto mk = cute::idx2crd(idx, shape_mk);
        seen_a[idx] = true;
        expect_eq("mma_a_elem", atom, lane, reg, half,
                  RowCol{int(cute::get<0>(mk)), int(cute::get<1>(mk))},
                  llada::emu::mma_a_elem(lane, reg, half));
      }
    }
    for (int reg = 0; reg < 2; ++reg) {
      for (int half = 0; half < 2; ++half) {
        const int idx = int(B(lane, 2 * reg + half));
        const auto nk = cute::idx2crd(idx, shape_nk);
        seen_b[idx] = true;
        // lane_maps.h states B as (row k, col n).
        expect_eq("mma_b_elem", atom, lane, reg, half,
                  RowCol{int(cute::get<1>(nk)), int(cute::get<0>(nk))},
                  llada::emu::mma_b_elem(lane, reg, half));
      }
    }
    for (int reg = 0; reg < 4; ++reg) {
      const int idx = int(C(lane, reg));
      const auto mn = cute::idx2crd(idx, shape_mn);
      seen_c[idx] = true;
      expect_eq("mma_c_elem", atom, lane, reg, -1,
                RowCol{int(cute::get<0>(mn)), int(cute::get<1>(mn))},
                llada::emu::mma_c_elem(lane, reg));
    }
  }
  bool all_a = true, all_b = true, all_c = true;
  for (bool s : seen_a) all_a = all_a && s;
  for (bool s : seen_b) all_b = all_b && s;
  for (bool s : seen_c) all_c = all_c && s;
  expect_true(all_a, "ALayout covers 16x16", atom, -1, -1, -1);
  expect_true(all_b, "BLayout covers 8x16", atom, -1, -1, -1);
  expect_true(all_c, "CLayout covers 16x8", atom, -1, -1, -1);
}

// `nmat` 8x8 b16 matrices; `trans` for the .trans (_T) traits.
template <class Op>
void check_ldmatrix(const char* atom, int nmat, bool trans) {
  using TR = cute::Copy_Traits<Op>;
  const auto src = typename TR::SrcLayout{};
  const auto dst = typename TR::DstLayout{};
  // CuTe's view in 16-bit elements, as Copy_Atom<Op, uint16_t> builds it.
  const auto dst16 = cute::recast_layout<cute::uint1_t, uint16_t>(dst);

  std::printf("%s (x%d%s)\n  SrcLayout (thr,val)->bit: ", atom, nmat, trans ? ", trans" : "");
  cute::print(src);
  std::printf("\n  DstLayout (thr,val)->bit: ");
  cute::print(dst);
  std::printf("\n  DstLayout as 16-bit elements: ");
  cute::print(dst16);
  std::printf("\n");

  expect_true(int(cute::size<0>(src)) == 32 && int(cute::size<1>(src)) == 128,
              "SrcLayout shape 32x128 bits", atom, -1, -1, -1);
  expect_true(int(cute::size<0>(dst)) == 32 && int(cute::size<1>(dst)) == 32 * nmat,
              "DstLayout shape 32x(32*nmat) bits", atom, -1, -1, -1);

  // Source: lanes 0 .. 8*nmat-1 each supply the start of one 128-bit row.
  const int nrows = 8 * nmat;
  for (int lane = 0; lane < nrows; ++lane) {
    const int bit0 = int(src(lane, 0));
    bool row_contiguous = bit0 % 128 == 0;
    for (int b = 0; b < 128; ++b) row_contiguous = row_contiguous && int(src(lane, b)) == bit0 + b;
    expect_true(row_contiguous, "SrcLayout row of 128 contiguous bits", atom, lane, -1, -1);
    const int r = bit0 / 128;
    expect_lane(atom, r / 8, r % 8, lane, llada::emu::ldmatrix_row_lane(r / 8, r % 8));
  }
  // And the other way: every (matrix, row) is supplied by a lane in range whose row it is.
  for (int m = 0; m < nmat; ++m) {
    for (int row = 0; row < 8; ++row) {
      const int lane = llada::emu::ldmatrix_row_lane(m, row);
      const bool ok = lane >= 0 && lane < nrows && int(src(lane, 0)) == 128 * (8 * m + row);
      expect_true(ok, "ldmatrix_row_lane(matrix,row) supplies that row", atom, lane, m, row);
    }
  }

  // Destination: register `reg` = matrix `reg`.
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < nmat; ++reg) {
      for (int half = 0; half < 2; ++half) {
        const int bit0 = int(dst(lane, 32 * reg + 16 * half));
        bool contiguous = bit0 % 16 == 0;
        for (int b = 0; b < 16; ++b)
          contiguous = contiguous && int(dst(lane, 32 * reg + 16 * half + b)) == bit0 + b;
        expect_true(contiguous, "DstLayout half = 16 contiguous bits", atom, lane, reg, half);
        const int elem = bit0 / 16;
        expect_true(int(dst16(lane, 2 * reg + half)) == elem, "recast to 16-bit agrees", atom, lane,
                    reg, half);
        const int matrix = elem / 64;
        expect_true(matrix == reg, "register i holds matrix i", atom, lane, reg, half);
        expect_eq("ldmatrix_dst_elem", atom, lane, reg, half, RowCol{(elem % 64) / 8, elem % 8},
                  llada::emu::ldmatrix_dst_elem(lane, half, trans));
      }
    }
  }
}

}  // namespace

int main() {
  check_mma<cute::SM80_16x8x16_F32F16F16F32_TN>("MMA_Traits<SM80_16x8x16_F32F16F16F32_TN>");
  check_mma<cute::SM80_16x8x16_F32BF16BF16F32_TN>("MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>");

  check_ldmatrix<cute::SM75_U32x1_LDSM_N>("Copy_Traits<SM75_U32x1_LDSM_N>", 1, false);
  check_ldmatrix<cute::SM75_U32x2_LDSM_N>("Copy_Traits<SM75_U32x2_LDSM_N>", 2, false);
  check_ldmatrix<cute::SM75_U32x4_LDSM_N>("Copy_Traits<SM75_U32x4_LDSM_N>", 4, false);
  check_ldmatrix<cute::SM75_U16x2_LDSM_T>("Copy_Traits<SM75_U16x2_LDSM_T>", 1, true);
  check_ldmatrix<cute::SM75_U16x4_LDSM_T>("Copy_Traits<SM75_U16x4_LDSM_T>", 2, true);
  check_ldmatrix<cute::SM75_U16x8_LDSM_T>("Copy_Traits<SM75_U16x8_LDSM_T>", 4, true);

  std::printf("cute_lane_maps: %ld checks, %ld mismatches\n", g_checked, g_mismatches);
  if (g_checked == 0) {
    std::printf("cute_lane_maps: FAIL (nothing was checked)\n");
    return 2;
  }
  if (g_mismatches != 0) {
    std::printf("cute_lane_maps: FAIL\n");
    return 1;
  }
  std::printf("cute_lane_maps: OK\n");
  return 0;
}
