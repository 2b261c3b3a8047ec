// The C ABI: validates tensor views, fills the plain params structs and dispatches to the
// CPU (llada::cpu) or CUDA (llada::cuda) kernels. Every check here turns bad input into a
// status code and a message; the kernels below may assume valid, consistent arguments.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include <string>

#include "common/params.h"
#include "llada/llada.h"
#include "validate.h"

#ifdef LLADA_WITH_CUDA
#include <cuda_runtime.h>
#endif
#if defined(LLADA_EMU)
#include "emu/emu.h"
#endif

namespace llada {

namespace {
thread_local std::string g_last_error;
}

llada_status set_error(llada_status status, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  g_last_error = buf;
  return status;
}

namespace {

using namespace abi;

#define LLADA_TRY(expr)             \
  do {                              \
    const llada_status _s = (expr); \
    if (_s != LLADA_OK) return _s;  \
  } while (0)

// Runs the CUDA branch on the tensors' device, restoring the caller's current device.
#ifdef LLADA_WITH_CUDA
struct DeviceGuard {
  int prev = -1;
  bool changed = false;
  llada_status status = LLADA_OK;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev) != cudaSuccess) {
      cudaGetLastError();
      status = set_error(LLADA_ERROR_CUDA, "no usable CUDA device");
      return;
    }
    if (prev != device) {
      const cudaError_t e = cudaSetDevice(device);
      if (e != cudaSuccess) {
        cudaGetLastError();  // clear it so the launch checks of later calls do not see it
        status =
            set_error(LLADA_ERROR_CUDA, "cudaSetDevice(%d): %s", device, cudaGetErrorString(e));
        return;
      }
      changed = true;
    }
  }
  ~DeviceGuard() {
    if (changed) cudaSetDevice(prev);
  }
};
#endif

template <typename Params, typename CpuFn, typename CudaFn>
llada_status dispatch(const llada_tensor* any, const Params& p, CpuFn cpu_fn, CudaFn cuda_fn) {
#if defined(LLADA_EMU)
  (void)cpu_fn;
  if (any->device_type == LLADA_CPU) {
    return set_error(LLADA_ERROR_NOT_COMPILED,
                     "this build runs the CUDA kernels on the CPU executor: pass tensors whose "
                     "device_type is CUDA (their memory is host memory)");
  }
#else
  if (any->device_type == LLADA_CPU) return cpu_fn(p);
#endif
#ifdef LLADA_WITH_CUDA
  DeviceGuard guard(any->device_id);
  if (guard.status != LLADA_OK) return guard.status;
  return cuda_fn(p);
#else
  (void)cuda_fn;
  return set_error(LLADA_ERROR_NOT_COMPILED,
                   "a CUDA tensor was passed but this build of the library has no CUDA kernels");
#endif
}

BSHStrides bsh(const llada_tensor* t) {
  return BSHStrides{t->strides[0], t->strides[1], t->strides[2]};
}

