"""Public torch ops of llada_ext: attention, masked cross-entropy, remasking.

Each op validates its arguments here (a ``ValueError`` or ``TypeError`` naming the argument),
allocates its outputs with torch and calls the kernel library through ``llada_ext._C`` on the
caller's current CUDA stream. The ops are registered with ``torch.library.custom_op`` with fake
(meta) implementations and autograd formulas, so ``torch.compile(fullgraph=True)`` and autograd
work through them.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _C
from ._renamed import refuse_renamed_attention_args
from ._views import opt_view, stream_of, view

__all__ = [
    "attention",
    "masked_cross_entropy",
    "linear_masked_cross_entropy",
    "remask",
    "remask_",
    "REMASK_STRATEGIES",
]

REMASK_STRATEGIES = {"low_confidence": 0, "random": 1, "margin": 2, "entropy": 3}

_ATTN_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),
}
_LOGIT_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Rows of logits materialised at once by the fused linear loss (about 64M logits per chunk).
_CHUNK_LOGITS = 1 << 26


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------


def _tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: tensors on device {t.device} are not supported (cpu or cuda)")
    return t


def _same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {ref.device}")


def _dtype_in(t: Tensor, name: str, allowed: tuple, what: str = "") -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        where = f" on {t.device.type}" if what else ""
        raise TypeError(
            f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported"
            f"{where}; expected one of {names}"
        )


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def _inner_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _has_internal_overlap(t: Tensor) -> bool:
    """True when two elements of t may share memory (a zero stride on a dimension of size
    > 1, or dimensions whose strides interleave), the cases torch refuses for in-place ops."""
    dims = sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1)
    span = 0  # largest offset reachable through the dimensions seen so far
    for stride, n in dims:
        if stride <= span:
            return True
        span += (n - 1) * stride
    return False


def _eager(t: Tensor) -> bool:
    """True when value checks that read t's data may run: eager mode on a CPU tensor.

    On CUDA such checks would make the host wait for the device (and break CUDA-graph capture),
    so they are skipped there; the kernels turn out-of-range values into a defined result
    (NaN loss for a target outside the vocabulary, 0 for a negative num_transfer).
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


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
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device) if ws_bytes else None
    _C.attention_fwd(
        view(q),
        view(k),
        view(v),
        opt_view(key_mask),
        scale,
        view(out),
        view(lse),
        stream_of(q),
        ws.data_ptr() if ws is not None else 0,
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
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device) if ws_bytes else None
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
        ws.data_ptr() if ws is not None else 0,
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
    q, k, v = _tensor(q, "q"), _tensor(k, "k"), _tensor(v, "v")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected 4 dimensions [B, S, H, D], got shape {tuple(t.shape)}"
            )
    _same_device(k, "k", q, "q")
    _same_device(v, "v", q, "q")
    _dtype_in(q, "q", _ATTN_DTYPES[q.device.type], "device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: dtypes {k.dtype}, {v.dtype} must equal q's dtype {q.dtype}")
    B, Sq, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)} "
            "in batch or head dimension"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} must equal k's shape {tuple(k.shape)}")
    Sk, Hkv = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: {Hkv} key/value heads must divide the {Hq} query heads")
    if D == 0:
        raise ValueError("q: head dimension must be > 0")
    if q.device.type == "cuda" and (D % 8 != 0 or D > 256):
        raise ValueError(
            f"q: head dimension {D} is not supported on CUDA (a multiple of 8, at most 256)"
        )
    if key_mask is not None:
        key_mask = _tensor(key_mask, "key_mask")
        _same_device(key_mask, "key_mask", q, "q")
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask: expected dtype bool, got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, Sk):
            raise ValueError(f"key_mask: expected shape {(B, Sk)}, got {tuple(key_mask.shape)}")
    scale = float(D) ** -0.5 if scale is None else _finite(scale, "scale")
    out, lse = _attention_fwd(
        _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v), key_mask, scale
    )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("llada_ext::masked_ce_fwd", mutates_args=())
