"""``lx.attention``: non-causal attention (forward and backward) as a torch op."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _C
from .._renamed import refuse_renamed_attention_args
from .._views import opt_view, stream_of, view
from . import _checks as checks
from ._checks import meta
from ._common import _inner_contiguous, _tensor, _workspace

# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("llada_ext::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float
) -> tuple[Tensor, Tensor]:
    B, Sq, Hq, D = q.shape
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    # CUDA, decode-shaped calls: scratch for the split-KV plan (0 bytes otherwise)
    ws_bytes = _C.attention_fwd_workspace_size(view(q), view(k))
    ws, ws_ptr = _workspace(ws_bytes, q.device)
    _C.attention_fwd(
        view(q),
        view(k),
        view(v),
        opt_view(key_mask),
        scale,
        view(out),
        view(lse),
        stream_of(q),
        ws_ptr,
        ws_bytes,
    )
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, key_mask, scale):
    B, Sq, Hq, D = q.shape
    return q.new_empty((B, Sq, Hq, D)), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.custom_op("llada_ext::attention_bwd", mutates_args=())
def _attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    ws_bytes = _C.attention_bwd_workspace_size(view(q), view(k))
    ws, ws_ptr = _workspace(ws_bytes, q.device)
    _C.attention_bwd(
        view(q),
        view(k),
        view(v),
        opt_view(key_mask),
        view(out),
        view(dout),
        view(lse),
        scale,
        view(dq),
        view(dk),
        view(dv),
        ws_ptr,
        ws_bytes,
        stream_of(q),
    )
    return dq, dk, dv


@_attention_bwd.register_fake
def _(q, k, v, key_mask, out, dout, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, key_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, dlse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd(q, k, v, key_mask, out, _inner_contiguous(dout), lse, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    **renamed: object,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Non-causal multi-head attention with GQA/MQA and a per-row key mask.

    Parameters
    ----------
    q : Tensor
        Queries ``[B, Sq, Hq, D]``. CPU: float32 or bfloat16; CUDA: float16 or bfloat16.
    k, v : Tensor
        Keys and values ``[B, Sk, Hkv, D]`` of q's dtype and device; ``Hq % Hkv == 0``
        (query head ``h`` attends with key/value head ``h // (Hq // Hkv)``). Sk may differ
        from Sq. Any strides on the batch, sequence and head dimensions.
    key_mask : Tensor, optional
        bool ``[B, Sk]``; True = this key is attended (the polarity of SDPA's boolean mask and
        of Hugging Face's ``attention_mask``). None attends every key. A masked key is never
        read: NaN or inf in its K/V rows cannot reach the output. The former name
        ``key_padding_mask`` raises a TypeError: ``nn.MultiheadAttention`` uses that name with
        the opposite polarity (True = ignore).
    scale : float, optional
        Multiplier of ``q . k``; defaults to ``D ** -0.5``.
    return_lse : bool
        Also return the float32 log-sum-exp of the scaled scores, ``[B, Hq, Sq]`` (not
        differentiable; -inf for a query whose keys are all masked).

    Returns
    -------
    Tensor or (Tensor, Tensor)
        ``out [B, Sq, Hq, D]`` in q's dtype (a query whose keys are all masked gets zeros and
        zero gradients), and ``lse`` when asked. Differentiable w.r.t. q, k and v.
    """
    refuse_renamed_attention_args(renamed)
    q = _tensor(q, "q")
    k, v = _tensor(k, "k", q, "q"), _tensor(v, "v", q, "q")
    qkv = (meta(q, "q"), meta(k, "k"), meta(v, "v"))
    B, Sq, Hq, D, Sk = checks.attention_shapes(*qkv, q.device.type)
    if key_mask is not None:
        key_mask = _tensor(key_mask, "key_mask", q, "q")
        checks.key_mask(meta(key_mask, "key_mask"), B, Sk)
    scale = checks.attention_scale(scale, D)
    out, lse = _attention_fwd(
        _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v), key_mask, scale
    )
    return (out, lse) if return_lse else out
