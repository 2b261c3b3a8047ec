/*
 * llada.h - the plain C ABI of the llada kernel library.
 *
 * Three operation families for masked diffusion language models:
 *   attention      non-causal multi-head attention, forward and backward (GQA/MQA,
 *                  per-row key padding, Sq != Sk)
 *   masked CE      cross-entropy with per-token weights; rows of weight 0 cost nothing
 *   remask         one-pass confidence remasking (argmax / Gumbel-argmax, confidence,
 *                  per-row top-k or threshold selection, CFG combine)
 *
 * ABI rules
 * ---------
 * - Every entry point returns an llada_status. On failure llada_last_error() returns a
 *   human-readable message. The message buffer is thread-local: each thread sees the
 *   error of its own last failing call; the pointer stays valid until that thread's
 *   next call into the library.
 * - The library never allocates device or host memory for tensors and never frees
 *   memory it did not allocate. All tensors (outputs and workspaces) belong to the
 *   caller. Workspace sizes come from the *_workspace_size() queries.
 * - CUDA entry points run on the stream passed as `stream` (a cudaStream_t cast to
 *   void*; NULL = the legacy default stream). They never synchronise the host and are
 *   safe to capture in a CUDA graph. CPU entry points ignore `stream` and run
 *   synchronously (OpenMP-parallel).
 * - The device is chosen by the tensors' device_type; all tensors of one call must be on
 *   the same device, else LLADA_ERROR_DEVICE_MISMATCH.
 * - Strides are in elements, not bytes. The innermost (last) dimension of every
 *   floating-point tensor must be contiguous (stride 1); other strides are free.
 * - Compatibility: within one major version (LLADA_VERSION_MAJOR), existing functions,
 *   enum values and struct layouts never change; new functions and enum values may be
 *   added in a minor version. llada_version() returns the runtime library's version so a
 *   host can check that the header it compiled against matches.
 */
#ifndef LLADA_LLADA_H_
#define LLADA_LLADA_H_

#include <stddef.h>
#include <stdint.h>

#define LLADA_VERSION_MAJOR 0
/* 0.2 added llada_blas_info, llada_cuda_status, llada_attention_fwd_workspace_size and
 * llada_attention_fwd_ws. */
#define LLADA_VERSION_MINOR 2
#define LLADA_VERSION_PATCH 0
#define LLADA_VERSION \
  (LLADA_VERSION_MAJOR * 10000 + LLADA_VERSION_MINOR * 100 + LLADA_VERSION_PATCH)

#if defined(_WIN32)
#define LLADA_API __declspec(dllexport)
#elif defined(__GNUC__)
#define LLADA_API __attribute__((visibility("default")))
#else
#define LLADA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum llada_status {
  LLADA_OK = 0,
  LLADA_ERROR_INVALID_ARGUMENT = 1, /* null pointer, bad shape, bad stride, bad value */
  LLADA_ERROR_UNSUPPORTED_DTYPE = 2,
  LLADA_ERROR_DEVICE_MISMATCH = 3, /* tensors on different devices */
  LLADA_ERROR_NOT_COMPILED = 4,    /* e.g. a CUDA tensor with a CPU-only build */
  LLADA_ERROR_CUDA = 5,            /* a CUDA runtime error (message has the details) */
  LLADA_ERROR_INSUFFICIENT_WORKSPACE = 6,
  LLADA_ERROR_INTERNAL = 7
} llada_status;

typedef enum llada_dtype {
  LLADA_FLOAT32 = 0,
  LLADA_FLOAT16 = 1,
  LLADA_BFLOAT16 = 2,
  LLADA_FLOAT64 = 3,
  LLADA_INT64 = 4,
  LLADA_INT32 = 5,
  LLADA_BOOL = 6 /* one byte per element, 0 or 1 */
} llada_dtype;

typedef enum llada_device_type { LLADA_CPU = 0, LLADA_CUDA = 1 } llada_device_type;

#define LLADA_MAX_DIMS 8

/* A non-owning view of a strided tensor. */
typedef struct llada_tensor {
  void* data;
  int32_t dtype;       /* llada_dtype */
  int32_t device_type; /* llada_device_type */
  int32_t device_id;   /* CUDA ordinal; 0 on CPU */
  int32_t ndim;        /* 0..LLADA_MAX_DIMS */
  int64_t shape[LLADA_MAX_DIMS];
  int64_t strides[LLADA_MAX_DIMS]; /* in elements */
} llada_tensor;

