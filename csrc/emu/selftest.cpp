// Small kernels that each break one rule the executor checks, and correct controls beside
// them. python_tests/test_emu_checks.py runs every one through llada_ext._C_emu.selftest, so a
// checker that stops reporting (a lost instrumentation hook, a barrier that orders too much)
// fails the test suite instead of passing silently. Compiled only into the executor build,
// with the same instrumentation as the kernels of csrc/cuda.
#include <cuda_runtime.h>

#include <string>
#include <utility>
#include <vector>

#include "cuda/attention_common.cuh"
#include "cuda/cuda_utils.cuh"

namespace llada {
namespace emu {

namespace {

using cuda::launch_kernel;

// Thread 1 reads what thread 0 wrote to shared memory; with sync == 0 nothing orders them.
__global__ void race_kernel(int sync, float* out) {
  LLADA_SHARED_ARRAY(float, s, 32);
  if (threadIdx.x == 0) s[0] = 42.f;
  if (sync) __syncthreads();
  if (threadIdx.x == 1) out[0] = s[0];
}

// Each lane reads what the lane before it wrote: a __syncwarp orders the lanes of one warp
// without a block barrier.
__global__ void warp_sync_kernel(int sync, float* out) {
  LLADA_SHARED_ARRAY(float, s, 32);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncwarp();
  out[threadIdx.x] = s[threadIdx.x > 0 ? threadIdx.x - 1 : 0];
}

// Every thread reads the element after its own: the last one reads past the buffer.
__global__ void oob_global_kernel(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];
}

// 33 threads write one float each into 128 bytes of dynamic shared memory.
__global__ void oob_shared_kernel(float* out) {
  LLADA_DYNAMIC_SHARED(float, s);
  s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[0];
}

// Only s[0] is written; thread 1 reads s[1].
__global__ void uninit_kernel(float* out) {
  LLADA_SHARED_ARRAY(float, s, 32);
  if (threadIdx.x == 0) s[0] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Each thread copies 16 bytes with cp.async, then (wait == 0) reads its neighbour's bytes
// after the barrier without waiting for its copies to complete.
__global__ void cp_async_kernel(const float* in, int wait, float* out) {
  LLADA_DYNAMIC_SHARED(__align__(16) float, s);
  cuda::attn::cp_async_16(cuda::attn::smem_addr(s + 4 * threadIdx.x), in + 4 * threadIdx.x, true);
  cuda::attn::cp_async_commit();
  if (wait) cuda::attn::cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = s[4 * ((threadIdx.x + 1) % blockDim.x)];
}

// The first warp and the second wait at different __syncthreads.
__global__ void barrier_divergence_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// The second warp returns; the first waits at a __syncthreads it never reaches.
__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// The two halves of a warp call full-mask shuffles at different instructions.
__global__ void warp_divergence_kernel(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 2);
  }
}

// Legal: half the warp exits, the other half shuffles with a full mask (only non-exited lanes
// must take part); per-lane source lanes; xor within 16-lane segments.
__global__ void shuffles_kernel(float* out) {
  const unsigned lane = threadIdx.x;
  const float v = static_cast<float>(lane);
  out[32 + lane] = __shfl_sync(0xffffffffu, v, (lane + 1) & 31);
  out[64 + lane] = __shfl_xor_sync(0xffffffffu, v, 16, 16);  // a later segment: own value
  if (lane >= 16) return;
  out[lane] = __shfl_xor_sync(0xffffffffu, v, 1);
}

// Every block writes out[0]: nothing orders the blocks (a plain-store race); with
// atomics the blocks may meet, and out[0] counts them.
__global__ void blocks_kernel(int atomic, float* out) {
  if (threadIdx.x != 0) return;
  if (atomic) {
    atomicAdd(out, 1.f);
  } else {
    out[0] = static_cast<float>(blockIdx.x);
  }
}

// Writes out[i], then reads it back through the read-only (non-coherent) path.
__global__ void ldg_kernel(float* out) {
  out[threadIdx.x] = 1.f;
  out[threadIdx.x] += __ldg(out + threadIdx.x);
}

// A warp sum through shuffles and a block sum through shared memory (correct control).
__global__ void reduce_kernel(float* out) {
  LLADA_SHARED_ARRAY(float, s, 33);
  const float v = cuda::warp_sum(static_cast<float>(threadIdx.x));
  if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += s[w];
    out[0] = total;
  }
}

