"""The CPU executor's tensor-core fragment maps agree with CuTe's layouts.

``csrc/emu/lane_maps.h`` states, for the CPU executor, which lane, register and 16-bit half
of ``mma.sync.m16n8k16`` (A, B, C/D fragments) and ``ldmatrix.m8n8.{x1,x2,x4}[.trans]``
(source row addresses and destination registers) hold which matrix element.
``csrc/emu/tests/cute_lane_maps.cpp`` checks every one of them, for all 32 lanes, against an
independent statement of the same maps: CuTe's ``MMA_Traits`` of
``SM80_16x8x16_F32{F16F16,BF16BF16}F32_TN`` and ``Copy_Traits`` of
``SM75_U32x{1,2,4}_LDSM_N`` / ``SM75_U16x{2,4,8}_LDSM_T``. This test compiles that program on
the host against the CUTLASS headers of the ``nvidia-cutlass`` wheel and the CUDA CCCL headers,
runs it, and requires that it reports no mismatch. No GPU is needed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

_REPO = Path(__file__).resolve().parents[1]
_CSRC = _REPO / "csrc"
_SOURCE = _CSRC / "emu" / "tests" / "cute_lane_maps.cpp"


def _cutlass_include() -> Optional[Path]:
    """CUTLASS/CuTe headers shipped in the ``nvidia-cutlass`` wheel (found, not imported)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(spec.submodule_search_locations[0]) / "source" / "include"
    return include if (include / "cute" / "tensor.hpp").is_file() else None


def _cuda_include_dirs() -> Optional[list[Path]]:
    """``[<cuda>/include/cccl, <cuda>/include]`` of the first CUDA install that has CCCL."""
    roots = [Path("/usr/local/cuda")]
    if os.environ.get("CUDA_HOME"):
        roots.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    for root in roots:
        cccl = root / "include" / "cccl"
        if (cccl / "cuda" / "std" / "type_traits").exists():
            return [cccl, root / "include"]
    return None


def _compiler() -> Optional[str]:
    return shutil.which("c++") or shutil.which("g++")


def test_lane_maps_match_cute(tmp_path: Path) -> None:
    cutlass = _cutlass_include()
    if cutlass is None:
        pytest.skip("CUTLASS headers not found (pip install --no-deps nvidia-cutlass==4.2.0.0)")
    cuda = _cuda_include_dirs()
    if cuda is None:
        pytest.skip("CUDA CCCL headers (include/cccl/cuda/std) not found")
    cxx = _compiler()
    assert cxx is not None, "no host C++ compiler (c++ or g++) on PATH"

    exe = tmp_path / "cute_lane_maps"
    cmd = [cxx, "-std=c++17", "-O0", "-w", f"-I{cutlass}"]
    cmd += [f"-I{d}" for d in cuda]
    cmd += [f"-I{_CSRC}", str(_SOURCE), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, (
        f"compiling {_SOURCE.name} failed:\n{' '.join(cmd)}\n{build.stdout}\n{build.stderr[-8000:]}"
    )

    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    mismatches = [line for line in lines if line.startswith("MISMATCH")]
    assert run.returncode == 0, (
        f"{_SOURCE.name} exited with {run.returncode}; lane_maps.h disagrees with CuTe "
        f"({len(mismatches)} mismatch lines, first {min(len(mismatches), 40)} shown):\n"
        + "\n".join(mismatches[:40] + lines[-2:])
        + (f"\nstderr:\n{run.stderr[-4000:]}" if run.stderr else "")
    )
    assert "0 mismatches" in run.stdout, run.stdout
