// The CUDA execution model on the CPU: what the kernel sources in csrc/cuda see when they are
// compiled by the host compiler for the executor (-DLLADA_EMU=1, with csrc/emu/include ahead
// of the CUDA headers). Nothing here is a copy of a kernel; it is the device the kernels run
// on:
//   - the CUDA keywords and built-in variables (threadIdx, blockIdx, blockDim, gridDim);
//   - __syncthreads, __syncwarp and warp shuffles, which rendezvous real concurrent threads
//     (one fiber per CUDA thread, see executor.cpp);
//   - the PTX wrappers' host twins: cp.async groups, ldmatrix, mma.sync m16n8k16;
//   - float16 / bfloat16 storage types with the device's conversions;
//   - the few CUDA runtime calls the launchers make, and the launch itself.
// Every global and shared memory access the kernels make is checked by the executor: the
// kernel translation units are compiled with -fsanitize=thread, whose load/store hooks the
// executor implements itself (bounds, shared-memory races, uninitialised and in-flight
// cp.async reads). See csrc/emu/README.md.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "common/dtypes.h"

// ---- keywords ----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- vector and index types --------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) {
  return float2{x, y};
}

// ---- 16-bit float storage types (conversions round to nearest even, as the device does) ---
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  return ::llada::fp16_to_float(h.x);
}
inline __half __float2half_rn(float f) {
  return __half{::llada::float_to_fp16(f)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  return ::llada::bf16_to_float(h.x);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{::llada::float_to_bf16(f)};
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{__float2half_rn(lo), __float2half_rn(hi)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---- arithmetic intrinsics ---------------------------------------------------------------
inline float __expf(float x) {
  return expf(x);
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}
inline float __fsub_rn(float a, float b) {
  return a - b;
}
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline long long min(long long a, long long b) {
  return a < b ? a : b;
}
inline long long max(long long a, long long b) {
  return a > b ? a : b;
}
inline long min(long a, long b) {
  return a < b ? a : b;
}
inline long max(long a, long b) {
  return a > b ? a : b;
}

// Read-only (non-coherent) global load: checked as such, then an ordinary load.
namespace llada {
namespace emu {
void read_only_load(const void* p, size_t bytes);
}
}  // namespace llada
template <typename T>
inline T __ldg(const T* p) {
  ::llada::emu::read_only_load(p, sizeof(T));
  return *p;
}

// ---- the CUDA runtime subset the launchers use ---------------------------------------------
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace llada {
namespace emu {

// Limits of the emulated device (those of an sm_80 A100, the smallest the library targets).
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultSharedBytes = 48 * 1024;
constexpr int kMaxSharedBytesOptin = 163 * 1024;

cudaError_t get_last_error();
const char* error_string(cudaError_t e);
cudaError_t func_set_attribute(const void* func, int attr, int value);

// Built-in variables.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// Synchronisation and warp collectives. `site` names the source line, for reports.
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
uint64_t shfl(unsigned mask, uint64_t value, int bytes, int mode, int arg, int width,
              const char* file, int line);
enum ShflMode { kShflXor = 0, kShflIdx = 1, kShflDown = 2, kShflUp = 3 };

// Shared memory: the dynamic array of the launch, and the static __shared__ arrays (one per
// source line, allocated when the first thread of a block reaches it).
void* dynamic_shared();
void* static_shared(size_t bytes, size_t align, const void* key, const char* file, int line);
uint32_t shared_address(const void* p, const char* file, int line);

// PTX twins.
void cp_async_16(uint32_t dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix(uint32_t* regs, int count, uint32_t addr, bool trans);
void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16);
float atomic_add(float* address, float value);
float2 atomic_add2(float2* address, float2 value);
void read_only_load(const void* p, size_t bytes);

// The launch: runs every block of the grid on the executor, synchronously, and records the
// first failure (a configuration error or a checker report) for get_last_error().
using Entry = void (*)(const void* ctx);
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, Entry entry,
              const void* ctx);
// Entered by each thread before the kernel body runs and left after it returns: only the
// memory accesses in between are the kernel's own (the argument copy before is not).
void begin_kernel_body();
void end_kernel_body();

template <typename... P>
struct LaunchArgs {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;
};

template <typename... P>
void thread_entry(const void* ctx) {
  const auto* la = static_cast<const LaunchArgs<P...>*>(ctx);
  // Each thread gets its own copy of the arguments on its stack, as parameters live in
  // per-thread state on the device.
  std::tuple<std::decay_t<P>...> args = la->args;
  auto kernel = la->kernel;
  begin_kernel_body();
  std::apply(kernel, args);
  end_kernel_body();
}

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
            cudaStream_t /*stream*/, A&&... args) {
  const LaunchArgs<P...> la{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem, &thread_entry<P...>,
           &la);
}

// Tensor extents a C entry point hands to the kernels it launches: every global access of
// a kernel must fall inside one of them (see api.cpp).
void begin_call();
void note_global(const void* base, size_t bytes, const char* name);

}  // namespace emu
}  // namespace llada

inline cudaError_t cudaGetLastError() {
  return ::llada::emu::get_last_error();
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return ::llada::emu::error_string(e);
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// The executor is one device of a CUDA 13.0 runtime with a driver to match.
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = ::llada::emu::kMaxSharedBytesOptin;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return ::llada::emu::func_set_attribute(reinterpret_cast<const void*>(func),
                                          static_cast<int>(attr), value);
}

// ---- built-in variables and device functions ------------------------------------------
#define threadIdx (::llada::emu::thread_idx())
#define blockIdx (::llada::emu::block_idx())
#define blockDim (::llada::emu::block_dim())
#define gridDim (::llada::emu::grid_dim())
#define __syncthreads() ::llada::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) llada_emu_syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __cvta_generic_to_shared(p) ::llada::emu::shared_address((p), __FILE__, __LINE__)

inline void llada_emu_syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  ::llada::emu::syncwarp(mask, file, line);
}

template <typename T>
inline T llada_emu_shfl(const char* file, int line, int mode, unsigned mask, T v, int arg,
                        int width = 32) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = ::llada::emu::shfl(mask, bits, sizeof(T), mode, arg, width, file, line);
  memcpy(&v, &bits, sizeof(T));
  return v;
}
#define __shfl_xor_sync(...) llada_emu_shfl(__FILE__, __LINE__, ::llada::emu::kShflXor, __VA_ARGS__)
#define __shfl_sync(...) llada_emu_shfl(__FILE__, __LINE__, ::llada::emu::kShflIdx, __VA_ARGS__)
#define __shfl_down_sync(...) \
  llada_emu_shfl(__FILE__, __LINE__, ::llada::emu::kShflDown, __VA_ARGS__)
#define __shfl_up_sync(...) llada_emu_shfl(__FILE__, __LINE__, ::llada::emu::kShflUp, __VA_ARGS__)

inline float atomicAdd(float* address, float value) {
  return ::llada::emu::atomic_add(address, value);
}
inline float2 atomicAdd(float2* address, float2 value) {
  return ::llada::emu::atomic_add2(address, value);
}