/* ---- library information ------------------------------------------------------------ */

/* Message of the calling thread's last failed call ("" if none). Never NULL. */
LLADA_API const char* llada_last_error(void);
/* LLADA_VERSION of the runtime library. */
LLADA_API int llada_version(void);
/* 1 if the library was built with CUDA kernels, else 0. */
LLADA_API int llada_has_cuda(void);
/* Whether the CUDA kernels can run on this machine: LLADA_OK when the CUDA runtime the
 * library links finds a usable device; LLADA_ERROR_NOT_COMPILED for a CPU-only build;
 * LLADA_ERROR_CUDA otherwise, with llada_last_error() giving the runtime's own reason and
 * the runtime and driver versions (e.g. a driver older than the runtime needs). */
LLADA_API llada_status llada_cuda_status(void);
/* The BLAS the CPU attention tiles use, found at run time: "scipy-openblas32 (<path>)",
 * "OpenBLAS (<path>)" or "none: plain loops (...)". LLADA_BLAS_LIB=<path> in the environment
 * names the library to use; otherwise an OpenBLAS already loaded into the process is used. */
LLADA_API const char* llada_blas_info(void);
/* Name of a status code, e.g. "LLADA_ERROR_INVALID_ARGUMENT". */
LLADA_API const char* llada_status_string(llada_status status);

/* ---- attention ------------------------------------------------------------------------
 * q [B, Sq, Hq, D], k and v [B, Sk, Hkv, D], Hq % Hkv == 0, all of one dtype
 *   (CPU: FLOAT32, BFLOAT16; CUDA: FLOAT16, BFLOAT16).
 * key_padding_mask: BOOL [B, Sk] (nonzero = key is attended) or NULL (all keys attended).
 * out [B, Sq, Hq, D] in q's dtype; lse FLOAT32 [B, Hq, Sq] (natural-log sum of exp of the
 *   scaled scores; -inf for a query whose keys are all masked, whose out row is 0).
 * Non-causal. scale multiplies q.k (typically D^-0.5).
 */
LLADA_API llada_status llada_attention_fwd(const llada_tensor* q, const llada_tensor* k,
                                           const llada_tensor* v,
                                           const llada_tensor* key_padding_mask, float scale,
                                           llada_tensor* out, llada_tensor* lse, void* stream);

/* Bytes of workspace that lets llada_attention_fwd_ws split the keys of these shapes over
 * several CTAs (0 on CPU, and on CUDA when the grid is large enough without a split). */
LLADA_API llada_status llada_attention_fwd_workspace_size(const llada_tensor* q,
                                                          const llada_tensor* k, size_t* bytes);

/* llada_attention_fwd with a workspace. On CUDA, decode-shaped calls (few query rows per KV
 * head against many keys, e.g. a sampler's block against a long cache) then cut each row's
 * keys into ranges handled by separate CTAs and merge the partial results exactly
 * (flash-decoding). The plan depends on the shapes only, so a call is deterministic. With
 * workspace NULL (or a size query of 0) this is llada_attention_fwd. */
LLADA_API llada_status llada_attention_fwd_ws(const llada_tensor* q, const llada_tensor* k,
                                              const llada_tensor* v,
                                              const llada_tensor* key_padding_mask, float scale,
                                              llada_tensor* out, llada_tensor* lse, void* workspace,
                                              size_t workspace_bytes, void* stream);

/* Bytes of workspace llada_attention_bwd needs for these shapes (0 on CPU). */
LLADA_API llada_status llada_attention_bwd_workspace_size(const llada_tensor* q,
                                                          const llada_tensor* k, size_t* bytes);

/* Gradients of out w.r.t. q, k, v given dout [B, Sq, Hq, D] (q's dtype), the forward's
 * out and lse. dq has q's shape, dk/dv k's shape, all in q's dtype; they are overwritten
 * (not accumulated into). Queries with lse == -inf contribute nothing. workspace may be
 * NULL when the size query returned 0. */
