// Structural checks of the C ABI's tensor views (csrc/validate.cpp), used by csrc/api.cpp.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/params.h"
#include "llada/llada.h"

#if defined(LLADA_EMU)
#include "emu/emu.h"
#endif

namespace llada {
namespace abi {

const char* dtype_name(int32_t dt);
bool is_float16ish(int32_t dt);
size_t dtype_size(int32_t dt);
void note_extent(const llada_tensor* t, const char* name);
bool extent_fits(const llada_tensor* t);
bool overlaps_itself_2d(const llada_tensor* t);
llada_status check_view(const llada_tensor* t, const char* name, int ndim);
llada_status check_dtype(const llada_tensor* t, const char* name, int32_t dtype);
llada_status check_shape(const llada_tensor* t, const char* name, int dim, int64_t expected);
int64_t numel(const llada_tensor* t);
llada_status check_inner_contiguous(const llada_tensor* t, const char* name);
llada_status check_same_device(const llada_tensor* a, const char* an, const llada_tensor* b,
                               const char* bn);
llada_status check_float_dtype(const llada_tensor* t, const char* name, bool attention);

// Executor build: notes the workspace as memory the kernels may touch and poisons it (0xff),
// so that a read of scratch no kernel wrote gives NaN rather than a lucky zero. No-op
// otherwise.
void note_workspace(void* workspace, size_t bytes);

// The CPU executor build (LLADA_EMU, csrc/emu) checks every global access of a kernel
// against the tensors of the C call that launched it: check_view notes each validated tensor
// with its byte extent, and CallScope clears the notes when a public entry point starts
// (entry points that call each other keep them).
#if defined(LLADA_EMU)
struct CallScope {
  static int& depth() {
    static thread_local int d = 0;
    return d;
  }
  CallScope() {
    if (depth()++ == 0) emu::begin_call();
  }
  ~CallScope() { --depth(); }
};
#define LLADA_CALL_SCOPE() CallScope call_scope_
#else
#define LLADA_CALL_SCOPE() \
  do {                     \
  } while (0)
#endif

}  // namespace abi
}  // namespace llada
