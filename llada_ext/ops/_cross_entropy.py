"""``lx.masked_cross_entropy`` and ``lx.linear_masked_cross_entropy`` (fused with the LM
head) as torch ops."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _C
from .._views import stream_of, view
from . import _checks as checks
from ._checks import meta
from ._common import _eager, _inner_contiguous, _tensor

# Rows of logits materialised at once by the fused linear loss (about 64M logits per chunk).
_CHUNK_LOGITS = 1 << 26

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
    lead: tuple,
    targets: Tensor,
    weights: Tensor,
    ref: Tensor,
    ref_name: str,
    vocab: int,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Validation of (targets, weights) against the leading dimensions ``lead`` of
    ``[..., V]`` logits or ``[..., d]`` hidden states (``ref``, named ``ref_name``).

    Returns flat (targets, weights) with the weight of every row whose target is
    ignore_index set to 0, so that the kernels skip those rows like any other of weight 0.
    """
    ignore_index = checks.integer(ignore_index, "ignore_index")
    targets = _tensor(targets, "targets", ref, ref_name)
    weights = _tensor(weights, "weights", ref, ref_name)
    checks.ce_targets(lead, meta(targets, "targets"), meta(weights, "weights"))
    weights = torch.where(targets == ignore_index, torch.zeros_like(weights), weights)
    if _eager(targets) and targets.numel() > 0:
        bad = (weights != 0) & ((targets < 0) | (targets >= vocab))
        finite = torch.isfinite(weights).all()
        checks.ce_values(bool(bad.any()), bool(finite), vocab, ignore_index)
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
    checks.reduction(reduction)
    V = checks.logits_vocab(meta(logits, "logits"), logits.device.type)
    lead = tuple(logits.shape[:-1])
    t, w = _check_ce_targets(lead, targets, weights, logits, "logits", V, ignore_index)
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
    weight = _tensor(weight, "weight", hidden, "hidden")
    checks.reduction(reduction)
    V = checks.lm_head(meta(hidden, "hidden"), meta(weight, "weight"), hidden.device.type)
    chunk_rows = checks.chunk_rows(chunk_rows)
    lead = tuple(hidden.shape[:-1])
    t, w = _check_ce_targets(lead, targets, weights, hidden, "hidden", V, ignore_index)
    if hidden.dtype != weight.dtype:
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        else:
            dtype = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    h2 = hidden.reshape(math.prod(lead), hidden.shape[-1])  # d may be 0: logits are then 0
    loss, _ = _linear_ce_fwd(h2, weight, t, w, chunk_rows)
    return _reduce(loss, w, lead, reduction)