llada_status check_attention_inputs(const llada_tensor* q, const llada_tensor* k,
                                    const llada_tensor* v, const llada_tensor* mask, float scale,
                                    AttnFwdParams* p) {
  LLADA_TRY(check_view(q, "q", 4));
  LLADA_TRY(check_view(k, "k", 4));
  LLADA_TRY(check_view(v, "v", 4));
  LLADA_TRY(check_same_device(q, "q", k, "k"));
  LLADA_TRY(check_same_device(q, "q", v, "v"));
  LLADA_TRY(check_float_dtype(q, "q", true));
  LLADA_TRY(check_dtype(k, "k", q->dtype));
  LLADA_TRY(check_dtype(v, "v", q->dtype));
  LLADA_TRY(check_inner_contiguous(q, "q"));
  LLADA_TRY(check_inner_contiguous(k, "k"));
  LLADA_TRY(check_inner_contiguous(v, "v"));
  const int64_t B = q->shape[0], Sq = q->shape[1], Hq = q->shape[2], D = q->shape[3];
  const int64_t Sk = k->shape[1], Hkv = k->shape[2];
  LLADA_TRY(check_shape(k, "k", 0, B));
  LLADA_TRY(check_shape(k, "k", 3, D));
  for (int i = 0; i < 4; ++i) LLADA_TRY(check_shape(v, "v", i, k->shape[i]));
  if (Hkv <= 0 || Hq % Hkv != 0)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "k: number of key/value heads (%lld) must divide the query heads (%lld)",
                     (long long)Hkv, (long long)Hq);
  if (D <= 0) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "q: head dimension must be > 0");
  if (q->device_type == LLADA_CUDA && (D % 8 != 0 || D > 256))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "q: head dimension %lld unsupported on CUDA (need a multiple of 8, <= 256)",
                     (long long)D);
  if (!isfinite(scale)) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "scale must be finite");
  if (mask != nullptr) {
    LLADA_TRY(check_view(mask, "key_padding_mask", 2));
    LLADA_TRY(check_same_device(q, "q", mask, "key_padding_mask"));
    LLADA_TRY(check_dtype(mask, "key_padding_mask", LLADA_BOOL));
    LLADA_TRY(check_shape(mask, "key_padding_mask", 0, B));
    LLADA_TRY(check_shape(mask, "key_padding_mask", 1, Sk));
  }
  *p = AttnFwdParams{};
  p->dtype = static_cast<llada_dtype>(q->dtype);
  p->q = q->data;
  p->k = k->data;
  p->v = v->data;
  p->key_padding_mask = mask ? static_cast<const uint8_t*>(mask->data) : nullptr;
  p->B = B;
  p->Sq = Sq;
  p->Sk = Sk;
  p->Hq = Hq;
  p->Hkv = Hkv;
  p->D = D;
  p->q_st = bsh(q);
  p->k_st = bsh(k);
  p->v_st = bsh(v);
  p->kpm_sb = mask ? mask->strides[0] : 0;
  p->kpm_ss = mask ? mask->strides[1] : 0;
  p->scale = scale;
  return LLADA_OK;
}

llada_status check_like(const llada_tensor* t, const char* name, const llada_tensor* ref,
                        const char* refname) {
  LLADA_TRY(check_view(t, name, ref->ndim));
  LLADA_TRY(check_same_device(ref, refname, t, name));
  LLADA_TRY(check_dtype(t, name, ref->dtype));
  for (int i = 0; i < ref->ndim; ++i) LLADA_TRY(check_shape(t, name, i, ref->shape[i]));
  return LLADA_OK;
}

llada_status check_lse(const llada_tensor* lse, const llada_tensor* q) {
  LLADA_TRY(check_view(lse, "lse", 3));
  LLADA_TRY(check_same_device(q, "q", lse, "lse"));
  LLADA_TRY(check_dtype(lse, "lse", LLADA_FLOAT32));
  LLADA_TRY(check_shape(lse, "lse", 0, q->shape[0]));
  LLADA_TRY(check_shape(lse, "lse", 1, q->shape[2]));
  LLADA_TRY(check_shape(lse, "lse", 2, q->shape[1]));
  return LLADA_OK;
}

llada_status check_vector(const llada_tensor* t, const char* name, int32_t dtype, int64_t n,
                          const llada_tensor* ref, const char* refname) {
  LLADA_TRY(check_view(t, name, 1));
  LLADA_TRY(check_same_device(ref, refname, t, name));
  LLADA_TRY(check_dtype(t, name, dtype));
  LLADA_TRY(check_shape(t, name, 0, n));
  return LLADA_OK;
}