LLADA_API llada_status llada_attention_bwd(const llada_tensor* q, const llada_tensor* k,
                                           const llada_tensor* v,
                                           const llada_tensor* key_padding_mask,
                                           const llada_tensor* out, const llada_tensor* dout,
                                           const llada_tensor* lse, float scale, llada_tensor* dq,
                                           llada_tensor* dk, llada_tensor* dv, void* workspace,
                                           size_t workspace_bytes, void* stream);

/* ---- masked cross-entropy ------------------------------------------------------------
 * logits [N, V] (FLOAT32, BFLOAT16, FLOAT16; row stride free, column stride 1),
 * targets INT64 [N], weights FLOAT32 [N].
 * loss FLOAT32 [N]: weights_i * (logsumexp(logits_i) - logits_i[targets_i]);
 * lse FLOAT32 [N] (may be NULL): logsumexp(logits_i), saved for the backward.
 * Rows with weights_i == 0 are not read: loss 0, lse 0. A target outside [0, V) on an
 * active row gives loss NaN (validate on the host if that matters).
 */
LLADA_API llada_status llada_masked_ce_fwd(const llada_tensor* logits, const llada_tensor* targets,
                                           const llada_tensor* weights, llada_tensor* loss,
                                           llada_tensor* lse, void* stream);

/* grad_logits[i, :] = grad_loss_i * weights_i * (softmax(logits_i) - onehot(targets_i)).
 * grad_loss FLOAT32 [N] (stride 0 broadcasts a scalar). lse from the forward.
 * grad_logits [N, V] in logits' dtype; it may be the very same buffer as logits
 * (in-place gradient). Rows with weight 0 get zeros and their logits are not read. */
LLADA_API llada_status llada_masked_ce_bwd(const llada_tensor* logits, const llada_tensor* targets,
                                           const llada_tensor* weights, const llada_tensor* lse,
                                           const llada_tensor* grad_loss, llada_tensor* grad_logits,
                                           void* stream);

/* ---- remask --------------------------------------------------------------------------- */
typedef enum llada_remask_strategy {
  LLADA_REMASK_LOW_CONFIDENCE = 0, /* softmax(l)[x0] */
  LLADA_REMASK_RANDOM = 1,         /* U(0,1) from the Philox stream */
  LLADA_REMASK_MARGIN = 2,         /* p_top1 - p_top2 */
  LLADA_REMASK_ENTROPY = 3         /* -H(softmax(l)) */
} llada_remask_strategy;

typedef struct llada_remask_params {
  int64_t mask_id;       /* candidates: x == mask_id; any value (need not be a logits class) */
  int64_t offset;        /* window start in x: logits[:, j] predicts x[:, offset + j] */
  int32_t strategy;      /* llada_remask_strategy */
  int32_t has_threshold; /* 0: top-k selection; 1: threshold selection with k as minimum */
  float threshold;
  float temperature; /* 0: plain argmax; > 0: Gumbel-argmax of l / temperature */
  float cfg_scale;   /* used only when uncond_logits != NULL */
  uint64_t seed;     /* Philox key for Gumbel noise and "random" confidence */
} llada_remask_params;

/* logits [B, W, V] (FLOAT32, BFLOAT16, FLOAT16; column stride 1), uncond_logits same shape
 * and dtype or NULL; x INT64 [B, L] (read), num_transfer INT64 [B];
 * x_out INT64 [B, L] (written; may be the same buffer as x), x0 INT64 [B, W] and
 * confidence FLOAT32 [B, W] (written; -inf at non-candidates, x0 = x there).
 * Selection per row: the min(k_b, #candidates) most confident candidates (ties: lower
 * position first); with a threshold, also every candidate with confidence > threshold. */
LLADA_API llada_status llada_remask_workspace_size(const llada_tensor* logits,
                                                   const llada_tensor* x, size_t* bytes);
LLADA_API llada_status llada_remask(const llada_tensor* logits, const llada_tensor* uncond_logits,
                                    const llada_tensor* x, const llada_tensor* num_transfer,
                                    const llada_remask_params* params, llada_tensor* x_out,
                                    llada_tensor* x0, llada_tensor* confidence, void* workspace,
                                    size_t workspace_bytes, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LLADA_LLADA_H_ */
