"""``llada_ext.build_info()`` names what runs and how it was built, and every field is
plausible: the commit the build came from (``"unknown"`` without git metadata), the compiler,
the CUDA toolkit and architectures (or none), the BLAS found at run time, OpenMP and its
``_OPENMP`` date.

The commit is captured when CMake configures, so an editable build can be older than the
checkout's HEAD; the installed value is checked for form (and, for a build of this checkout,
for being one of its commits), and the capture itself is checked by configuring the project
the way the three cases arise: from this checkout, from a copy without git metadata (an
sdist), and with ``LLADA_GIT_COMMIT`` set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llada_ext as lx

ROOT = Path(__file__).resolve().parents[1]
COMMIT_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})(?:-dirty)?$")
KEYS = {
    "version": str,
    "abi_version": int,
    "commit": str,
    "compiler": str,
    "cuda_kernels": bool,
    "cuda_toolkit": (str, type(None)),
    "cuda_archs": list,
    "blas": str,
    "openmp": bool,
    "openmp_version": int,
    "cpu_executor": bool,
    "torch": str,
}


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True
    )


def _is_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    top = _git("rev-parse", "--show-toplevel")
    return top.returncode == 0 and Path(top.stdout.strip()).resolve() == ROOT


def _built_from_this_checkout() -> bool:
    return Path(lx.__file__).resolve().parent == ROOT / "llada_ext"


def test_every_field_is_present_with_its_type():
    info = lx.build_info()
    assert set(info) == set(KEYS), set(info) ^ set(KEYS)
    for key, kind in KEYS.items():
        assert isinstance(info[key], kind), (key, info[key])
    assert info["version"] == lx.__version__
    assert json.loads(json.dumps(info)) == info  # plain data, ready for a bug report


def test_commit_names_a_build():
    commit = lx.build_info()["commit"]
    if commit == "unknown":
        return
    if _built_from_this_checkout() and _is_git_checkout() and COMMIT_RE.match(commit):
        # possibly older than HEAD (an editable build is refreshed by the next build), but
        # always a commit of this repository
        sha = commit.removesuffix("-dirty")
        assert _git("cat-file", "-e", f"{sha}^{{commit}}").returncode == 0, commit
    else:
        # a name given through LLADA_GIT_COMMIT at build time
        assert re.match(r"^[0-9A-Za-z._+-]+$", commit), commit


def test_compiler_cuda_openmp_blas_are_plausible():
    info = lx.build_info()
    assert re.match(r"^(GNU|Clang|AppleClang|IntelLLVM) \d+(\.\d+)+", info["compiler"]), info
    if info["cuda_kernels"]:
        assert re.match(r"^\d+\.\d+", info["cuda_toolkit"] or ""), info
        assert info["cuda_archs"], info
        for arch in info["cuda_archs"]:
            assert re.match(r"^(\d+[af]?(-real|-virtual)?|native|all|all-major)$", arch), arch
    else:
        assert info["cuda_toolkit"] is None and info["cuda_archs"] == [], info
    # OpenMP is required by the build; _OPENMP is a yyyymm date (201511 = OpenMP 4.5)
    assert info["openmp"] is True
    v = info["openmp_version"]
    assert 200505 <= v < 210000 and 1 <= v % 100 <= 12, v
    assert info["blas"].startswith(("scipy-openblas32 (", "OpenBLAS (", "none: plain loops")), info


# ---- the commit capture, at configure time ------------------------------------------------


def _cmake() -> str | None:
    here = Path(sys.executable).parent / "cmake"
    return str(here) if here.exists() else shutil.which("cmake")


def _configured_commit(src: Path, build: Path, env: dict | None = None) -> str:
    cmake = _cmake()
    if cmake is None or shutil.which("c++") is None:
        pytest.skip("needs cmake and a C++ compiler")
    if not (ROOT / "CMakeLists.txt").exists():
        pytest.skip("needs the project's sources")
    run_env = {k: v for k, v in os.environ.items() if k != "LLADA_GIT_COMMIT"}
    run_env.update({"LLADA_CUDA": "0", "LLADA_EMU": "0", **(env or {})})
    proc = subprocess.run(
        [
            cmake,
            "-S",
            str(src),
            "-B",
            str(build),
            "-DLLADA_BUILD_PYTHON=OFF",
            "-DLLADA_INSTALL=OFF",
        ],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    m = re.search(r"llada: commit (\S+), ", proc.stdout)
    assert m, proc.stdout[-2000:]
    return m.group(1)


def _copy_sources(dst: Path) -> Path:
    if not (ROOT / "CMakeLists.txt").exists():
        pytest.skip("needs the project's sources")
    dst.mkdir(parents=True)
    shutil.copy2(ROOT / "CMakeLists.txt", dst)
    for folder in ("cmake", "csrc"):
        shutil.copytree(ROOT / folder, dst / folder)
    return dst


def test_configure_from_this_checkout_captures_head(tmp_path):
    if not _is_git_checkout():
        pytest.skip("not a git checkout")
    commit = _configured_commit(ROOT, tmp_path / "build")
    head = _git("rev-parse", "HEAD").stdout.strip()
    assert COMMIT_RE.match(commit), commit
    assert commit.removesuffix("-dirty") == head


def test_configure_without_git_metadata_says_unknown(tmp_path):
    src = _copy_sources(tmp_path / "sdist")
    assert _configured_commit(src, tmp_path / "build") == "unknown"
    # a copy inside some other repository does not take that repository's commit
    if shutil.which("git") is None:
        return
    outer = tmp_path / "outer"
    src = _copy_sources(outer / "llada_ext-0.1.0")
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "outer"]):
        subprocess.run(
            ["git", *cmd], cwd=outer, check=True, capture_output=True, env={**os.environ, **env}
        )
    assert _configured_commit(src, tmp_path / "build-outer") == "unknown"


def test_llada_git_commit_names_the_commit(tmp_path):
    src = _copy_sources(tmp_path / "sdist")
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert _configured_commit(src, tmp_path / "b1", {"LLADA_GIT_COMMIT": sha}) == sha
    # anything that is not a plain name is refused, not pasted into a compile definition
    assert _configured_commit(src, tmp_path / "b2", {"LLADA_GIT_COMMIT": 'x" -DEVIL'}) == "unknown"