llada_status check_ce_inputs(const llada_tensor* logits, const llada_tensor* targets,
                             const llada_tensor* weights, CEParams* p) {
  LLADA_TRY(check_view(logits, "logits", 2));
  LLADA_TRY(check_float_dtype(logits, "logits", false));
  LLADA_TRY(check_inner_contiguous(logits, "logits"));
  const int64_t N = logits->shape[0], V = logits->shape[1];
  if (V <= 0) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "logits: vocabulary size must be > 0");
  LLADA_TRY(check_vector(targets, "targets", LLADA_INT64, N, logits, "logits"));
  LLADA_TRY(check_vector(weights, "weights", LLADA_FLOAT32, N, logits, "logits"));
  *p = CEParams{};
  p->dtype = static_cast<llada_dtype>(logits->dtype);
  p->logits = logits->data;
  p->logits_rs = logits->strides[0];
  p->targets = static_cast<const int64_t*>(targets->data);
  p->targets_s = targets->strides[0];
  p->weights = static_cast<const float*>(weights->data);
  p->weights_s = weights->strides[0];
  p->N = N;
  p->V = V;
  return LLADA_OK;
}

// The attention workspace queries: the same checks, then `size` of the shapes (B, Sq, Hq, Sk,
// Hkv, D) for CUDA tensors; the CPU kernels need no workspace.
using AttnSizeFn = size_t (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
llada_status attention_workspace_query(const llada_tensor* q, const llada_tensor* k, size_t* bytes,
                                       AttnSizeFn size) {
  if (bytes == nullptr) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "bytes: null pointer");
  LLADA_TRY(check_view(q, "q", 4));
  LLADA_TRY(check_view(k, "k", 4));
  LLADA_TRY(check_same_device(q, "q", k, "k"));
  *bytes = 0;
  if (q->device_type == LLADA_CUDA && size != nullptr)
    *bytes = size(q->shape[0], q->shape[1], q->shape[2], k->shape[1], k->shape[2], q->shape[3]);
  return LLADA_OK;
}

}  // namespace
}  // namespace llada

using namespace llada;

extern "C" {

const char* llada_last_error(void) {
  return g_last_error.c_str();
}

int llada_version(void) {
  return LLADA_VERSION;
}

const char* llada_blas_info(void) {
#if defined(LLADA_EMU)
  return "none (the executor build runs the CUDA kernels only)";
#else
  return cpu::blas_description();
#endif
}

int llada_has_cuda(void) {
#ifdef LLADA_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

llada_status llada_cuda_status(void) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
#ifdef LLADA_WITH_CUDA
  int runtime = 0, driver = 0, devices = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);  // 0 when no driver is installed
  const cudaError_t e = cudaGetDeviceCount(&devices);
  cudaGetLastError();  // a failed query must not linger as the next launch's error
  if (e != cudaSuccess || devices == 0) {
    char drv[96] = "no NVIDIA driver is installed";
    if (driver > 0)
      snprintf(drv, sizeof drv, "the installed driver supports CUDA %d.%d", driver / 1000,
               (driver % 1000) / 10);
    return set_error(LLADA_ERROR_CUDA, "%s (the library's CUDA runtime is %d.%d; %s)",
                     e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device", runtime / 1000,
                     (runtime % 1000) / 10, drv);
  }
  return LLADA_OK;
#else
  return set_error(LLADA_ERROR_NOT_COMPILED, "the library was built without the CUDA kernels");
#endif
}

const char* llada_status_string(llada_status status) {
  switch (status) {
    case LLADA_OK: return "LLADA_OK";
    case LLADA_ERROR_INVALID_ARGUMENT: return "LLADA_ERROR_INVALID_ARGUMENT";
    case LLADA_ERROR_UNSUPPORTED_DTYPE: return "LLADA_ERROR_UNSUPPORTED_DTYPE";
    case LLADA_ERROR_DEVICE_MISMATCH: return "LLADA_ERROR_DEVICE_MISMATCH";
    case LLADA_ERROR_NOT_COMPILED: return "LLADA_ERROR_NOT_COMPILED";
    case LLADA_ERROR_CUDA: return "LLADA_ERROR_CUDA";
    case LLADA_ERROR_INSUFFICIENT_WORKSPACE: return "LLADA_ERROR_INSUFFICIENT_WORKSPACE";
    case LLADA_ERROR_INTERNAL: return "LLADA_ERROR_INTERNAL";
  }
  return "LLADA_ERROR_UNKNOWN";
}

