// Building blocks shared by the CUDA attention kernels (forward and backward).
//
// The kernels are flash-attention-2 style and use tensor cores through raw PTX:
//   * cp.async (16-byte, zero-filling) copies global tiles into padded shared memory;
//   * ldmatrix (optionally .trans) turns shared-memory tiles into mma fragments;
//   * mma.sync.m16n8k16 with float32 accumulators does every matrix product.
// Raw PTX keeps the build free of CUTLASS/CuTe and the compile times low.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type"), with g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   A (16x16, row-major), four .b32 registers of two 16-bit elements each:
//     a[0] = A[g    ][2t..2t+1]   a[1] = A[g + 8][2t..2t+1]
//     a[2] = A[g    ][2t+8..+9]   a[3] = A[g + 8][2t+8..+9]
//   B (16x8, "col": element (k, n)), two .b32 registers:
//     b[0] = B[2t..2t+1][g]       b[1] = B[2t+8..2t+9][g]
//   C/D (16x8 float32), four registers:
//     c[0..1] = C[g][2t..2t+1]    c[2..3] = C[g + 8][2t..2t+1]
// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j; afterwards every lane
// holds, of matrix j, the elements [row g][cols 2t, 2t+1] in register j (with .trans the
// elements [rows 2t, 2t+1][col g]).
//
// Because the C layout of a 16x16 score block (two n-tiles) equals the A layout of a 16x16
// operand, probabilities computed in registers feed the next product without a trip through
// shared memory (the flash-attention register trick).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/params.h"
#include "cuda/attention_bwd_plan.cuh"
#include "cuda/cuda_utils.cuh"

