"""Framework-neutral entry points: the kernels on any array that speaks DLPack.

The functions here take arrays of any library implementing the DLPack protocol
(``__dlpack__`` / ``__dlpack_device__``) and return arrays of that same library. They are
forward-only (no autograd) and have the semantics of the torch ops of the same name
(``llada_ext.attention``, ``masked_cross_entropy``, ``remask``; see ``llada_ext.ops``), except
that :func:`remask` takes an explicit Philox ``seed`` instead of a ``torch.Generator``.

How each library is served (the first array argument decides):

============  ======  =========================================================================
library       device  inputs / outputs / stream
============  ======  =========================================================================
NumPy         CPU     pointer and strides read from the array itself (no copy unless the last
                      dimension is not contiguous); outputs ``np.empty``; runs synchronously.
                      ``ml_dtypes.bfloat16`` arrays are accepted where bfloat16 is.
JAX           CPU     viewed as NumPy (``np.asarray``), outputs returned with ``jnp.asarray``.
CuPy          CUDA    ``.data.ptr`` and strides of the array; outputs ``cupy.empty`` on the
                      array's device; the kernels run on CuPy's *current stream* of that
                      device, with no host synchronisation (capturable in a CUDA graph).
JAX           CUDA    imported zero-copy with ``torch.from_dlpack`` (which orders JAX's pending
                      work before torch's current stream through the protocol's ``stream``
                      argument), outputs allocated by torch, computed on torch's current
                      stream and handed back with ``jax.dlpack.from_dlpack`` (which orders
                      that stream before JAX's). No host synchronisation.
torch         any     used directly (the same views as the torch ops), returned as torch.
other         CPU     imported with ``np.from_dlpack``; NumPy arrays are returned.
other         CUDA    imported with ``torch.from_dlpack``; returned through the library's own
                      ``from_dlpack`` when its top-level module has one, else as torch tensors.
============  ======  =========================================================================

Only the NumPy / CPU path avoids torch entirely (this package imports torch lazily, for the
torch and CUDA-through-torch paths); note that ``import llada_ext`` itself imports torch.
The arguments are checked by ``llada_ext.ops._checks``, as the torch ops' are, with the same
errors and messages. Checks that read array *values* (targets in range, non-negative
``num_transfer``, finite weights) run only for host arrays: on a GPU they would need a device
synchronisation. On the device an out-of-range target gives a NaN loss, as the C ABI
documents. :mod:`._backends` holds one backend per row of the table above.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np

from .. import _C
from .._renamed import refuse_renamed_attention_args
from ..ops import _checks as checks
from ..ops._checks import REMASK_STRATEGIES, meta
from ._backends import Array, Call

__all__ = ["attention", "masked_cross_entropy", "remask", "REMASK_STRATEGIES"]


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


def attention(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Optional[Array] = None,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    **renamed: object,
) -> Union[Array, tuple[Array, Array]]:
    """Non-causal multi-head attention (forward only) on DLPack arrays.

    Parameters
    ----------
    q : array
        Queries ``[B, Sq, Hq, D]``. CPU: float32 or bfloat16; CUDA: float16 or bfloat16.
    k, v : array
        Keys and values ``[B, Sk, Hkv, D]``, q's dtype and device, ``Hq % Hkv == 0``.
    key_mask : array, optional
        bool ``[B, Sk]``; True = this key is attended. None attends every key. The former
        name ``key_padding_mask`` raises a TypeError (see ``llada_ext.attention``).
    scale : float, optional
        Multiplier of ``q . k``; defaults to ``D ** -0.5``.
    return_lse : bool
        Also return the float32 log-sum-exp of the scaled scores ``[B, Hq, Sq]`` (-inf for a
        query whose keys are all masked; its output row is 0).

    Returns
    -------
    array or (array, array)
        ``out [B, Sq, Hq, D]`` in q's dtype (and ``lse``), of q's array library.
    """
    refuse_renamed_attention_args(renamed)
    call = Call(q, "q")
    be = call.be
    q, k, v = call.arg(q, "q"), call.arg(k, "k"), call.arg(v, "v")
    qkv = (meta(q, "q"), meta(k, "k"), meta(v, "v"))
    B, Sq, Hq, D, Sk = checks.attention_shapes(*qkv, be.device_type)
    mask = call.opt_arg(key_mask, "key_mask")
    if mask is not None:
        checks.key_mask(meta(mask, "key_mask"), B, Sk)
        mask = be.prepare(mask, inner=False)
    scale = checks.attention_scale(scale, D)
    q, k, v = (be.prepare(a, inner=True) for a in (q, k, v))
    out = be.empty((B, Sq, Hq, D), q.dtype)
    lse = be.empty((B, Hq, Sq), "float32")
    ws_bytes = _C.attention_fwd_workspace_size(be.view(q), be.view(k))
    ws, ws_ptr = be.workspace(ws_bytes)
    _C.attention_fwd(
        be.view(q),
        be.view(k),
        be.view(v),
        be.opt_view(mask),
        scale,
        be.view(out),
        be.view(lse),
        be.stream(),
        ws_ptr,
        ws_bytes,
    )
    return (be.wrap(out), be.wrap(lse)) if return_lse else be.wrap(out)


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


def masked_cross_entropy(
    logits: Array,
    targets: Array,
    weights: Array,
    *,
    reduction: str = "sum",
    ignore_index: int = -100,
) -> Array:
    """Cross-entropy with per-token weights (forward only) on DLPack arrays.

    ``loss_i = weights_i * (logsumexp(logits_i) - logits_i[targets_i])``, accumulated in
    float32; rows with ``weights_i == 0`` or ``targets_i == ignore_index`` are never read
    (loss 0), as in :func:`llada_ext.masked_cross_entropy`.

    Parameters
    ----------
    logits : array
        ``[..., V]``, float32, bfloat16 or float16.
    targets : array
        int64 ``[...]``, in ``[0, V)`` where the weight is nonzero, or ``ignore_index``.
    weights : array
        float32 ``[...]``.
    reduction : {"sum", "mean", "none"}
        "sum" returns a float32 0-d array; "mean" that sum divided by the number of rows not
        skipped (0 if there are none); "none" float32 ``[...]``.
    ignore_index : int
        Target value whose rows are skipped (``F.cross_entropy``'s convention).

    Returns
    -------
    array
        The loss, of logits' array library.
    """
    checks.reduction(reduction, ("sum", "mean", "none"))
    ignore_index = checks.integer(ignore_index, "ignore_index")
    call = Call(logits, "logits")
    be = call.be
    logits = call.arg(logits, "logits")
    targets, weights = call.arg(targets, "targets"), call.arg(weights, "weights")
    V = checks.logits_vocab(meta(logits, "logits"), be.device_type)
    lead = tuple(logits.shape[:-1])
    checks.ce_targets(lead, meta(targets, "targets"), meta(weights, "weights"))
    weights = be.zero_where(weights, targets, ignore_index)
    t_host, w_host = be.host_values(targets), be.host_values(weights)
    if t_host is not None and t_host.size:
        bad = (w_host != 0) & ((t_host < 0) | (t_host >= V))
        checks.ce_values(bool(np.any(bad)), bool(np.all(np.isfinite(w_host))), V, ignore_index)
    n = math.prod(lead)
    logits2 = be.prepare(be.prepare(logits, inner=True).reshape((n, V)), inner=True)
    targets1 = be.prepare(targets.reshape((n,)), inner=False)
    weights1 = be.prepare(weights.reshape((n,)), inner=False)
    loss = be.empty((n,), "float32")
    _C.masked_ce_fwd(
        be.view(logits2), be.view(targets1), be.view(weights1), be.view(loss), None, be.stream()
    )
    loss = loss.reshape(lead)
    if reduction == "none":
        return be.wrap(loss)
    total = be.sum(loss)
    return be.wrap(total if reduction == "sum" else be.mean(total, weights1))


# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


def _num_transfer(call: Call, num_transfer: object, B: int, W: int) -> Any:
    """num_transfer as an int64 ``[B]`` array of the call's backend."""
    be = call.be
    count = checks.num_transfer_count(num_transfer, W, hasattr(num_transfer, "__dlpack__"))
    if count is not None:
        return be.full((B,), count, "int64")
    nt = call.arg(num_transfer, "num_transfer")
    if checks.num_transfer_array(meta(nt, "num_transfer"), B):
        nt = be.broadcast(nt.reshape((1,)), (B,))
    if checks.dtype_name(nt.dtype) != "int64":
        nt = be.astype(nt, "int64")
    host = be.host_values(nt)
    if host is not None and host.size:
        checks.num_transfer_values(bool(np.any(host < 0)))
    return nt


def remask(
    logits: Array,
    x: Array,
    num_transfer: Union[int, Array],
    *,
    mask_id: int,
    offset: int = 0,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: Optional[float] = None,
    seed: int = 0,
    uncond_logits: Optional[Array] = None,
    cfg_scale: float = 0.0,
    return_details: bool = False,
) -> Union[Array, tuple[Array, Array, Array]]:
    """One parallel decoding step (predict, score, keep the most confident) on DLPack arrays.

    Same semantics as :func:`llada_ext.remask`; the Gumbel noise (``temperature > 0``) and the
    "random" confidence come from the counter-based Philox stream keyed by ``seed``, so the
    same seed gives the same result on the CPU and on CUDA for the same float32 logits.

    Parameters
    ----------
    logits : array
        ``[B, W, V]`` predictions for ``x[:, offset:offset + W]`` (float32, bfloat16, float16).
    x : array
        int64 ``[B, L]``; positions equal to ``mask_id`` in the window are the candidates.
        Not modified.
    num_transfer : int or array
        Tokens to unmask per row: an int, or an integer array ``[B]`` (or 0-d).
    mask_id : int
        The mask token id: any int64 token id of x (it need not be a class of the logits).
    offset : int
        Start of the window in x.
    strategy : {"low_confidence", "random", "margin", "entropy"}
        How confidence is measured (see :func:`llada_ext.remask`).
    temperature : float
        0: argmax (ties -> lowest id); > 0: Gumbel-argmax of ``l / temperature``.
    threshold : float, optional
        Also unmask every candidate with confidence > threshold.
    seed : int
        Philox key (taken modulo 2**64).
    uncond_logits : array, optional
        Unconditional logits for classifier-free guidance,
        ``l = uncond + (cfg_scale + 1) * (logits - uncond)``.
    cfg_scale : float
        Guidance scale, used with uncond_logits.
    return_details : bool
        Also return ``x0`` int64 ``[B, W]`` and ``confidence`` float32 ``[B, W]`` (-inf at
        non-candidates).

    Returns
    -------
    array or (array, array, array)
        The new x (a new array of x's library), and the details when asked.
    """
    call = Call(logits, "logits")
    be = call.be
    logits, x = call.arg(logits, "logits"), call.arg(x, "x")
    uncond = call.opt_arg(uncond_logits, "uncond_logits")
    arrays = (meta(logits, "logits"), meta(x, "x"))
    B, W, V, L = checks.remask_arrays(
        *arrays, None if uncond is None else meta(uncond, "uncond_logits"), be.device_type
    )
    scalars = checks.remask_scalars(
        mask_id=mask_id,
        offset=offset,
        strategy=strategy,
        temperature=temperature,
        threshold=threshold,
        cfg_scale=cfg_scale,
        W=W,
        L=L,
    )
    seed = checks.integer(seed, "seed")
    nt = be.prepare(_num_transfer(call, num_transfer, B, W), inner=False)
    logits, x = be.prepare(logits, inner=True), be.prepare(x, inner=False)
    uncond = None if uncond is None else be.prepare(uncond, inner=True)
    x_out, x0 = be.empty((B, L), "int64"), be.empty((B, W), "int64")
    conf = be.empty((B, W), "float32")
    ws_bytes = _C.remask_workspace_size(be.view(logits), be.view(x))
    ws, ws_ptr = be.workspace(ws_bytes)
    _C.remask(
        be.view(logits),
        be.opt_view(uncond),
        be.view(x),
        be.view(nt),
        *scalars.c_args(seed),
        be.view(x_out),
        be.view(x0),
        be.view(conf),
        ws_ptr,
        ws_bytes,
        be.stream(),
    )
    if return_details:
        return be.wrap(x_out), be.wrap(x0), be.wrap(conf)
    return be.wrap(x_out)