llada_status llada_attention_fwd(const llada_tensor* q, const llada_tensor* k,
                                 const llada_tensor* v, const llada_tensor* key_padding_mask,
                                 float scale, llada_tensor* out, llada_tensor* lse, void* stream) {
  return llada_attention_fwd_ws(q, k, v, key_padding_mask, scale, out, lse, nullptr, 0, stream);
}

llada_status llada_attention_fwd_workspace_size(const llada_tensor* q, const llada_tensor* k,
                                                size_t* bytes) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
#ifdef LLADA_WITH_CUDA
  return attention_workspace_query(q, k, bytes, cuda::attention_fwd_workspace_size);
#else
  return attention_workspace_query(q, k, bytes, nullptr);
#endif
}

llada_status llada_attention_fwd_ws(const llada_tensor* q, const llada_tensor* k,
                                    const llada_tensor* v, const llada_tensor* key_padding_mask,
                                    float scale, llada_tensor* out, llada_tensor* lse,
                                    void* workspace, size_t workspace_bytes, void* stream) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
  AttnFwdParams p;
  LLADA_TRY(check_attention_inputs(q, k, v, key_padding_mask, scale, &p));
  LLADA_TRY(check_like(out, "out", q, "q"));
  LLADA_TRY(check_inner_contiguous(out, "out"));
  LLADA_TRY(check_lse(lse, q));
  if (workspace != nullptr) {
    size_t need = 0;
    LLADA_TRY(llada_attention_fwd_workspace_size(q, k, &need));
    if (workspace_bytes < need)
      return set_error(LLADA_ERROR_INSUFFICIENT_WORKSPACE,
                       "workspace: %zu bytes given, %zu needed "
                       "(llada_attention_fwd_workspace_size)",
                       workspace_bytes, need);
    if (need > 0) {  // a workspace the plan does not use is simply not touched
      p.workspace = workspace;
      p.workspace_bytes = workspace_bytes;
      note_workspace(workspace, workspace_bytes);
    }
  }
  p.out = out->data;
  p.out_st = bsh(out);
  p.lse = static_cast<float*>(lse->data);
  p.lse_sb = lse->strides[0];
  p.lse_sh = lse->strides[1];
  p.lse_ss = lse->strides[2];
  p.stream = stream;
  if (p.B == 0 || p.Sq == 0 || p.Hq == 0) return LLADA_OK;
  return dispatch(q, p, cpu::attention_fwd, [](const AttnFwdParams& pp) {
#ifdef LLADA_WITH_CUDA
    return cuda::attention_fwd(pp);
#else
    return LLADA_ERROR_NOT_COMPILED;
#endif
  });
}

llada_status llada_attention_bwd_workspace_size(const llada_tensor* q, const llada_tensor* k,
                                                size_t* bytes) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
#ifdef LLADA_WITH_CUDA
  return attention_workspace_query(q, k, bytes, cuda::attention_bwd_workspace_size);
#else
  return attention_workspace_query(q, k, bytes, nullptr);
#endif
}

