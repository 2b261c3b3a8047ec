"""Argument checks and constants shared by the torch ops (and by ``llada_ext.dlpack``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
