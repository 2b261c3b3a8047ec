"""Tensor views for the C ABI: (data_ptr, dtype, device_type, device_id, shape, strides)."""

from __future__ import annotations

import torch

# llada_dtype codes of csrc/include/llada/llada.h
FLOAT32, FLOAT16, BFLOAT16, FLOAT64, INT64, INT32, BOOL = range(7)
CPU, CUDA = 0, 1

TORCH_DTYPE_CODES = {
    torch.float32: FLOAT32,
    torch.float16: FLOAT16,
    torch.bfloat16: BFLOAT16,
    torch.float64: FLOAT64,
    torch.int64: INT64,
    torch.int32: INT32,
    torch.bool: BOOL,
}


def view(t: torch.Tensor) -> tuple:
    """The C ABI view of a strided torch tensor (no copy)."""
    dev = t.device
    if dev.type == "cpu":
        dtype_dev = (CPU, 0)
    elif dev.type == "cuda":
        dtype_dev = (CUDA, dev.index if dev.index is not None else torch.cuda.current_device())
    else:
        raise ValueError(f"tensors on device {dev} are not supported (cpu or cuda)")
    return (
        t.data_ptr(),
        TORCH_DTYPE_CODES[t.dtype],
        dtype_dev[0],
        dtype_dev[1],
        list(t.shape),
        list(t.stride()),
    )


def opt_view(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else view(t)


def stream_of(t: torch.Tensor) -> int:
    """The caller's current CUDA stream for t's device (0 on the CPU). Every op passes its
    stream through here, so this is also where a CUDA call that cannot run on this machine
    (no CUDA kernels, or a driver older than their runtime) is refused with the reason."""
    if t.device.type == "cuda":
        from ._cuda import require_cuda_kernels

        require_cuda_kernels()
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0