def _masked_ce_fwd(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    N = logits.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    _C.masked_ce_fwd(
        view(logits), view(targets), view(weights), view(loss), view(lse), stream_of(logits)
    )
    return loss, lse


@_masked_ce_fwd.register_fake
def _(logits, targets, weights):
    N = logits.shape[0]
    return logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("llada_ext::masked_ce_bwd", mutates_args=())
def _masked_ce_bwd(
    logits: Tensor, targets: Tensor, weights: Tensor, lse: Tensor, grad_loss: Tensor
) -> Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _C.masked_ce_bwd(
        view(logits),
        view(targets),
        view(weights),
        view(lse),
        view(grad_loss),
        view(grad),
        stream_of(logits),
    )
    return grad


@_masked_ce_bwd.register_fake
def _(logits, targets, weights, lse, grad_loss):
    return logits.new_empty(logits.shape)


def _masked_ce_setup(ctx, inputs, output):
    logits, targets, weights = inputs
    ctx.save_for_backward(logits, targets, weights, output[1])
    ctx.mark_non_differentiable(output[1])


def _masked_ce_backward(ctx, grad_loss, grad_lse):
    logits, targets, weights, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None
    if grad_loss.dtype != torch.float32:
        grad_loss = grad_loss.float()
    return _masked_ce_bwd(logits, targets, weights, lse, grad_loss), None, None


_masked_ce_fwd.register_autograd(_masked_ce_backward, setup_context=_masked_ce_setup)


def _check_ce_targets(
    logits_shape: torch.Size,
    targets: Tensor,
    weights: Tensor,
    device_ref: Tensor,
    vocab: int,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Shared validation of (targets, weights) against [..., V] logits or [..., d] hidden.

    Returns flat (targets, weights) with the weight of every row whose target is
    ignore_index set to 0, so that the kernels skip those rows like any other of weight 0.
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    targets = _tensor(targets, "targets")
    weights = _tensor(weights, "weights")
    _same_device(targets, "targets", device_ref, "logits")
    _same_device(weights, "weights", device_ref, "logits")
    lead = tuple(logits_shape[:-1])
    if targets.dtype != torch.int64:
        raise TypeError(f"targets: expected dtype int64, got {targets.dtype}")
    if weights.dtype != torch.float32:
        raise TypeError(f"weights: expected dtype float32, got {weights.dtype}")
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {lead}, got {tuple(targets.shape)}")
    if tuple(weights.shape) != lead:
        raise ValueError(f"weights: expected shape {lead}, got {tuple(weights.shape)}")
    weights = torch.where(targets == ignore_index, torch.zeros_like(weights), weights)
    if _eager(targets) and targets.numel() > 0:
        active = weights != 0
        bad = active & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"targets: values must lie in [0, {vocab}) where weights != 0 "
                f"(or equal ignore_index={ignore_index})"
            )
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights: must be finite")
    return targets.reshape(-1), weights.reshape(-1)


def _reduce(loss: Tensor, weights: Tensor, lead: tuple, reduction: str) -> Tensor:
    """Applies the reduction to per-row losses; "mean" divides by the rows not skipped."""
    loss = loss.view(lead)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (weights != 0).sum().clamp_min(1).to(total.dtype)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")


def masked_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    reduction: str = "sum",
    ignore_index: int = -100,
) -> Tensor:
    """Cross-entropy with per-token weights; rows of weight 0 cost nothing.

    ``loss_i = weights_i * (logsumexp(logits_i) - logits_i[targets_i])``, accumulated in
    float32. Rows with ``weights_i == 0`` or ``targets_i == ignore_index`` are skipped: never
    read, loss 0 and gradient 0. With weights of 1, ``reduction="mean"`` equals
    ``F.cross_entropy(logits, targets, ignore_index=ignore_index)``.

    Parameters
    ----------
    logits : Tensor
        ``[..., V]``, float32, bfloat16 or float16 (any strides; the last dimension is made
        contiguous if it is not).
    targets : Tensor
        int64 ``[...]``, in ``[0, V)`` where the weight is nonzero, or ``ignore_index``.
    weights : Tensor
        float32 ``[...]`` (e.g. ``1 / p_mask`` on masked tokens, 0 elsewhere).
    reduction : {"sum", "mean", "none"}
        "sum" returns a float32 scalar; "mean" that sum divided by the number of rows not
        skipped (0 when every row is skipped); "none" float32 ``[...]``.
    ignore_index : int
        Target value whose rows are skipped, as in ``F.cross_entropy``.

    Returns
    -------
    Tensor
        The loss; differentiable w.r.t. logits.
    """
    logits = _tensor(logits, "logits")
    _check_reduction(reduction)
    if logits.dim() < 1:
        raise ValueError("logits: expected at least 1 dimension [..., V]")
    _dtype_in(logits, "logits", _LOGIT_DTYPES[logits.device.type], "device")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits: the vocabulary dimension must be > 0")
    t, w = _check_ce_targets(logits.shape, targets, weights, logits, V, ignore_index)
    lead = tuple(logits.shape[:-1])
    loss, _ = _masked_ce_fwd(_inner_contiguous(logits).reshape(-1, V), t, w)
    return _reduce(loss, w, lead, reduction)