llada_status llada_attention_bwd(const llada_tensor* q, const llada_tensor* k,
                                 const llada_tensor* v, const llada_tensor* key_padding_mask,
                                 const llada_tensor* out, const llada_tensor* dout,
                                 const llada_tensor* lse, float scale, llada_tensor* dq,
                                 llada_tensor* dk, llada_tensor* dv, void* workspace,
                                 size_t workspace_bytes, void* stream) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
  AttnBwdParams p{};
  LLADA_TRY(check_attention_inputs(q, k, v, key_padding_mask, scale, &p.fwd));
  LLADA_TRY(check_like(out, "out", q, "q"));
  LLADA_TRY(check_like(dout, "dout", q, "q"));
  LLADA_TRY(check_like(dq, "dq", q, "q"));
  LLADA_TRY(check_like(dk, "dk", k, "k"));
  LLADA_TRY(check_like(dv, "dv", v, "v"));
  LLADA_TRY(check_inner_contiguous(out, "out"));
  LLADA_TRY(check_inner_contiguous(dout, "dout"));
  LLADA_TRY(check_inner_contiguous(dq, "dq"));
  LLADA_TRY(check_inner_contiguous(dk, "dk"));
  LLADA_TRY(check_inner_contiguous(dv, "dv"));
  LLADA_TRY(check_lse(lse, q));
  size_t need = 0;
  LLADA_TRY(llada_attention_bwd_workspace_size(q, k, &need));
  if (workspace_bytes < need || (need > 0 && workspace == nullptr))
    return set_error(LLADA_ERROR_INSUFFICIENT_WORKSPACE,
                     "workspace: %zu bytes given, %zu needed (llada_attention_bwd_workspace_size)",
                     workspace_bytes, need);
  p.fwd.out = out->data;
  p.fwd.out_st = bsh(out);
  p.fwd.lse = static_cast<float*>(lse->data);
  p.fwd.lse_sb = lse->strides[0];
  p.fwd.lse_sh = lse->strides[1];
  p.fwd.lse_ss = lse->strides[2];
  p.fwd.stream = stream;
  p.dout = dout->data;
  p.dq = dq->data;
  p.dk = dk->data;
  p.dv = dv->data;
  p.dout_st = bsh(dout);
  p.dq_st = bsh(dq);
  p.dk_st = bsh(dk);
  p.dv_st = bsh(dv);
  p.workspace = workspace;
  p.workspace_bytes = workspace_bytes;
  note_workspace(workspace, workspace_bytes);
  return dispatch(q, p, cpu::attention_bwd, [](const AttnBwdParams& pp) {
#ifdef LLADA_WITH_CUDA
    return cuda::attention_bwd(pp);
#else
    return LLADA_ERROR_NOT_COMPILED;
#endif
  });
}

llada_status llada_masked_ce_fwd(const llada_tensor* logits, const llada_tensor* targets,
                                 const llada_tensor* weights, llada_tensor* loss, llada_tensor* lse,
                                 void* stream) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
  CEParams p;
  LLADA_TRY(check_ce_inputs(logits, targets, weights, &p));
  LLADA_TRY(check_vector(loss, "loss", LLADA_FLOAT32, p.N, logits, "logits"));
  p.loss = static_cast<float*>(loss->data);
  p.loss_s = loss->strides[0];
  if (lse != nullptr) {
    LLADA_TRY(check_vector(lse, "lse", LLADA_FLOAT32, p.N, logits, "logits"));
    p.lse = static_cast<float*>(lse->data);
    p.lse_s = lse->strides[0];
  }
  p.stream = stream;
  if (p.N == 0) return LLADA_OK;
  return dispatch(logits, p, cpu::masked_ce_fwd, [](const CEParams& pp) {
#ifdef LLADA_WITH_CUDA
    return cuda::masked_ce_fwd(pp);
#else
    return LLADA_ERROR_NOT_COMPILED;
#endif
  });
}

