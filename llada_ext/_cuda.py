"""Can the CUDA kernels run here? One cached answer, from the CUDA runtime the library links.

A build with CUDA kernels links a static CUDA runtime, which needs a driver at least as new as
that runtime (CUDA 13.0: driver 580 or newer). torch may still see the GPU through its own,
older runtime, so ``torch.cuda.is_available()`` does not answer this; ``llada_cuda_status``
does, with the runtime's own reason.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

log = logging.getLogger(__name__)


class CudaStatus(NamedTuple):
    """Result of :func:`llada_ext.cuda_status`."""

    usable: bool  # the CUDA kernels can run on this machine
    reason: str  # why not (empty when usable)


@functools.lru_cache(maxsize=1)
def cuda_status() -> CudaStatus:
    """Whether the library's CUDA kernels can run on this machine, and why not.

    Returns
    -------
    CudaStatus
        ``usable`` is True when the library was built with its CUDA kernels and its CUDA
        runtime finds a device; otherwise ``reason`` gives the runtime's own message with the
        runtime and driver versions (e.g. "CUDA driver version is insufficient for CUDA
        runtime version (the library's CUDA runtime is 13.0; the installed driver supports
        CUDA 12.4)") or says that the build has no CUDA kernels. The answer is computed once
        per process.
    """
    from . import _C

    usable, reason = _C.cuda_status()
    return CudaStatus(bool(usable), str(reason))


def require_cuda_kernels() -> None:
    """Raise a RuntimeError with the reason when the CUDA kernels cannot run here."""
    status = cuda_status()
    if not status.usable:
        raise RuntimeError(
            f"llada_ext: the CUDA kernels cannot run on this machine: {status.reason}. Use CPU "
            "tensors, or build llada_ext against a CUDA toolkit this driver supports "
            "(see the README's set-up notes)"
        )


@functools.lru_cache(maxsize=1)
def warn_torch_fallback() -> None:
    """Log, once per process, that the model's attention runs through torch instead."""
    log.warning(
        "llada_ext: the CUDA kernels cannot run on this machine (%s); the model's attention "
        "runs through torch SDPA instead",
        cuda_status().reason,
    )
