// Plain parameter structs filled once by the C ABI layer (csrc/api.cpp) after validation
// and handed to the CPU (llada::cpu) and CUDA (llada::cuda) kernels. Pointers are raw,
// strides are in elements, every size is int64. No torch, no pybind11.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "llada/llada.h"

namespace llada {

// Strides of a [B, S, H, D] tensor (D has stride 1).
struct BSHStrides {
  int64_t b, s, h;
};

struct AttnFwdParams {
  llada_dtype dtype;  // of q, k, v, out
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* key_padding_mask;  // [B, Sk] bytes, nonzero = attend; nullptr = all
  void* out;
  float* lse;  // [B, Hq, Sq]
  int64_t B, Sq, Sk, Hq, Hkv, D;
  BSHStrides q_st, k_st, v_st, out_st;
  int64_t lse_sb, lse_sh, lse_ss;
  int64_t kpm_sb, kpm_ss;
  float scale;
  void* stream;  // cudaStream_t for CUDA; unused on CPU
  // forward only (CUDA): scratch for the split-KV plan; nullptr = single pass
  void* workspace;
  size_t workspace_bytes;
};

struct AttnBwdParams {
  AttnFwdParams fwd;  // q, k, v, mask, out (read), lse (read), sizes, scale, stream
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  BSHStrides dout_st, dq_st, dk_st, dv_st;
  void* workspace;
  size_t workspace_bytes;
};

struct CEParams {
  llada_dtype dtype;  // of logits and grad_logits
  const void* logits;
  int64_t logits_rs;  // row stride
  const int64_t* targets;
  int64_t targets_s;
  const float* weights;
  int64_t weights_s;
  float* loss;  // forward output [N]
  int64_t loss_s;
  float* lse;  // forward output (may be nullptr) / backward input
  int64_t lse_s;
  const float* grad_loss;  // backward input [N]; stride may be 0
  int64_t grad_loss_s;
  void* grad_logits;  // backward output, may equal logits (in-place)
  int64_t grad_logits_rs;
  int64_t N, V;
  void* stream;
};

struct RemaskParams {
  llada_dtype dtype;  // of logits / uncond_logits
  const void* logits;
  int64_t logits_sb, logits_sw;
  const void* uncond;  // nullptr = no CFG
  int64_t uncond_sb, uncond_sw;
  const int64_t* x;
  int64_t x_sb, x_sl;
  const int64_t* num_transfer;
  int64_t nt_s;
  int64_t* x_out;
  int64_t x_out_sb, x_out_sl;
  int64_t* x0;
  int64_t x0_sb, x0_sw;
  float* conf;
  int64_t conf_sb, conf_sw;
  int64_t B, W, V, L;
  llada_remask_params p;  // mask_id, offset, strategy, threshold, temperature, cfg, seed
  void* workspace;
  size_t workspace_bytes;
  void* stream;
};

// Records a printf-style message for llada_last_error() (thread-local) and returns status.
llada_status set_error(llada_status status, const char* fmt, ...);

namespace cpu {
llada_status attention_fwd(const AttnFwdParams& p);
llada_status attention_bwd(const AttnBwdParams& p);
llada_status masked_ce_fwd(const CEParams& p);
llada_status masked_ce_bwd(const CEParams& p);
llada_status remask(const RemaskParams& p);
const char* blas_description();  // csrc/cpu/blas.cpp
}  // namespace cpu

namespace cuda {
size_t attention_bwd_workspace_size(int64_t B, int64_t Sq, int64_t Hq, int64_t Sk, int64_t Hkv,
                                    int64_t D);
size_t remask_workspace_size(int64_t B, int64_t W, int64_t V);
size_t attention_fwd_workspace_size(int64_t B, int64_t Sq, int64_t Hq, int64_t Sk, int64_t Hkv,
                                    int64_t D);
llada_status attention_fwd(const AttnFwdParams& p);
llada_status attention_bwd(const AttnBwdParams& p);
llada_status masked_ce_fwd(const CEParams& p);
llada_status masked_ce_bwd(const CEParams& p);
llada_status remask(const RemaskParams& p);
}  // namespace cuda

}  // namespace llada