namespace llada {
namespace cuda {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory tiles keep rows of kD + 8 elements: the 16-byte pad shifts consecutive rows
// by four banks, so the eight row addresses of one ldmatrix phase hit distinct banks.
template <int kD>
struct Pitch {
  static constexpr int kValue = kD + 8;
};

// ---- PTX wrappers ----------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Each wrapper has a host twin for the CPU executor (LLADA_EMU, csrc/emu), which emulates
// the instruction with the same operands; the nvcc build compiles the PTX.

// 16-byte asynchronous global -> shared copy; with valid == false nothing is read and the
// destination is zero-filled (src-size 0), which is how out-of-range rows, padded head-dim
// columns and partial tiles become exact zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
#if defined(LLADA_EMU)
  ::llada::emu::cp_async_16(dst, src, valid);
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(LLADA_EMU)
  ::llada::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LLADA_EMU)
  ::llada::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(LLADA_EMU)
  ::llada::emu::ldmatrix(r, 4, addr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(LLADA_EMU)
  ::llada::emu::ldmatrix(r, 4, addr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// d += a * b for one m16n8k16 tile with float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
#if defined(LLADA_EMU)
  ::llada::emu::mma_16816(d, a, b0, b1, false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
#if defined(LLADA_EMU)
  ::llada::emu::mma_16816(d, a, b0, b1, true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats -> one .b32 register of two 16-bit elements (lo in the low half, which is the
// element with the smaller column index in every fragment layout above).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Reductions over the four lanes of a quad (the lanes that share one accumulator row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- tile movement ---------------------------------------------------------------------

// Row r of a tile at element offset r * stride from the tile's first row.
struct StridedRows {
  int64_t stride;
  __device__ __forceinline__ int64_t operator()(int r) const { return r * stride; }
};

// Rows of a packed query tile: the group's query heads stacked along M (head-major), so row
// first + r is query (first + r) % seq of head (first + r) / seq of the group. Offsets are
// relative to query 0 of the group's first head.
struct PackedRows {
  int first, seq;
  int64_t ss, sh;  // sequence and head strides
  __device__ __forceinline__ int64_t operator()(int r) const {
    const int i = first + r;
    return static_cast<int64_t>(i % seq) * ss + static_cast<int64_t>(i / seq) * sh;
  }
};

// Copies a [kRows, kD] tile from global memory (row r at src + row_at(r), D valid columns,
// `rows` valid rows) into shared memory with pitch kD + 8; everything outside [rows, D)
// becomes zero. With row_ok (a key mask: row r is kept where row_ok[r * row_ok_stride] != 0)
// the rows it masks are zero-filled without being read, so NaN or inf in the K/V rows of masked
// keys can never reach a product. Executed cooperatively by kThreads threads (thread index
// tid). vec: every row start is 16-byte aligned (checked on the host), so the copy goes through
// cp.async and completes at the next cp_async_wait; otherwise it falls back to synchronous
// element loads (correct for any stride, just slower), visible after the next barrier.
template <typename T, int kRows, int kD, int kThreads, typename Rows>
__device__ __forceinline__ void load_rows(T* smem, const T* src, Rows row_at, int rows, int D,
                                          bool vec, int tid, const uint8_t* row_ok = nullptr,
                                          int64_t row_ok_stride = 0) {
  constexpr int kPitch = Pitch<kD>::kValue;
  if (vec) {
    constexpr int kChunks = kD / 8;  // 16-byte chunks per row
#pragma unroll 4
    for (int i = tid; i < kRows * kChunks; i += kThreads) {
      const int r = i / kChunks;
      const int c = (i % kChunks) * 8;
      const bool valid = r < rows && c < D && (row_ok == nullptr || row_ok[r * row_ok_stride] != 0);
      const T* g = valid ? src + row_at(r) + c : src;
      cp_async_16(smem_addr(smem + r * kPitch + c), g, valid);
    }
  } else {
    const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
    uint16_t* d16 = reinterpret_cast<uint16_t*>(smem);
    for (int i = tid; i < kRows * kD; i += kThreads) {
      const int r = i / kD;
      const int c = i % kD;
      const bool valid = r < rows && c < D && (row_ok == nullptr || row_ok[r * row_ok_stride] != 0);
      d16[r * kPitch + c] = valid ? s16[row_at(r) + c] : uint16_t(0);
    }
  }
}

// load_rows for rows row_stride elements apart.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, const T* src, int64_t row_stride, int rows,
                                          int D, bool vec, int tid, const uint8_t* row_ok = nullptr,
                                          int64_t row_ok_stride = 0) {
  load_rows<T, kRows, kD, kThreads>(smem, src, StridedRows{row_stride}, rows, D, vec, tid, row_ok,
                                    row_ok_stride);
}

// Copies the first `rows` rows and D columns of a shared-memory tile (pitch kD + 8) to
// global memory (row r at dst + row_at(r)). vec: 16-byte stores (destination rows aligned).
template <typename T, int kRows, int kD, int kThreads, typename Rows>
__device__ __forceinline__ void store_rows(T* dst, Rows row_at, const T* smem, int rows, int D,
                                           bool vec, int tid) {
  constexpr int kPitch = Pitch<kD>::kValue;
  if (vec) {
    constexpr int kChunks = kD / 8;
    for (int i = tid; i < kRows * kChunks; i += kThreads) {
      const int r = i / kChunks;
      const int c = (i % kChunks) * 8;
      if (r < rows && c < D) {
        *reinterpret_cast<uint4*>(dst + row_at(r) + c) =
            *reinterpret_cast<const uint4*>(smem + r * kPitch + c);
      }
    }
  } else {
    const uint16_t* s16 = reinterpret_cast<const uint16_t*>(smem);
    uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
    for (int i = tid; i < kRows * kD; i += kThreads) {
      const int r = i / kD;
      const int c = i % kD;
      if (r < rows && c < D) d16[row_at(r) + c] = s16[r * kPitch + c];
    }
  }
}

// store_rows for rows dst_row_stride elements apart.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void store_tile(T* dst, int64_t dst_row_stride, const T* smem, int rows,
                                           int D, bool vec, int tid) {
  store_rows<T, kRows, kD, kThreads>(dst, StridedRows{dst_row_stride}, smem, rows, D, vec, tid);
}

// Host side: true when every row start base + b*sb + s*ss + h*sh of a [B, S, H, D] tensor
// of 16-bit elements is 16-byte aligned (so tiles may move as 16-byte chunks).
inline bool rows_aligned16(const void* base, const BSHStrides& st) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && st.b % 8 == 0 && st.s % 8 == 0 &&
         st.h % 8 == 0;
}

// Host side: the checks both launchers share. The C ABI layer validated pointers, ranks and
// strides already; these guard what the kernels themselves assume (dtype, head-dim bucket,
// 32-bit row indices, grid limits).
inline llada_status check_attention_shapes(const AttnFwdParams& p, const char* what) {
  if (p.dtype != LLADA_FLOAT16 && p.dtype != LLADA_BFLOAT16) {
    return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE,
                     "%s: CUDA attention supports float16 and bfloat16, got dtype %d", what,
                     static_cast<int>(p.dtype));
  }
  if (p.D <= 0 || p.D > 256 || p.D % 8 != 0) {
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "%s: CUDA attention needs a head dim that is a multiple of 8 in [8, 256], "
                     "got %lld",
                     what, static_cast<long long>(p.D));
  }
  if (p.B < 0 || p.Sq < 0 || p.Sk < 0 || p.Hq < 0 || p.Hkv <= 0 || p.Hq % p.Hkv != 0) {
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "%s: bad sizes B=%lld Sq=%lld Sk=%lld Hq=%lld Hkv=%lld (need Hq %% Hkv == 0)",
                     what, static_cast<long long>(p.B), static_cast<long long>(p.Sq),
                     static_cast<long long>(p.Sk), static_cast<long long>(p.Hq),
                     static_cast<long long>(p.Hkv));
  }
  if (p.Sq > (int64_t(1) << 30) || p.Sk > (int64_t(1) << 30) || p.B > 65535 || p.Hq > 65535) {
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "%s: sizes beyond the CUDA kernel limits (Sq, Sk <= 2^30; B, Hq <= 65535)",
                     what);
  }
  return LLADA_OK;
}

// ---- launchers (explicitly instantiated in attention_{fwd,bwd}_hdim{64,128,256}.cu) ----

// kD is the padded head-dim bucket (64, 128 or 256); p.D <= kD, a multiple of 8.
template <typename T, int kD>
llada_status run_attention_fwd(const AttnFwdParams& p);

// ws: the call's scratch and the plan it was sized for (attention_bwd_plan.cuh).
template <typename T, int kD>
llada_status run_attention_bwd(const AttnBwdParams& p, const BwdWorkspace& ws);

#define LLADA_ATTN_DECLARE(T, D)                                              \
  extern template llada_status run_attention_fwd<T, D>(const AttnFwdParams&); \
  extern template llada_status run_attention_bwd<T, D>(const AttnBwdParams&, const BwdWorkspace&);
LLADA_ATTN_DECLARE(__half, 64)
LLADA_ATTN_DECLARE(__half, 128)
LLADA_ATTN_DECLARE(__half, 256)
LLADA_ATTN_DECLARE(__nv_bfloat16, 64)
LLADA_ATTN_DECLARE(__nv_bfloat16, 128)
LLADA_ATTN_DECLARE(__nv_bfloat16, 256)
#undef LLADA_ATTN_DECLARE

}  // namespace attn
}  // namespace cuda
}  // namespace llada
