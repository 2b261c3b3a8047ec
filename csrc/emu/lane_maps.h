// Register fragment maps of the warp-wide tensor-core instructions the CUDA kernels use, as
// the CPU executor (csrc/emu) applies them:
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16
// With g = lane / 4 (the group) and t = lane % 4 (the thread in the group). Each 32-bit
// register holds two 16-bit elements; `half` 0 is the low 16 bits.
//
// These are the executor's own statement of the maps. csrc/emu/tests/cute_lane_maps.cpp
// checks every lane, register and half against CuTe's layouts (MMA_Traits of
// SM80_16x8x16_F32{F16,BF16}..._TN and Copy_Traits of SM75_U32x{1,2,4}_LDSM_{N,T}), an
// independent source, so a wrong map cannot hide behind a kernel that reads the manual the
// same wrong way.
#pragma once

namespace llada {
namespace emu {

struct RowCol {
  int row, col;
};

// A operand, 16 x 16 (row m, column k), four registers.
inline RowCol mma_a_elem(int lane, int reg, int half) {
  const int g = lane / 4, t = lane % 4;
  return RowCol{g + 8 * (reg % 2), 2 * t + half + 8 * (reg / 2)};
}

// B operand, 16 x 8 (row k, column n), two registers.
inline RowCol mma_b_elem(int lane, int reg, int half) {
  const int g = lane / 4, t = lane % 4;
  return RowCol{2 * t + half + 8 * reg, g};
}

// C and D accumulators, 16 x 8 (row m, column n), four float registers.
inline RowCol mma_c_elem(int lane, int reg) {
  const int g = lane / 4, t = lane % 4;
  return RowCol{g + 8 * (reg / 2), 2 * t + reg % 2};
}

// ldmatrix source: row `row` (0..7) of 8x8 matrix `matrix` starts at the address that lane
// (8 * matrix + row) provides. Lanes past 8 * (number of matrices) provide nothing.
inline int ldmatrix_row_lane(int matrix, int row) {
  return 8 * matrix + row;
}

// ldmatrix destination: register `matrix` of lane `lane` receives these elements (row, col)
// of that 8x8 matrix; with .trans the matrix is read transposed.
inline RowCol ldmatrix_dst_elem(int lane, int half, bool trans) {
  const int g = lane / 4, t = lane % 4;
  return trans ? RowCol{2 * t + half, g} : RowCol{g, 2 * t + half};
}

}  // namespace emu
}  // namespace llada
