// Host stand-in for <cuda_runtime.h> in the executor build (csrc/emu): the CUDA kernel sources
// include the real header under nvcc and this one under the host compiler.
#pragma once
#include "emu/emu.h"
