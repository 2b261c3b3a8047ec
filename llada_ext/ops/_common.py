"""What the torch ops share besides the argument checks of :mod:`._checks`: taking a tensor
argument (type and device), preparing tensors for the kernels and their workspaces."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _tensor(t: object, name: str, ref: Optional[Tensor] = None, ref_name: str = "") -> Tensor:
    """``t`` if it is a tensor on the CPU or CUDA (on ``ref``'s device when one is given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: tensors on device {t.device} are not supported (cpu or cuda)")
    if ref is not None and t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {ref.device}")
    return t


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


def _workspace(nbytes: int, device: torch.device) -> tuple[Optional[Tensor], int]:
    """Scratch of ``nbytes`` for one kernel call: the buffer (keep it referenced until the
    call returns) and its address; ``(None, 0)`` when the kernel needs none."""
    if not nbytes:
        return None, 0
    ws = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return ws, ws.data_ptr()
