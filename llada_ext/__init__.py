"""llada_ext: kernels, model, training and sampling for masked diffusion language models.

The three kernels (non-causal attention, masked cross-entropy fused with the LM head,
parallel confidence remasking) live in a C/C++/CUDA library with a plain C ABI
(``csrc/include/llada/llada.h``); this package exposes them as torch ops.
"""

import ctypes as _ctypes
import logging as _logging
import os as _os

# Library messages go to the "llada_ext" logger tree (one logger per module); the
# application decides where they appear. The llada-ext CLI shows INFO and above on stderr.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def _preload_openblas() -> None:
    # The CPU attention tiles may use OpenBLAS from the scipy-openblas32 wheel; load it by
    # path first so the kernel library finds it wherever the package was built.
    try:
        import scipy_openblas32
    except ImportError:
        return
    path = _os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")
    if _os.path.exists(path):
        _ctypes.CDLL(path, mode=_ctypes.RTLD_GLOBAL)


_preload_openblas()

from . import _C  # noqa: E402
from ._cuda import CudaStatus, cuda_status  # noqa: E402
from .generation_config import generation_settings  # noqa: E402
from .hf import patch_hf_llada, unpatch_hf_llada  # noqa: E402
from .likelihood import log_likelihood, score_choices  # noqa: E402
from .model import LLaDAConfig, LLaDAModel  # noqa: E402
from .ops import (  # noqa: E402
    attention,
    linear_masked_cross_entropy,
    masked_cross_entropy,
    remask,
    remask_,
)
from .sampling import SamplerGraphs, decode_answers, generate, truncate_at_eos  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "attention",
    "masked_cross_entropy",
    "linear_masked_cross_entropy",
    "remask",
    "remask_",
    "LLaDAConfig",
    "LLaDAModel",
    "generate",
    "SamplerGraphs",
    "decode_answers",
    "truncate_at_eos",
    "log_likelihood",
    "score_choices",
    "generation_settings",
    "patch_hf_llada",
    "unpatch_hf_llada",
    "has_cuda_kernels",
    "cuda_status",
    "CudaStatus",
    "build_info",
]


def has_cuda_kernels() -> bool:
    """True if the kernel library was built with its CUDA kernels (whether they can run on
    this machine's driver and GPU is :func:`cuda_status`)."""
    return bool(_C.has_cuda())


def build_info() -> dict:
    """What this installation runs and how it was built.

    Returns
    -------
    dict
        ``version`` (package), ``abi_version`` (the C library's LLADA_VERSION),
        ``commit`` (the git commit the extension was built from, with ``-dirty`` when tracked
        files differed, captured when CMake configured; the environment variable
        ``LLADA_GIT_COMMIT`` at build time names it for a tree without git metadata; else
        ``"unknown"``, e.g. for a build from an sdist), ``compiler`` (C++ compiler id and
        version, e.g. ``"GNU 12.2.0"``), ``cuda_kernels`` (built with CUDA),
        ``cuda_toolkit`` (CUDA toolkit version, ``None`` without CUDA), ``cuda_archs``
        (the CUDA architectures compiled, e.g. ``["80", "90"]``; empty without CUDA),
        ``blas`` (the BLAS the CPU attention tiles found at run time, or
        "none: plain loops ..."), ``openmp`` (built with OpenMP), ``openmp_version`` (its
        ``_OPENMP`` value, e.g. 201511; 0 without OpenMP), ``cpu_executor`` (whether the
        CUDA kernels can run on the CPU executor, ``llada_ext.emu``), ``torch``.
    """
    import torch

    from . import emu

    cfg = _C.build_config()
    return {
        "version": __version__,
        "abi_version": int(_C.version()),
        "commit": str(cfg["commit"]),
        "compiler": str(cfg["compiler"]),
        "cuda_kernels": has_cuda_kernels(),
        "cuda_toolkit": str(cfg["cuda_toolkit"]) or None,
        "cuda_archs": [a for a in str(cfg["cuda_archs"]).split(",") if a],
        "blas": str(_C.blas_info()),
        "openmp": bool(cfg["openmp"]),
        "openmp_version": int(cfg["openmp_version"]),
        "cpu_executor": emu.available(),
        "torch": torch.__version__,
    }


_blas = _C.blas_info()
if _blas.startswith("none"):
    _logging.getLogger(__name__).warning(
        "llada_ext: no OpenBLAS found, the CPU attention uses plain loops (several times "
        "slower): %s",
        _blas,
    )