# ---------------------------------------------------------------------------------------
# fused LM head + masked cross-entropy
# ---------------------------------------------------------------------------------------


def _chunks(weights: Tensor, vocab: int, chunk_rows: int):
    """Indices of the rows with weight != 0, in chunks of at most chunk_rows."""
    idx = torch.nonzero(weights != 0).squeeze(1)
    rows = chunk_rows if chunk_rows > 0 else max(1, _CHUNK_LOGITS // max(vocab, 1))
    return [idx[s : s + rows] for s in range(0, idx.numel(), rows)]


@torch.library.custom_op("llada_ext::linear_masked_ce_fwd", mutates_args=())
def _linear_ce_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, chunk_rows: int
) -> tuple[Tensor, Tensor]:
    N, V = hidden.shape[0], weight.shape[0]
    loss = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    stream = stream_of(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        for ic in _chunks(weights, V, chunk_rows):
            # Views hold raw pointers only: every tensor passed to _C must stay referenced.
            logits = hidden.index_select(0, ic) @ weight.t()
            tc, wc = targets.index_select(0, ic), weights.index_select(0, ic)
            lc = torch.empty(ic.numel(), dtype=torch.float32, device=hidden.device)
            lsec = torch.empty_like(lc)
            _C.masked_ce_fwd(view(logits), view(tc), view(wc), view(lc), view(lsec), stream)
            loss.index_copy_(0, ic, lc)
            lse.index_copy_(0, ic, lsec)
    return loss, lse


@_linear_ce_fwd.register_fake
def _(hidden, weight, targets, weights, chunk_rows):
    N = hidden.shape[0]
    return hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("llada_ext::linear_masked_ce_bwd", mutates_args=())
def _linear_ce_bwd(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    weights: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    chunk_rows: int,
) -> tuple[Tensor, Tensor]:
    V = weight.shape[0]
    dhidden = torch.zeros_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    stream = stream_of(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        for ic in _chunks(weights, V, chunk_rows):
            h = hidden.index_select(0, ic)
            logits = h @ weight.t()
            tc, wc = targets.index_select(0, ic), weights.index_select(0, ic)
            lsec, gc = lse.index_select(0, ic), grad_loss.index_select(0, ic)
            # The gradient overwrites the chunk's logits in place: no second [n, V] buffer.
            _C.masked_ce_bwd(
                view(logits), view(tc), view(wc), view(lsec), view(gc), view(logits), stream
            )
            dhidden.index_copy_(0, ic, logits @ weight)
            if logits.dtype == torch.float32:
                dweight.addmm_(logits.t(), h)
            else:
                dweight += (logits.t() @ h).float()
    return dhidden, dweight.to(weight.dtype)


@_linear_ce_bwd.register_fake
def _(hidden, weight, targets, weights, lse, grad_loss, chunk_rows):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _linear_ce_setup(ctx, inputs, output):
    hidden, weight, targets, weights, chunk_rows = inputs
    ctx.save_for_backward(hidden, weight, targets, weights, output[1])
    ctx.chunk_rows = chunk_rows
    ctx.mark_non_differentiable(output[1])


def _linear_ce_backward(ctx, grad_loss, grad_lse):
    hidden, weight, targets, weights, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    dh, dw = _linear_ce_bwd(
        hidden, weight, targets, weights, lse, grad_loss.float(), ctx.chunk_rows
    )
    return dh, dw, None, None, None


_linear_ce_fwd.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_masked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    reduction: str = "sum",
    ignore_index: int = -100,
    chunk_rows: int = 0,
) -> Tensor:
    """LM head fused with :func:`masked_cross_entropy`, never holding ``[N, V]`` logits.

    Same value as ``masked_cross_entropy(hidden @ weight.T, targets, weights)``. Only the rows
    with ``weights != 0`` are gathered; their logits are computed chunk by chunk (cuBLAS /
    CPU BLAS matmuls from torch) with the cross-entropy kernel between them, and recomputed
    in the backward, where the kernel writes the logit gradient in place.

    Parameters
    ----------
    hidden : Tensor
        ``[..., d]`` hidden states (float32, bfloat16 or float16).
    weight : Tensor
        ``[V, d]`` LM head weight. If its dtype differs from hidden's, both are cast to the
        autocast dtype when autocast is on for their device, else to the promoted dtype.
    targets : Tensor
        int64 ``[...]``.
    weights : Tensor
        float32 ``[...]``.
    reduction : {"sum", "mean", "none"}
        As in :func:`masked_cross_entropy`.
    ignore_index : int
        As in :func:`masked_cross_entropy`: those rows are skipped.
    chunk_rows : int
        Rows of logits per chunk; 0 picks about 64M logits per chunk.

    Returns
    -------
    Tensor
        float32 loss; differentiable w.r.t. hidden and weight.
    """
    hidden = _tensor(hidden, "hidden")
    weight = _tensor(weight, "weight")
    _check_reduction(reduction)
    _same_device(weight, "weight", hidden, "hidden")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected at least 1 dimension [..., d]")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [V, d], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: inner size {weight.shape[1]} does not match hidden's "
            f"last dimension {hidden.shape[-1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary dimension must be > 0")
    _dtype_in(hidden, "hidden", _LOGIT_DTYPES[hidden.device.type], "device")
    _dtype_in(weight, "weight", _LOGIT_DTYPES[hidden.device.type], "device")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 0:
        raise ValueError(f"chunk_rows: expected an int >= 0, got {chunk_rows!r}")
    V = weight.shape[0]
    t, w = _check_ce_targets(hidden.shape, targets, weights, hidden, V, ignore_index)
    if hidden.dtype != weight.dtype:
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        else:
            dtype = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    lead = tuple(hidden.shape[:-1])
    h2 = hidden.reshape(math.prod(lead), hidden.shape[-1])  # d may be 0: logits are then 0
    loss, _ = _linear_ce_fwd(h2, weight, t, w, chunk_rows)
    return _reduce(loss, w, lead, reduction)


# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("llada_ext::remask", mutates_args=())
def _remask(
    logits: Tensor,
    x: Tensor,
    num_transfer: Tensor,
    uncond_logits: Optional[Tensor],
    mask_id: int,
    offset: int,
    strategy: int,
    temperature: float,
    has_threshold: bool,
    threshold: float,
    cfg_scale: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x0, conf = _remask_into(
        logits,
        x,
        x_out,
        num_transfer,
        uncond_logits,
        mask_id,
        offset,
        strategy,
        temperature,
        has_threshold,
        threshold,
        cfg_scale,
        seed,
    )
    return x_out, x0, conf


@_remask.register_fake
def _(
    logits,
    x,
    num_transfer,
    uncond_logits,
    mask_id,
    offset,
    strategy,
    temperature,
    has_threshold,
    threshold,
    cfg_scale,
    seed,
):
    B, W = logits.shape[0], logits.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty((B, W)),
        logits.new_empty((B, W), dtype=torch.float32),
    )


@torch.library.custom_op("llada_ext::remask_", mutates_args=("x",))
def _remask_inplace(
    logits: Tensor,
    x: Tensor,
    num_transfer: Tensor,
    uncond_logits: Optional[Tensor],
    mask_id: int,
    offset: int,
    strategy: int,
    temperature: float,
    has_threshold: bool,
    threshold: float,
    cfg_scale: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    return _remask_into(
        logits,
        x,
        x,
        num_transfer,
        uncond_logits,
        mask_id,
        offset,
        strategy,
        temperature,
        has_threshold,
        threshold,
        cfg_scale,
        seed,
    )


@_remask_inplace.register_fake
def _(
    logits,
    x,
    num_transfer,
    uncond_logits,
    mask_id,
    offset,
    strategy,
    temperature,
    has_threshold,
    threshold,
    cfg_scale,
    seed,
):
    B, W = logits.shape[0], logits.shape[1]
    return x.new_empty((B, W)), logits.new_empty((B, W), dtype=torch.float32)


def _remask_into(
    logits,
    x,
    x_out,
    num_transfer,
    uncond_logits,
    mask_id,
    offset,
    strategy,
    temperature,
    has_threshold,
    threshold,
    cfg_scale,
    seed,
):
    B, W = logits.shape[0], logits.shape[1]
    x0 = torch.empty((B, W), dtype=torch.int64, device=x.device)
    conf = torch.empty((B, W), dtype=torch.float32, device=x.device)
    ws_bytes = _C.remask_workspace_size(view(logits), view(x))
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    _C.remask(
        view(logits),
        opt_view(uncond_logits),
        view(x),
        view(num_transfer),
        mask_id,
        offset,
        strategy,
        has_threshold,
        threshold,
        temperature,
        cfg_scale,
        seed & ((1 << 64) - 1),
        view(x_out),
        view(x0),
        view(conf),
        ws.data_ptr() if ws is not None else 0,
        ws_bytes,
        stream_of(x),
    )
    return x0, conf


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    """A 62-bit Philox seed for one remask call.

    CPU generators (and the default generator when ``generator`` is None) give their next
    ``randint``. A CUDA generator gives the same sequence as a CPU generator with the same
    ``manual_seed``: its n-th call here returns the CPU stream's n-th draw (the count is kept
    in the CUDA generator's offset), so the same seed selects the same tokens on either device.
    """
    high = 1 << 62
    if generator is None:
        return int(torch.randint(0, high, (1,)).item())
    if generator.device.type == "cpu":
        return int(torch.randint(0, high, (1,), generator=generator).item())
    offset = generator.get_offset()
    n = offset // 4
    replay = torch.Generator().manual_seed(generator.initial_seed())
    seed = int(torch.randint(0, high, (n + 1,), generator=replay)[-1].item())
    generator.set_offset(offset + 4)
    return seed


def _remask_args(
    logits,
    x,
    num_transfer,
    mask_id,
    offset,
    strategy,
    temperature,
    threshold,
    generator,
    uncond_logits,
    cfg_scale,
):
    logits = _tensor(logits, "logits")
    x = _tensor(x, "x")
    if logits.dim() != 3:
        raise ValueError(
            f"logits: expected 3 dimensions [B, W, V], got shape {tuple(logits.shape)}"
        )
    _dtype_in(logits, "logits", _LOGIT_DTYPES[logits.device.type], "device")
    B, W, V = logits.shape
    if V == 0:
        raise ValueError("logits: the vocabulary dimension must be > 0")
    _same_device(x, "x", logits, "logits")
    if x.dtype != torch.int64:
        raise TypeError(f"x: expected dtype int64, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] != B:
        raise ValueError(f"x: expected shape [{B}, L], got {tuple(x.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    if offset < 0 or offset + W > x.shape[1]:
        raise ValueError(
            f"offset: the window [{offset}, {offset + W}) does not fit in x of length {x.shape[1]}"
        )
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id: expected an int, got {type(mask_id).__name__}")
    if not -(2**63) <= mask_id < 2**63:
        raise ValueError(f"mask_id: {mask_id} is not an int64 token id")
    if not isinstance(strategy, str) or strategy not in REMASK_STRATEGIES:
        raise ValueError(f"strategy: expected one of {sorted(REMASK_STRATEGIES)}, got {strategy!r}")
    temperature = _finite(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    has_threshold = threshold is not None
    threshold = _finite(threshold, "threshold") if has_threshold else 0.0
    cfg_scale = _finite(cfg_scale, "cfg_scale")
    if uncond_logits is not None:
        uncond_logits = _tensor(uncond_logits, "uncond_logits")
        _same_device(uncond_logits, "uncond_logits", logits, "logits")
        if uncond_logits.shape != logits.shape or uncond_logits.dtype != logits.dtype:
            raise ValueError(
                f"uncond_logits: expected shape {tuple(logits.shape)} and dtype "
                f"{logits.dtype}, got {tuple(uncond_logits.shape)} "
                f"{uncond_logits.dtype}"
            )
        uncond_logits = _inner_contiguous(uncond_logits)
    if isinstance(num_transfer, Tensor):
        _same_device(num_transfer, "num_transfer", logits, "logits")
        if num_transfer.dtype not in _INT_DTYPES:
            raise TypeError(f"num_transfer: expected an integer tensor, got {num_transfer.dtype}")
        if num_transfer.dim() == 0:
            num_transfer = num_transfer.expand(B)
        if tuple(num_transfer.shape) != (B,):
            raise ValueError(f"num_transfer: expected shape [{B}], got {tuple(num_transfer.shape)}")
        num_transfer = num_transfer.to(torch.int64)
        if _eager(num_transfer) and B > 0 and bool((num_transfer < 0).any()):
            raise ValueError("num_transfer: values must be >= 0")
    elif isinstance(num_transfer, int) and not isinstance(num_transfer, bool):
        if num_transfer < 0:
            raise ValueError(f"num_transfer: must be >= 0, got {num_transfer}")
        # More than W means every candidate (a row has at most W): any int is accepted.
        num_transfer = torch.full(
            (B,), min(num_transfer, W), dtype=torch.int64, device=logits.device
        )
    else:
        raise TypeError(
            f"num_transfer: expected an int or an integer tensor [B], "
            f"got {type(num_transfer).__name__}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    needs_random = temperature > 0 or strategy == "random"
    seed = _draw_seed(generator) if needs_random else 0
    return (
        _inner_contiguous(logits),
        x,
        num_transfer,
        uncond_logits,
        mask_id,
        offset,
        REMASK_STRATEGIES[strategy],
        temperature,
        has_threshold,
        threshold,
        cfg_scale,
        seed,
    )


def remask(
    logits: Tensor,
    x: Tensor,
    num_transfer: Union[int, Tensor],
    *,
    mask_id: int,
    offset: int = 0,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    uncond_logits: Optional[Tensor] = None,
    cfg_scale: float = 0.0,
    return_details: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One parallel decoding step: predict every masked token of a window, keep the most
    confident, leave the rest masked.

    Parameters
    ----------
    logits : Tensor
        ``[B, W, V]`` predictions for ``x[:, offset:offset + W]`` (float32, bfloat16, float16).
    x : Tensor
        int64 ``[B, L]`` current sequence; positions equal to ``mask_id`` in the window are the
        candidates. Not modified.
    num_transfer : int or Tensor
        Tokens to unmask per row (int, or integer tensor ``[B]``); at most the row's
        candidates are unmasked, so any int >= W (however large) means all of them.
    mask_id : int
        The mask token id: any int64 token id of x. It need not be a class of the logits
        (e.g. ``mask_id == V`` when the model never predicts it).
    offset : int
        Start of the window in x.
    strategy : {"low_confidence", "random", "margin", "entropy"}
        Confidence: softmax probability of the prediction (untempered), a uniform draw, top-1
        minus top-2 probability, or minus the entropy.
    temperature : float
        0: argmax (ties -> lowest id); > 0: Gumbel-argmax of ``l / temperature`` with Gumbel
        noise from double-precision Philox uniforms.
    threshold : float, optional
        If given, unmask every candidate with confidence > threshold and at least
        ``min(k, #candidates)`` of the most confident.
    generator : torch.Generator, optional
        Source of the Philox seed (see ``_draw_seed``); the default generator if None. Not
        consumed when the step is deterministic (temperature 0, strategy not "random").
    uncond_logits : Tensor, optional
        Unconditional logits for classifier-free guidance:
        ``l = uncond + (cfg_scale + 1) * (logits - uncond)``.
    cfg_scale : float
        Guidance scale, used with uncond_logits.
    return_details : bool
        Also return ``x0`` int64 ``[B, W]`` (the predictions; x where not a candidate) and
        ``confidence`` float32 ``[B, W]`` (-inf at non-candidates).

    Returns
    -------
    Tensor or (Tensor, Tensor, Tensor)
        The new x (a new tensor), and the details when asked.
    """
    args = _remask_args(
        logits,
        x,
        num_transfer,
        mask_id,
        offset,
        strategy,
        temperature,
        threshold,
        generator,
        uncond_logits,
        cfg_scale,
    )
    x_new, x0, conf = _remask(*args)
    return (x_new, x0, conf) if return_details else x_new


def remask_(
    logits: Tensor,
    x: Tensor,
    num_transfer: Union[int, Tensor],
    *,
    mask_id: int,
    offset: int = 0,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    uncond_logits: Optional[Tensor] = None,
    cfg_scale: float = 0.0,
    return_details: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """In-place twin of :func:`remask`: updates and returns ``x`` itself.

    ``x`` must own its elements: rows that share memory (``expand``, zero strides) raise a
    ValueError naming ``x``, as torch does for in-place ops on expanded tensors.
    """
    if isinstance(x, Tensor) and x.dim() == 2 and _has_internal_overlap(x):
        raise ValueError(
            "x: several of its elements share memory (e.g. an expanded tensor), so an in-place "
            "update would change them all; pass x.clone() or x.contiguous()"
        )
    args = _remask_args(
        logits,
        x,
        num_transfer,
        mask_id,
        offset,
        strategy,
        temperature,
        threshold,
        generator,
        uncond_logits,
        cfg_scale,
    )
    x0, conf = _remask_inplace(*args)
    return (x, x0, conf) if return_details else x
