"""The CUDA kernels on the CPU executor: run them on host tensors, with memory and sync checks.

``llada_ext._C_emu`` is the kernel library built a second way: the same ``csrc/cuda`` sources,
compiled by the host compiler and linked with the executor of ``csrc/emu``, which emulates the
CUDA execution model (threads of a block as concurrent fibers, barriers, warp shuffles,
``ldmatrix``, ``mma.sync``, ``cp.async`` groups, atomics) and checks every global and shared
memory access of a kernel: out-of-bounds accesses, shared-memory races, reads of uninitialised
shared memory or of bytes an unfinished ``cp.async`` fills, and barrier divergence.

Each function below takes CPU tensors, passes them to the CUDA code path (the C ABI sees them
as CUDA tensors; their memory is host memory), runs the kernels and returns what they wrote.
A checker report, or any kernel error, raises :class:`EmulatorError`. This is how the CUDA
kernels are tested on machines without a GPU; it says nothing about their speed.

Set ``LLADA_EMU_MODULE`` to the path of another build of ``_C_emu`` to test that build.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import _views
from .ops._checks import REMASK_STRATEGIES, RemaskScalars

__all__ = [
    "EmulatorError",
    "available",
    "attention_fwd",
    "attention_bwd",
    "masked_ce_fwd",
    "masked_ce_bwd",
    "remask",
]


class EmulatorError(RuntimeError):
    """A kernel failed on the executor: a checker report or a launch error."""


_module: Optional[ModuleType] = None


def _load() -> ModuleType:
    global _module
    if _module is None:
        path = os.environ.get("LLADA_EMU_MODULE")
        if path:
            spec = importlib.util.spec_from_file_location("_C_emu", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"LLADA_EMU_MODULE={path!r} is not a loadable module")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _module = mod
        else:
            from . import _C_emu  # type: ignore[attr-defined]

            _module = _C_emu
    return _module


def available() -> bool:
    """True if this installation has the executor module (built unless ``LLADA_EMU=0``)."""
    try:
        _load()
    except ImportError:
        return False
    return True


def _view(t: Tensor) -> tuple:
    """A C ABI view of a host tensor, tagged as a CUDA tensor of device 0."""
    if t.device.type != "cpu":
        raise ValueError(f"the executor runs on host tensors, got a tensor on {t.device}")
    ptr, dtype, _, _, shape, strides = _views.view(t)
    return (ptr, dtype, _views.CUDA, 0, shape, strides)


def _opt_view(t: Optional[Tensor]) -> Optional[tuple]:
    return None if t is None else _view(t)


def _call(fn_name: str, *args) -> None:
    try:
        getattr(_load(), fn_name)(*args)
    except RuntimeError as e:
        raise EmulatorError(str(e)) from None


def _scratch(nbytes: int, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Host scratch for a kernel asking for ``nbytes``: a buffer of ``dtype`` elements (torch
    aligns it far beyond the 8 bytes the float2 atomics and double row states need), to keep
    referenced until the call returns, and the address to pass (0 for no bytes). The executor
    is told ``nbytes``, so it checks accesses against exactly that size."""
    ws = torch.empty(-(-nbytes // dtype.itemsize), dtype=dtype)
    return ws, ws.data_ptr() if nbytes else 0


def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    split: bool = True,
) -> tuple[Tensor, Tensor]:
    """CUDA attention forward on the executor.

    Parameters
    ----------
    q, k, v : Tensor
        ``[B, Sq, Hq, D]`` and ``[B, Sk, Hkv, D]``, float16 or bfloat16, last dim contiguous.
    key_mask : Tensor, optional
        bool ``[B, Sk]``, True = attended.
    scale : float, optional
        Defaults to ``D ** -0.5``.
    split : bool
        Pass the workspace of ``llada_attention_fwd_workspace_size``, as ``lx.attention``
        does, so decode-shaped calls take the split-KV path; ``False`` forces one pass.

    Returns
    -------
    (Tensor, Tensor)
        ``out`` ``[B, Sq, Hq, D]`` in q's dtype and ``lse`` float32 ``[B, Hq, Sq]``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    ws_bytes = _load().attention_fwd_workspace_size(_view(q), _view(k)) if split else 0
    ws, ws_ptr = _scratch(ws_bytes, torch.float32)  # float32 partial rows
    _call(
        "attention_fwd",
        _view(q),
        _view(k),
        _view(v),
        _opt_view(key_mask),
        scale,
        _view(out),
        _view(lse),
        0,
        ws_ptr,
        ws_bytes,
    )
    return out, lse


def attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CUDA attention backward on the executor; returns ``(dq, dk, dv)`` in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=q.dtype)
    dv = torch.empty(v.shape, dtype=q.dtype)
    mod = _load()
    ws_bytes = mod.attention_bwd_workspace_size(_view(q), _view(k))
    ws, ws_ptr = _scratch(ws_bytes, torch.float32)
    _call(
        "attention_bwd",
        _view(q),
        _view(k),
        _view(v),
        _opt_view(key_mask),
        _view(out),
        _view(dout),
        _view(lse),
        scale,
        _view(dq),
        _view(dk),
        _view(dv),
        ws_ptr,
        ws_bytes,
        0,
    )
    return dq, dk, dv


def masked_ce_fwd(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """CUDA masked cross-entropy forward on the executor.

    ``logits`` ``[N, V]`` (float32, bfloat16, float16; row stride free), ``targets`` int64
    ``[N]``, ``weights`` float32 ``[N]``. Returns ``(loss, lse)``, both float32 ``[N]``.
    """
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32)
    lse = torch.empty(n, dtype=torch.float32)
    _call(
        "masked_ce_fwd", _view(logits), _view(targets), _view(weights), _view(loss), _view(lse), 0
    )
    return loss, lse


def masked_ce_bwd(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    grad_logits: Optional[Tensor] = None,
) -> Tensor:
    """CUDA masked cross-entropy backward on the executor.

    Writes ``grad_loss_i * w_i * (softmax(logits_i) - onehot(t_i))`` into ``grad_logits``
    (a new tensor if None; it may be ``logits`` itself) and returns it.
    """
    if grad_logits is None:
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype)
    _call(
        "masked_ce_bwd",
        _view(logits),
        _view(targets),
        _view(weights),
        _view(lse),
        _view(grad_loss),
        _view(grad_logits),
        0,
    )
    return grad_logits


def remask(
    logits: Tensor,
    x: Tensor,
    num_transfer: Tensor,
    *,
    mask_id: int,
    seed: int = 0,
    offset: int = 0,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: Optional[float] = None,
    uncond_logits: Optional[Tensor] = None,
    cfg_scale: float = 0.0,
    x_out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CUDA remask step on the executor, with an explicit Philox ``seed``.

    ``num_transfer`` is int64 ``[B]``. Writes the new sequence into ``x_out`` (a copy of x
    if None; it may be ``x`` itself) and returns ``(x_out, x0, confidence)``.
    """
    B, W = logits.shape[0], logits.shape[1]
    if x_out is None:
        x_out = torch.empty_like(x)
    x0 = torch.empty((B, W), dtype=torch.int64)
    conf = torch.empty((B, W), dtype=torch.float32)
    ws_bytes = _load().remask_workspace_size(_view(logits), _view(x))
    ws, ws_ptr = _scratch(ws_bytes, torch.float64)  # the row states hold doubles
    scalars = RemaskScalars(
        mask_id,
        offset,
        REMASK_STRATEGIES[strategy],
        float(temperature),
        threshold is not None,
        0.0 if threshold is None else float(threshold),
        float(cfg_scale),
    )
    _call(
        "remask",
        _view(logits),
        _opt_view(uncond_logits),
        _view(x),
        _view(num_transfer),
        *scalars.c_args(seed),
        _view(x_out),
        _view(x0),
        _view(conf),
        ws_ptr,
        ws_bytes,
        0,
    )
    return x_out, x0, conf
