"""A built wheel is clean: one copy of the kernel library, no build paths in any RUNPATH, no
link to a BLAS of the build machine, type information and project metadata.

The wheel is built from this checkout with ``pip wheel --no-build-isolation --no-deps`` (the
way flash-attn-style extensions are installed), reusing the CMake build folder of the
editable install, so it costs a relink rather than a full build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("readelf") is None:
        pytest.skip("needs readelf")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(out),
            "-q",
            "--disable-pip-version-check",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("llada_ext-*.whl")
    return whl


def test_one_copy_of_the_kernel_library(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    libs = [n for n in names if "libllada_kernels" in n]
    assert libs == ["llada_ext/libllada_kernels.so"], libs
    assert "llada_ext/py.typed" in names


def test_runpaths_hold_no_build_paths_and_no_blas(wheel, tmp_path):
    zf = zipfile.ZipFile(wheel)
    for name in zf.namelist():
        if not name.endswith(".so"):
            continue
        path = Path(zf.extract(name, tmp_path))
        dyn = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
        runpaths = re.findall(r"R(?:UN)?PATH.*\[([^\]]*)\]", dyn)
        for rp in runpaths:
            for entry in rp.split(":"):
                assert entry in ("$ORIGIN", ""), f"{name}: RUNPATH entry {entry!r}"
        assert "blas" not in dyn.lower(), f"{name} links a BLAS: {dyn}"


def test_metadata_has_urls_and_classifiers(wheel):
    zf = zipfile.ZipFile(wheel)
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    text = zf.read(meta).decode()
    assert "Project-URL: LLaDA paper, https://arxiv.org/abs/2502.09992" in text
    assert "Classifier: Typing :: Typed" in text
