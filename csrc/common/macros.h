// Shared by the CPU (.cpp) and CUDA (.cu) kernels: one definition for both devices.
#pragma once

#if defined(__CUDACC__)
#define LLADA_HD __host__ __device__ __forceinline__
#else
#define LLADA_HD inline
#endif
