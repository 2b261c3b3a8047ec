"""The CPU attention finds OpenBLAS at run time, whatever the build environment had.

The build never looks for a BLAS (so ``pip install --no-build-isolation`` before or after the
dependencies cannot silently drop it). At run time the kernels take the scipy-openblas32 copy
the package loads, or the library ``LLADA_BLAS_LIB`` names; without one they run plain loops,
which ``build_info()`` names and the package warns about once. Each case runs in a fresh
process, since the choice is made once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import llada_ext as lx

PROBE = r"""
import json, sys, logging
if {block!r}:
    sys.modules["scipy_openblas32"] = None  # as if the wheel were not installed
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
import torch, llada_ext as lx
torch.manual_seed(0)
q, k, v = torch.randn(1, 300, 4, 64), torch.randn(1, 300, 2, 64), torch.randn(1, 300, 2, 64)
out = lx.attention(q, k, v)
torch.save(out, sys.argv[1])
print(json.dumps(lx.build_info()))
"""


def probe(tmp_path, *, block: bool, env: dict | None = None):
    out_path = tmp_path / f"out-{block}-{len(os.listdir(tmp_path))}.pt"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(block=block), str(out_path)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    import torch

    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr, torch.load(out_path)


def _wheel_lib() -> str:
    import scipy_openblas32 as s

    return os.path.join(s.get_lib_dir(), f"lib{s.get_library()}.so")


def test_the_wheels_openblas_is_used():
    assert lx.build_info()["blas"].startswith("scipy-openblas32 (")


def test_without_a_blas_plain_loops_are_named_and_warned_once(tmp_path):
    info, err, out_loops = probe(tmp_path, block=True)
    assert info["blas"].startswith("none: plain loops")
    assert err.count("no OpenBLAS found") == 1
    info_blas, err_blas, out_blas = probe(tmp_path, block=False)
    assert info_blas["blas"].startswith("scipy-openblas32") and "no OpenBLAS" not in err_blas
    # the same result up to float32 rounding order
    import torch

    torch.testing.assert_close(out_loops, out_blas, rtol=1e-5, atol=1e-6)


def test_llada_blas_lib_names_the_library(tmp_path):
    info, _, _ = probe(tmp_path, block=True, env={"LLADA_BLAS_LIB": _wheel_lib()})
    assert info["blas"] == f"scipy-openblas32 ({_wheel_lib()})"
    info, err, _ = probe(tmp_path, block=False, env={"LLADA_BLAS_LIB": "/nonexistent/libx.so"})
    assert "LLADA_BLAS_LIB=/nonexistent/libx.so is not a loadable OpenBLAS" in info["blas"]
    assert err.count("no OpenBLAS found") == 1


def test_the_library_does_not_link_a_blas():
    """No DT_NEEDED entry or RUNPATH ties the kernel library to a BLAS of the build machine."""
    from pathlib import Path

    lib = Path(lx.__file__).parent / "libllada_kernels.so"
    if not lib.exists():
        pytest.skip("no in-place libllada_kernels.so")
    dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "blas" not in dyn.lower(), dyn