// One tensor-core tile through ldmatrix and mma.sync: D = A * B with A(m, k) = m - k and
// B(k, n) = k + n (bf16, exact), so D(m, n) = sum_k (m - k)(k + n); out gets D row-major.
__global__ void mma_kernel(float* out) {
  LLADA_DYNAMIC_SHARED(__align__(16) __nv_bfloat16, s);  // A [16][16], then B^T [8][16]
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) s[i] = __float2bfloat16_rn(float(i / 16 - i % 16));
  for (int i = lane; i < 8 * 16; i += 32) s[256 + i] = __float2bfloat16_rn(float(i / 16 + i % 16));
  __syncwarp();
  uint32_t a[4], b[4];
  cuda::attn::ldmatrix_x4(a, cuda::attn::smem_addr(s + (lane % 16) * 16 + (lane / 16) * 8));
  cuda::attn::ldmatrix_x4(b,
                          cuda::attn::smem_addr(s + 256 + (lane % 8) * 16 + (lane / 8) * 8 % 16));
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  cuda::attn::mma_16816<__nv_bfloat16>(d, a, b[0], b[1]);
  const int g = lane / 4, t = lane % 4;
  out[g * 8 + 2 * t] = d[0];
  out[g * 8 + 2 * t + 1] = d[1];
  out[(g + 8) * 8 + 2 * t] = d[2];
  out[(g + 8) * 8 + 2 * t + 1] = d[3];
}

struct Result {
  std::string report;
  std::vector<float> out;
};

template <typename... P, typename... A>
Result run(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
           std::vector<float>& in, size_t nout, A... args) {
  Result r;
  r.out.assign(nout, 0.f);
  begin_call();
  note_global(in.data(), in.size() * sizeof(float), "in");
  note_global(r.out.data(), nout * sizeof(float), "out");
  launch_kernel(name, kernel, grid, block, smem, nullptr, args..., r.out.data());
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) r.report = cudaGetErrorString(e);
  begin_call();
  return r;
}

}  // namespace

std::vector<std::string> selftest_names() {
  return {"race",
          "race_synced",
          "warp_race",
          "warp_synced",
          "oob_global",
          "oob_shared",
          "uninit",
          "cp_async_unwaited",
          "cp_async_waited",
          "barrier_divergence",
          "warp_divergence",
          "reduce",
          "mma",
          "block_too_large",
          "smem_without_optin",
          "global_race",
          "global_atomics",
          "ldg_written",
          "barrier_after_exit",
          "shuffles"};
}

// Runs one self-test kernel; returns (the executor's report, or "" if none; the output).
std::pair<std::string, std::vector<float>> selftest(const std::string& name) {
  std::vector<float> in(32 * 4);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i);
  const float* pin = in.data();
  Result r;
  if (name == "race" || name == "race_synced") {
    r = run("race_kernel", race_kernel, 1, 64, 0, in, 1, name == "race_synced" ? 1 : 0);
  } else if (name == "warp_race" || name == "warp_synced") {
    r = run("warp_sync_kernel", warp_sync_kernel, 1, 32, 0, in, 32, name == "warp_synced" ? 1 : 0);
  } else if (name == "oob_global") {
    // `in` is noted with 32 floats only, so thread 31 reads one element past it.
    in.resize(32);
    r = run("oob_global_kernel", oob_global_kernel, 1, 32, 0, in, 32, pin);
  } else if (name == "oob_shared") {
    r = run("oob_shared_kernel", oob_shared_kernel, 1, 33, 128, in, 33);
  } else if (name == "uninit") {
    r = run("uninit_kernel", uninit_kernel, 1, 32, 0, in, 32);
  } else if (name == "cp_async_unwaited" || name == "cp_async_waited") {
    r = run("cp_async_kernel", cp_async_kernel, 1, 32, 32 * 16, in, 32, pin,
            name == "cp_async_waited" ? 1 : 0);
  } else if (name == "barrier_divergence") {
    r = run("barrier_divergence_kernel", barrier_divergence_kernel, 1, 64, 0, in, 64);
  } else if (name == "barrier_after_exit") {
    r = run("barrier_after_exit_kernel", barrier_after_exit_kernel, 1, 64, 0, in, 64);
  } else if (name == "warp_divergence") {
    r = run("warp_divergence_kernel", warp_divergence_kernel, 1, 32, 0, in, 32);
  } else if (name == "shuffles") {
    r = run("shuffles_kernel", shuffles_kernel, 1, 32, 0, in, 96);
  } else if (name == "reduce") {
    r = run("reduce_kernel", reduce_kernel, 1, 256, 0, in, 1);
  } else if (name == "mma") {
    r = run("mma_kernel", mma_kernel, 1, 32, (256 + 128) * 2, in, 128);
  } else if (name == "global_race" || name == "global_atomics") {
    r = run("blocks_kernel", blocks_kernel, 3, 32, 0, in, 1, name == "global_atomics" ? 1 : 0);
  } else if (name == "ldg_written") {
    r = run("ldg_kernel", ldg_kernel, 1, 32, 0, in, 32);
  } else if (name == "block_too_large") {
    r = run("reduce_kernel", reduce_kernel, 1, 2048, 0, in, 1);
  } else if (name == "smem_without_optin") {
    r = run("oob_shared_kernel", oob_shared_kernel, 1, 32, 64 * 1024, in, 32);
  } else {
    return {"unknown self-test " + name, {}};
  }
  return {r.report, r.out};
}

}  // namespace emu
}  // namespace llada
