// Small device helpers shared by the CUDA masked cross-entropy and remask kernels:
// launch-error checking, dtype traits with 16-byte vectorised loads/stores, and warp /
// block reductions. No torch, no pybind11, no allocation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

#include "common/params.h"

namespace llada {
namespace cuda {

constexpr int kWarpSize = 32;

// Reports the error of the last launch (configuration errors, or a sticky error left by an
// earlier asynchronous failure) without synchronising the host.
inline llada_status check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    return set_error(LLADA_ERROR_CUDA, "%s: CUDA error %d (%s)", what, static_cast<int>(e),
                     cudaGetErrorString(e));
  }
  return LLADA_OK;
}

inline cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}

// One launch helper for both compilers: <<<>>> under nvcc; under the host compiler
// (LLADA_EMU) the CPU executor of csrc/emu runs the grid, with `name` in its reports.
template <typename... P, typename... A>
inline void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                          size_t smem, cudaStream_t stream, A&&... args) {
#if defined(LLADA_EMU)
  ::llada::emu::launch(name, kernel, grid, block, smem, stream, std::forward<A>(args)...);
#else
  (void)name;
  // clang-format off
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  // clang-format on
#endif
}

// Shared-memory declarations, which the executor allocates per block.
#if defined(LLADA_EMU)
// The key, a static local of a lambda, is distinct in every template instantiation.
#define LLADA_SHARED_ARRAY(T, name, n)                   \
  T* name = static_cast<T*>(::llada::emu::static_shared( \
      sizeof(T) * (n), alignof(T),                       \
      [] {                                               \
        static char key;                                 \
        return &key;                                     \
      }(),                                               \
      __FILE__, __LINE__))
#define LLADA_DYNAMIC_SHARED(T, name) \
  T* name = reinterpret_cast<decltype(name)>(::llada::emu::dynamic_shared())
#else
#define LLADA_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define LLADA_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// Largest grid.x we ever launch; kernels grid-stride over rows beyond it.
constexpr int64_t kMaxGridX = 2147483647;

// ---- dtype traits ----------------------------------------------------------------------
// Each element type exposes conversions to/from float32 and a 16-byte vector of kVec
// elements. The conversions are exact for the loads (bf16/fp16 -> f32 widen) and round to
// nearest even for the stores, as torch does.
template <typename T>
struct DType;

template <>
struct DType<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

template <>
struct DType<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <>
struct DType<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};

// 16 bytes worth of elements, loaded/stored as one uint4 transaction.
template <typename T>
union Vec16 {
  static constexpr int kN = DType<T>::kVec;
  uint4 raw;
  T v[kN];
};

// Read-only, non-coherent path: only for buffers the kernel does not write.
template <typename T>
__device__ __forceinline__ void load_vec_ro(const T* p, float (&out)[DType<T>::kVec]) {
  Vec16<T> u;
  u.raw = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int i = 0; i < DType<T>::kVec; ++i) out[i] = DType<T>::to_float(u.v[i]);
}

// Coherent load: safe when the same kernel later writes the same addresses (in-place).
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[DType<T>::kVec]) {
  Vec16<T> u;
  u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < DType<T>::kVec; ++i) out[i] = DType<T>::to_float(u.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[DType<T>::kVec]) {
  Vec16<T> u;
#pragma unroll
  for (int i = 0; i < DType<T>::kVec; ++i) u.v[i] = DType<T>::from_float(in[i]);
  *reinterpret_cast<uint4*>(p) = u.raw;
}

// True when rows starting at base + r * row_stride (elements of T) are all 16-byte aligned
// and hold a whole number of vectors, so the vectorised path may be used.
template <typename T>
inline bool rows_vectorizable(const void* base, int64_t row_stride, int64_t V) {
  constexpr int64_t n = DType<T>::kVec;
  return (reinterpret_cast<uintptr_t>(base) % 16 == 0) && (row_stride % n == 0) && (V % n == 0);
}

// ---- reductions --------------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide reduction of an arbitrary trivially-copyable state with a commutative,
// associative merge `merge(State&, const State&)`: a warp butterfly through shuffles, then
// one slot per warp in shared memory, reduced by warp 0. Every thread of the block must
// call it; the result is returned to every thread. `smem` needs kThreads / 32 slots plus
// one for the broadcast. Shuffles move the state as 32-bit words.
template <int kThreads, typename State, typename Merge>
__device__ __forceinline__ State block_reduce(State s, State* smem, Merge merge) {
  static_assert(kThreads % kWarpSize == 0, "block size must be a multiple of 32");
  static_assert(sizeof(State) % 4 == 0, "state must be a whole number of 32-bit words");
  constexpr int kWarps = kThreads / kWarpSize;
  static_assert((kWarps & (kWarps - 1)) == 0, "the warp count must be a power of two");
  constexpr int kWords = sizeof(State) / 4;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  // The state crosses lanes as 32-bit words through a union, which (with every index a
  // compile-time constant) stays in registers.
  union Words {
    State s;
    uint32_t w[kWords];
  };
  auto shuffle = [](const State& v, int offset) {
    Words in, out;
    in.s = v;
#pragma unroll
    for (int i = 0; i < kWords; ++i) out.w[i] = __shfl_xor_sync(0xffffffffu, in.w[i], offset);
    return out.s;
  };

#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) merge(s, shuffle(s, o));
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    State t = smem[lane < kWarps ? lane : 0];
    // Lanes past kWarps hold a duplicate of slot 0; merging it twice would be wrong for
    // sums, so only the first kWarps lanes take part in the butterfly below.
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o >>= 1) {
      const State other = shuffle(t, o);
      if (o < kWarps && lane < kWarps) merge(t, other);
    }
    if (lane == 0) smem[kWarps] = t;
  }
  __syncthreads();
  const State r = smem[kWarps];
  __syncthreads();  // smem may be reused right after
  return r;
}

}  // namespace cuda
}  // namespace llada