llada_status llada_masked_ce_bwd(const llada_tensor* logits, const llada_tensor* targets,
                                 const llada_tensor* weights, const llada_tensor* lse,
                                 const llada_tensor* grad_loss, llada_tensor* grad_logits,
                                 void* stream) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
  CEParams p;
  LLADA_TRY(check_ce_inputs(logits, targets, weights, &p));
  LLADA_TRY(check_vector(lse, "lse", LLADA_FLOAT32, p.N, logits, "logits"));
  LLADA_TRY(check_vector(grad_loss, "grad_loss", LLADA_FLOAT32, p.N, logits, "logits"));
  LLADA_TRY(check_like(grad_logits, "grad_logits", logits, "logits"));
  LLADA_TRY(check_inner_contiguous(grad_logits, "grad_logits"));
  if (grad_logits->data == logits->data && grad_logits->strides[0] != logits->strides[0])
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "grad_logits: an in-place gradient must use the logits' own strides");
  p.lse = static_cast<float*>(lse->data);
  p.lse_s = lse->strides[0];
  p.grad_loss = static_cast<const float*>(grad_loss->data);
  p.grad_loss_s = grad_loss->strides[0];
  p.grad_logits = grad_logits->data;
  p.grad_logits_rs = grad_logits->strides[0];
  p.stream = stream;
  if (p.N == 0) return LLADA_OK;
  return dispatch(logits, p, cpu::masked_ce_bwd, [](const CEParams& pp) {
#ifdef LLADA_WITH_CUDA
    return cuda::masked_ce_bwd(pp);
#else
    return LLADA_ERROR_NOT_COMPILED;
#endif
  });
}

llada_status llada_remask_workspace_size(const llada_tensor* logits, const llada_tensor* x,
                                         size_t* bytes) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
  if (bytes == nullptr) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "bytes: null pointer");
  LLADA_TRY(check_view(logits, "logits", 3));
  LLADA_TRY(check_view(x, "x", 2));
  LLADA_TRY(check_same_device(logits, "logits", x, "x"));
  *bytes = 0;
#ifdef LLADA_WITH_CUDA
  if (logits->device_type == LLADA_CUDA)
    *bytes = cuda::remask_workspace_size(logits->shape[0], logits->shape[1], logits->shape[2]);
#endif
  return LLADA_OK;
}

