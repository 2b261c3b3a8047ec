// Structural checks of the C ABI's tensor views, shared by every entry point of csrc/api.cpp:
// dtypes, ranks, sizes whose arithmetic must not overflow, strides, devices. Each check turns
// bad input into a status and a message naming the argument.
#include "validate.h"

#include <stdint.h>
#include <string.h>

#if defined(LLADA_EMU)
#include "emu/emu.h"
#endif

namespace llada {
namespace abi {

const char* dtype_name(int32_t dt) {
  switch (dt) {
    case LLADA_FLOAT32: return "float32";
    case LLADA_FLOAT16: return "float16";
    case LLADA_BFLOAT16: return "bfloat16";
    case LLADA_FLOAT64: return "float64";
    case LLADA_INT64: return "int64";
    case LLADA_INT32: return "int32";
    case LLADA_BOOL: return "bool";
    default: return "unknown";
  }
}

bool is_float16ish(int32_t dt) {
  return dt == LLADA_FLOAT16 || dt == LLADA_BFLOAT16;
}

// Bytes per element of a dtype.
size_t dtype_size(int32_t dt) {
  switch (dt) {
    case LLADA_FLOAT16:
    case LLADA_BFLOAT16: return 2;
    case LLADA_FLOAT32:
    case LLADA_INT32: return 4;
    case LLADA_FLOAT64:
    case LLADA_INT64: return 8;
    default: return 1;
  }
}

// The executor build (LLADA_EMU) notes each validated tensor with its byte extent: every
// global access of a kernel must fall inside the tensors of the call (see validate.h).
#if defined(LLADA_EMU)
void note_extent(const llada_tensor* t, const char* name) {
  int64_t lo = 0, hi = 0;
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] == 0) return;
    const int64_t span = (t->shape[i] - 1) * t->strides[i];
    (span < 0 ? lo : hi) += span;
  }
  const int64_t es = static_cast<int64_t>(dtype_size(t->dtype));
  emu::note_global(static_cast<const char*>(t->data) + lo * es,
                   static_cast<size_t>((hi - lo + 1) * es), name);
}
#endif

void note_workspace(void* workspace, size_t bytes) {
#if defined(LLADA_EMU)
  emu::note_global(workspace, bytes, "workspace");
  if (workspace != nullptr) memset(workspace, 0xff, bytes);
#else
  (void)workspace;
  (void)bytes;
#endif
}

// True when the element count and the byte span of a non-empty view fit in int64, so that
// no size or offset computed from it (here or in a kernel) can overflow.
bool extent_fits(const llada_tensor* t) {
  int64_t numel = 1, span = 0;
  for (int i = 0; i < t->ndim; ++i) {
    const int64_t st = t->strides[i];
    if (st == INT64_MIN) return false;
    int64_t reach;
    if (__builtin_mul_overflow(numel, t->shape[i], &numel) ||
        __builtin_mul_overflow(t->shape[i] - 1, st < 0 ? -st : st, &reach) ||
        __builtin_add_overflow(span, reach, &span))
      return false;
  }
  int64_t bytes;
  return !__builtin_add_overflow(span, int64_t(1), &span) &&
         !__builtin_mul_overflow(span, static_cast<int64_t>(dtype_size(t->dtype)), &bytes);
}

// True when two elements of a non-empty 2-D view may share memory: a stride of 0 on a
// dimension of size > 1, or an outer stride shorter than the inner dimension's span.
bool overlaps_itself_2d(const llada_tensor* t) {
  int64_t size[2] = {t->shape[0], t->shape[1]};
  int64_t st[2] = {t->strides[0] < 0 ? -t->strides[0] : t->strides[0],
                   t->strides[1] < 0 ? -t->strides[1] : t->strides[1]};
  if (size[0] == 0 || size[1] == 0) return false;
  const int inner = st[0] <= st[1] ? 0 : 1, outer = 1 - inner;
  if (size[inner] > 1 && st[inner] == 0) return true;
  if (size[outer] <= 1) return false;
  if (size[inner] <= 1) return st[outer] == 0;
  return st[outer] / size[inner] < st[inner];  // st[outer] < size[inner] * st[inner]
}

// Structural checks shared by every tensor argument.
llada_status check_view(const llada_tensor* t, const char* name, int ndim) {
  if (t == nullptr) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "%s: null tensor pointer", name);
  if (t->ndim != ndim)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "%s: expected %d dimensions, got %d", name, ndim,
                     t->ndim);
  if (t->device_type != LLADA_CPU && t->device_type != LLADA_CUDA)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "%s: unknown device_type %d", name,
                     t->device_type);
  if (t->dtype < LLADA_FLOAT32 || t->dtype > LLADA_BOOL)
    return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE, "%s: unknown dtype %d", name, t->dtype);
  bool empty = false;
  for (int i = 0; i < ndim; ++i) {
    if (t->shape[i] < 0)
      return set_error(LLADA_ERROR_INVALID_ARGUMENT, "%s: negative size %lld in dimension %d", name,
                       (long long)t->shape[i], i);
    empty |= t->shape[i] == 0;
  }
  if (empty) return LLADA_OK;  // nothing is read or written
  if (!extent_fits(t))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "%s: its shape and strides address more than 2^63 bytes (size overflow)",
                     name);
  if (t->data == nullptr)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "%s: null data pointer", name);
#if defined(LLADA_EMU)
  note_extent(t, name);
#endif
  return LLADA_OK;
}

llada_status check_dtype(const llada_tensor* t, const char* name, int32_t dtype) {
  if (t->dtype != dtype)
    return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE, "%s: expected dtype %s, got %s", name,
                     dtype_name(dtype), dtype_name(t->dtype));
  return LLADA_OK;
}

llada_status check_shape(const llada_tensor* t, const char* name, int dim, int64_t expected) {
  if (t->shape[dim] != expected)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "%s: size %lld in dimension %d, expected %lld",
                     name, (long long)t->shape[dim], dim, (long long)expected);
  return LLADA_OK;
}

int64_t numel(const llada_tensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

llada_status check_inner_contiguous(const llada_tensor* t, const char* name) {
  if (t->ndim > 0 && numel(t) > 0 && t->shape[t->ndim - 1] > 1 && t->strides[t->ndim - 1] != 1)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "%s: the last dimension must be contiguous (stride 1), got stride %lld", name,
                     (long long)t->strides[t->ndim - 1]);
  return LLADA_OK;
}

llada_status check_same_device(const llada_tensor* a, const char* an, const llada_tensor* b,
                               const char* bn) {
  if (a->device_type != b->device_type ||
      (a->device_type == LLADA_CUDA && a->device_id != b->device_id))
    return set_error(LLADA_ERROR_DEVICE_MISMATCH, "%s and %s are on different devices", an, bn);
  return LLADA_OK;
}

// Dtypes the kernels of each device support for their floating-point tensors.
llada_status check_float_dtype(const llada_tensor* t, const char* name, bool attention) {
  const int32_t dt = t->dtype;
  bool ok;
  if (t->device_type == LLADA_CPU) {
    ok = dt == LLADA_FLOAT32 || dt == LLADA_BFLOAT16 || (!attention && dt == LLADA_FLOAT16);
  } else {
    ok = is_float16ish(dt) || (!attention && dt == LLADA_FLOAT32);
  }
  if (!ok)
    return set_error(LLADA_ERROR_UNSUPPORTED_DTYPE, "%s: dtype %s is not supported on %s", name,
                     dtype_name(dt), t->device_type == LLADA_CPU ? "the CPU" : "CUDA");
  return LLADA_OK;
}

}  // namespace abi
}  // namespace llada