llada_status llada_remask(const llada_tensor* logits, const llada_tensor* uncond_logits,
                          const llada_tensor* x, const llada_tensor* num_transfer,
                          const llada_remask_params* params, llada_tensor* x_out, llada_tensor* x0,
                          llada_tensor* confidence, void* workspace, size_t workspace_bytes,
                          void* stream) {
  LLADA_CALL_SCOPE();
  g_last_error.clear();
  if (params == nullptr) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "params: null pointer");
  LLADA_TRY(check_view(logits, "logits", 3));
  LLADA_TRY(check_float_dtype(logits, "logits", false));
  LLADA_TRY(check_inner_contiguous(logits, "logits"));
  const int64_t B = logits->shape[0], W = logits->shape[1], V = logits->shape[2];
  if (V <= 0) return set_error(LLADA_ERROR_INVALID_ARGUMENT, "logits: vocabulary size must be > 0");
  if (uncond_logits != nullptr) {
    LLADA_TRY(check_like(uncond_logits, "uncond_logits", logits, "logits"));
    LLADA_TRY(check_inner_contiguous(uncond_logits, "uncond_logits"));
  }
  LLADA_TRY(check_view(x, "x", 2));
  LLADA_TRY(check_same_device(logits, "logits", x, "x"));
  LLADA_TRY(check_dtype(x, "x", LLADA_INT64));
  LLADA_TRY(check_shape(x, "x", 0, B));
  const int64_t L = x->shape[1];
  LLADA_TRY(check_vector(num_transfer, "num_transfer", LLADA_INT64, B, logits, "logits"));
  LLADA_TRY(check_like(x_out, "x_out", x, "x"));
  LLADA_TRY(check_view(x0, "x0", 2));
  LLADA_TRY(check_same_device(logits, "logits", x0, "x0"));
  LLADA_TRY(check_dtype(x0, "x0", LLADA_INT64));
  LLADA_TRY(check_shape(x0, "x0", 0, B));
  LLADA_TRY(check_shape(x0, "x0", 1, W));
  LLADA_TRY(check_view(confidence, "confidence", 2));
  LLADA_TRY(check_same_device(logits, "logits", confidence, "confidence"));
  LLADA_TRY(check_dtype(confidence, "confidence", LLADA_FLOAT32));
  LLADA_TRY(check_shape(confidence, "confidence", 0, B));
  LLADA_TRY(check_shape(confidence, "confidence", 1, W));
  if (numel(x) > 0 && x_out->data == x->data &&
      (x_out->strides[0] != x->strides[0] || x_out->strides[1] != x->strides[1]))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "x_out: an in-place update must use x's own strides");
  if (overlaps_itself_2d(x_out))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "x_out: its elements share memory (a zero or overlapping stride, e.g. from "
                     "expand); writing it would change several positions at once");
  const llada_remask_params& rp = *params;
  if (rp.offset < 0 || W > L || rp.offset > L - W)  // written so that nothing can overflow
    return set_error(LLADA_ERROR_INVALID_ARGUMENT,
                     "offset: a window of %lld positions at offset %lld does not fit in x of "
                     "length %lld",
                     (long long)W, (long long)rp.offset, (long long)L);
  if (rp.strategy < LLADA_REMASK_LOW_CONFIDENCE || rp.strategy > LLADA_REMASK_ENTROPY)
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "strategy: unknown value %d", rp.strategy);
  if (!(rp.temperature >= 0.f) || !isfinite(rp.temperature))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "temperature must be finite and >= 0");
  if (!isfinite(rp.cfg_scale))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "cfg_scale must be finite");
  if (rp.has_threshold && isnan(rp.threshold))
    return set_error(LLADA_ERROR_INVALID_ARGUMENT, "threshold must not be NaN");
  size_t need = 0;
  LLADA_TRY(llada_remask_workspace_size(logits, x, &need));
  if (workspace_bytes < need || (need > 0 && workspace == nullptr))
    return set_error(LLADA_ERROR_INSUFFICIENT_WORKSPACE,
                     "workspace: %zu bytes given, %zu needed (llada_remask_workspace_size)",
                     workspace_bytes, need);
  RemaskParams p{};
  p.dtype = static_cast<llada_dtype>(logits->dtype);
  p.logits = logits->data;
  p.logits_sb = logits->strides[0];
  p.logits_sw = logits->strides[1];
  if (uncond_logits != nullptr) {
    p.uncond = uncond_logits->data;
    p.uncond_sb = uncond_logits->strides[0];
    p.uncond_sw = uncond_logits->strides[1];
  }
  p.x = static_cast<const int64_t*>(x->data);
  p.x_sb = x->strides[0];
  p.x_sl = x->strides[1];
  p.num_transfer = static_cast<const int64_t*>(num_transfer->data);
  p.nt_s = num_transfer->strides[0];
  p.x_out = static_cast<int64_t*>(x_out->data);
  p.x_out_sb = x_out->strides[0];
  p.x_out_sl = x_out->strides[1];
  p.x0 = static_cast<int64_t*>(x0->data);
  p.x0_sb = x0->strides[0];
  p.x0_sw = x0->strides[1];
  p.conf = static_cast<float*>(confidence->data);
  p.conf_sb = confidence->strides[0];
  p.conf_sw = confidence->strides[1];
  p.B = B;
  p.W = W;
  p.V = V;
  p.L = L;
  p.p = rp;
  p.workspace = workspace;
  p.workspace_bytes = workspace_bytes;
  note_workspace(workspace, workspace_bytes);
  p.stream = stream;
  if (B == 0) return LLADA_OK;
  return dispatch(logits, p, cpu::remask, [](const RemaskParams& pp) {
#ifdef LLADA_WITH_CUDA
    return cuda::remask(pp);
#else
    return LLADA_ERROR_NOT_COMPILED;
#endif
  });
}

}  // extern "C"
