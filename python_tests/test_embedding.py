"""Embedding the kernels in other programs and frameworks.

- The C library as an installed CMake package: configure + build + install it (CPU-only, no
  Python module, no OpenBLAS, so the package is self-contained), then build and run the C and
  C++ examples against the installed prefix; the package's version rules; pkg-config.
- The C ABI under abuse, through ctypes: every entry point with null pointers, bad dtypes,
  bad shapes and strides, mismatched or unavailable devices returns the documented status and
  a message, never crashes, and never writes its outputs; the thread-local error message; the
  struct layouts and enum values that the ABI promises never change.
- ``llada_ext.dlpack`` on NumPy arrays gives the numbers of the torch ops and of plain float64
  references; CuPy / JAX cases run only where those libraries and a GPU are present.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import llada_ext as lx
from llada_ext import dlpack as dl
from llada_ext import ops

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "llada" / "llada.h"

# ------------------------------------------------------------------------------------------
# building the installed package
# ------------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    # Prefer the tools of the running environment (the venv ships cmake and ninja).
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


CMAKE, NINJA = _tool("cmake"), _tool("ninja")


def _run(
    cmd: list[str], cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("CMAKE_PREFIX_PATH", None)  # only the prefix under test may satisfy find_package
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-4000:]
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return proc


def _generator() -> list[str]:
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={NINJA}"] if NINJA else []


@pytest.fixture(scope="session")
def installed_prefix(tmp_path_factory) -> Path:
    """The C library configured, built (2 jobs) and installed into a fresh prefix, once."""
    if CMAKE is None or shutil.which("cc") is None or shutil.which("c++") is None:
        pytest.skip("needs cmake and a C/C++ compiler")
    base = tmp_path_factory.mktemp("llada_install")
    build, prefix = base / "build", base / "prefix"
    _run(
        [
            CMAKE,
            "-S",
            str(ROOT),
            "-B",
            str(build),
            *_generator(),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLADA_BUILD_PYTHON=OFF",
            "-DLLADA_CUDA=OFF",
        ]
    )
    _run([CMAKE, "--build", str(build), "-j", "2"])
    _run([CMAKE, "--install", str(build), "--prefix", str(prefix)])
    return prefix


def _installed_lib(prefix: Path) -> Path:
    libs = sorted((prefix / "lib").glob("libllada_kernels.so*")) + sorted(
        (prefix / "lib64").glob("libllada_kernels.so*")
    )
    assert libs, f"no libllada_kernels.so under {prefix}"
    return libs[0]


def test_install_layout(installed_prefix):
    p = installed_prefix
    assert (p / "include" / "llada" / "llada.h").read_text() == HEADER.read_text()
    cmake_dir = next(p.glob("lib*/cmake/llada_kernels"))
    for f in (
        "llada_kernelsConfig.cmake",
        "llada_kernelsConfigVersion.cmake",
        "llada_kernelsTargets.cmake",
    ):
        assert (cmake_dir / f).is_file(), f
    lib = _installed_lib(p)
    lib_c = ctypes.CDLL(str(lib))
    for name in _ENTRY_POINTS:
        assert hasattr(lib_c, name), name
    if shutil.which("readelf") is None or shutil.which("nm") is None:
        return
    # Self-contained: without OpenBLAS the installed library has no RPATH (none into the build
    # tree or the checkout) and needs nothing outside the C/C++/OpenMP runtimes.
    dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "RPATH" not in dyn and "RUNPATH" not in dyn, dyn
    needed = set(re.findall(r"Shared library: \[([^\]]+)\]", dyn))
    allowed = (
        "libc.",
        "libm.",
        "libstdc++",
        "libgcc_s",
        "libgomp",
        "ld-linux",
        "libpthread",
        "libdl.",
        "librt.",
    )
    assert all(n.startswith(allowed) for n in needed), needed
    # The exported llada_* symbols are exactly the documented entry points; the C++
    # internals (namespace llada) stay hidden.
    syms = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True
    ).stdout.split()
    assert {s for s in syms if s.startswith("llada_")} == set(_ENTRY_POINTS)
    assert not [s for s in syms if s.startswith("_ZN5llada")]


def _build_and_run_example(name: str, prefix: Path, tmp_path: Path) -> str:
    build = tmp_path / f"example-{name}"
    _run(
        [
            CMAKE,
            "-S",
            str(ROOT / "examples" / name),
            "-B",
            str(build),
            *_generator(),
            f"-DCMAKE_PREFIX_PATH={prefix}",
        ]
    )
    _run([CMAKE, "--build", str(build), "-j", "2"])
    exe = build / f"llada_example_{name}"
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout
    return proc.stdout


def test_c_example(installed_prefix, tmp_path):
    out = _build_and_run_example("c", installed_prefix, tmp_path)
    assert "remask: ok" in out and "attention forward: ok" in out


def test_cpp_example(installed_prefix, tmp_path):
    out = _build_and_run_example("cpp", installed_prefix, tmp_path)
    assert "attention forward + backward: ok" in out


def _header_version() -> tuple[int, int, int]:
    text = HEADER.read_text()
    return tuple(
        int(re.search(rf"#define LLADA_VERSION_{p} (\d+)", text).group(1))
        for p in ("MAJOR", "MINOR", "PATCH")
    )


@pytest.mark.parametrize(
    "request_version,found",
    [
        ("", True),
        ("{major}.{minor}", True),
        ("{major}.{minor}.{patch} EXACT", True),
        ("{next_major}.0", False),
        ("{major}.{minor_next}", False),
    ],
)
def test_package_version_rules(installed_prefix, tmp_path, request_version, found):
    """find_package accepts the same major version at or below the installed one only."""
    major, minor, patch = _header_version()
    req = request_version.format(
        major=major, minor=minor, patch=patch, next_major=major + 1, minor_next=minor + 1
    )
    src = tmp_path / "probe"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(probe LANGUAGES NONE)\n"
        f"find_package(llada_kernels {req} CONFIG)\n"
        'message(STATUS "probe found=${llada_kernels_FOUND} cuda=${llada_kernels_WITH_CUDA}")\n'
        'if(TARGET llada::kernels)\n  message(STATUS "probe target ok")\nendif()\n'
    )
    proc = _run(
        [
            CMAKE,
            "-S",
            str(src),
            "-B",
            str(tmp_path / "b"),
            f"-DCMAKE_PREFIX_PATH={installed_prefix}",
        ]
    )
    if found:
        assert "probe found=1 cuda=OFF" in proc.stdout
        assert "probe target ok" in proc.stdout
    else:
        assert "probe found=0" in proc.stdout


def test_pkg_config(installed_prefix, tmp_path):
    if shutil.which("pkg-config") is None:
        pytest.skip("pkg-config not installed")
    pc_dir = next(installed_prefix.glob("lib*/pkgconfig"))
    env = dict(os.environ, PKG_CONFIG_PATH=str(pc_dir))
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "llada_kernels"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    exe = tmp_path / "example_c_pkgconfig"
    libdir = _installed_lib(installed_prefix).parent
    _run(
        [
            "cc",
            "-std=c99",
            str(ROOT / "examples" / "c" / "main.c"),
            "-o",
            str(exe),
            *flags,
            f"-Wl,-rpath,{libdir}",
            "-lm",
        ]
    )
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------
# the C ABI through ctypes
# ------------------------------------------------------------------------------------------

OK, INVALID, DTYPE, MISMATCH, NOT_COMPILED, CUDA_ERR, WORKSPACE, INTERNAL = range(8)
F32, F16, BF16, F64, I64, I32, BOOL = range(7)
CPU, CUDA = 0, 1

_ENTRY_POINTS = (
    "llada_last_error",
    "llada_version",
    "llada_has_cuda",
    "llada_cuda_status",
    "llada_blas_info",
    "llada_status_string",
    "llada_attention_fwd",
    "llada_attention_fwd_workspace_size",
    "llada_attention_fwd_ws",
    "llada_attention_bwd_workspace_size",
    "llada_attention_bwd",
    "llada_masked_ce_fwd",
    "llada_masked_ce_bwd",
    "llada_remask_workspace_size",
    "llada_remask",
)


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * 8),
        ("strides", ctypes.c_int64 * 8),
    ]


class RemaskParams(ctypes.Structure):
    _fields_ = [
        ("mask_id", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("strategy", ctypes.c_int32),
        ("has_threshold", ctypes.c_int32),
        ("threshold", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("cfg_scale", ctypes.c_float),
        ("seed", ctypes.c_uint64),
    ]


_NP_CODES = {
    np.dtype(np.float32): F32,
    np.dtype(np.float16): F16,
    np.dtype(np.float64): F64,
    np.dtype(np.int64): I64,
    np.dtype(np.int32): I32,
    np.dtype(np.bool_): BOOL,
}


def tv(a: np.ndarray, **override) -> Tensor:
    """A Tensor view of a NumPy array (the array must outlive the call)."""
    t = Tensor()
    t.data = a.ctypes.data
    t.dtype = _NP_CODES[a.dtype]
    t.device_type, t.device_id = CPU, 0
    t.ndim = a.ndim
    for i, (s, st) in enumerate(zip(a.shape, a.strides)):
        t.shape[i] = s
        t.strides[i] = st // a.itemsize
    for key, value in override.items():
        setattr(t, key, value)
    return t


def _pointers(arrays: dict, views: dict) -> dict:
    """ctypes pointers, by argument name, to views of `arrays` (None: a null pointer), with
    `views` replacing some of them. Each pointer keeps its view alive; the arrays must
    outlive the call."""
    assert set(views) <= set(arrays), set(views) - set(arrays)
    v = {name: None if a is None else tv(a) for name, a in arrays.items()}
    v.update(views)
    return {name: None if t is None else ctypes.byref(t) for name, t in v.items()}


P = ctypes.POINTER
_SIGNATURES = {
    "llada_last_error": (ctypes.c_char_p, []),
    "llada_version": (ctypes.c_int, []),
    "llada_has_cuda": (ctypes.c_int, []),
    "llada_blas_info": (ctypes.c_char_p, []),
    "llada_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "llada_attention_fwd": (
        ctypes.c_int,
        [P(Tensor)] * 4 + [ctypes.c_float] + [P(Tensor)] * 2 + [ctypes.c_void_p],
    ),
    "llada_attention_bwd_workspace_size": (ctypes.c_int, [P(Tensor)] * 2 + [P(ctypes.c_size_t)]),
    "llada_attention_bwd": (
        ctypes.c_int,
        [P(Tensor)] * 7
        + [ctypes.c_float]
        + [P(Tensor)] * 3
        + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p],
    ),
    "llada_masked_ce_fwd": (ctypes.c_int, [P(Tensor)] * 5 + [ctypes.c_void_p]),
    "llada_masked_ce_bwd": (ctypes.c_int, [P(Tensor)] * 6 + [ctypes.c_void_p]),
    "llada_remask_workspace_size": (ctypes.c_int, [P(Tensor)] * 2 + [P(ctypes.c_size_t)]),
    "llada_remask": (
        ctypes.c_int,
        [P(Tensor)] * 4
        + [P(RemaskParams)]
        + [P(Tensor)] * 3
        + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p],
    ),
}


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@pytest.fixture(params=["installed", "in_place"], scope="module")
def capi(request):
    """The C library through ctypes: the installed CPU-only package, and the in-place
    build next to llada_ext/__init__.py (the one the Python module uses)."""
    if request.param == "installed":
        return _load(_installed_lib(request.getfixturevalue("installed_prefix")))
    path = Path(lx.__file__).parent / "libllada_kernels.so"
    if not path.exists():
        pytest.skip("no in-place libllada_kernels.so")
    return _load(path)


def _expect(lib, status: int, want: int | tuple[int, ...]) -> str:
    want = want if isinstance(want, tuple) else (want,)
    msg = lib.llada_last_error().decode()
    assert status in want, f"status {lib.llada_status_string(status).decode()}: {msg}"
    assert msg, "a failing call must leave a message"
    return msg


class CE:
    """Valid masked-CE arguments (N=5, V=11) whose fields tests break one at a time."""

    def __init__(self, rng):
        self.logits = rng.standard_normal((5, 11)).astype(np.float32)
        self.targets = rng.integers(0, 11, 5).astype(np.int64)
        self.weights = rng.random(5).astype(np.float32)
        self.loss = np.full(5, 7.0, np.float32)
        self.lse = np.full(5, 7.0, np.float32)
        self.grad_loss = np.ones(5, np.float32)
        self.grad = np.full((5, 11), 7.0, np.float32)

    def _call(self, fn, names: tuple, views: dict) -> int:
        # The fields named in the order of fn's tensor arguments, then the stream (none).
        p = _pointers({name: getattr(self, name) for name in names}, views)
        return fn(*p.values(), None)

    def fwd(self, lib, **views):
        names = ("logits", "targets", "weights", "loss", "lse")
        return self._call(lib.llada_masked_ce_fwd, names, views)

    def bwd(self, lib, **views):
        names = ("logits", "targets", "weights", "lse", "grad_loss", "grad")
        return self._call(lib.llada_masked_ce_bwd, names, views)


def _cuda_view(a: np.ndarray, device_id: int = 0) -> Tensor:
    # A view that claims to live on a GPU; validation must reject it before any kernel runs.
    return tv(a, device_type=CUDA, device_id=device_id)


def test_version_and_info(capi):
    major, minor, patch = _header_version()
    assert capi.llada_version() == major * 10000 + minor * 100 + patch
    assert capi.llada_has_cuda() in (0, 1)
    blas = capi.llada_blas_info().decode()
    assert blas.startswith(("scipy-openblas32 (", "OpenBLAS (", "none: plain loops")), blas
    names = [capi.llada_status_string(s).decode() for s in range(8)]
    assert names == [
        "LLADA_OK",
        "LLADA_ERROR_INVALID_ARGUMENT",
        "LLADA_ERROR_UNSUPPORTED_DTYPE",
        "LLADA_ERROR_DEVICE_MISMATCH",
        "LLADA_ERROR_NOT_COMPILED",
        "LLADA_ERROR_CUDA",
        "LLADA_ERROR_INSUFFICIENT_WORKSPACE",
        "LLADA_ERROR_INTERNAL",
    ]
    assert capi.llada_status_string(99) == b"LLADA_ERROR_UNKNOWN"
    assert capi.llada_last_error() is not None


def test_masked_ce_bad_arguments(capi):
    ce = CE(np.random.default_rng(1))
    assert ce.fwd(capi) == OK and capi.llada_last_error() == b""
    good_loss = ce.loss.copy()
    ce.loss[:] = 7.0
    ce.lse[:] = 7.0
    i32 = ce.targets.astype(np.int32)
    f64 = ce.logits.astype(np.float64)
    cases = [
        (dict(logits=None), INVALID),
        (dict(targets=None), INVALID),
        (dict(weights=None), INVALID),
        (dict(loss=None), INVALID),
        (dict(logits=tv(ce.logits, data=None)), INVALID),
        (dict(logits=tv(ce.logits, dtype=I64)), DTYPE),
        (dict(logits=tv(f64)), DTYPE),
        (dict(logits=tv(ce.logits, dtype=-1)), DTYPE),
        (dict(logits=tv(ce.logits, dtype=1234)), DTYPE),
        (dict(targets=tv(i32)), DTYPE),
        (dict(weights=tv(ce.logits[:, 0].copy().astype(np.float64))), DTYPE),
        (dict(loss=tv(ce.targets)), DTYPE),
        (dict(logits=tv(ce.logits, ndim=3)), INVALID),
        (dict(logits=tv(ce.logits, ndim=-1)), INVALID),
        (dict(logits=tv(ce.logits, ndim=99)), INVALID),
        (dict(targets=tv(ce.targets[:4])), INVALID),
        (dict(loss=tv(ce.loss[:4])), INVALID),
        (dict(lse=tv(ce.lse[:3])), INVALID),
        (dict(logits=tv(np.asfortranarray(ce.logits))), INVALID),  # last dim strided
        (dict(logits=tv(np.zeros((5, 0), np.float32))), INVALID),  # empty vocabulary
        (dict(logits=tv(ce.logits, device_type=7)), INVALID),
        (dict(targets=_cuda_view(ce.targets)), MISMATCH),
        (dict(loss=_cuda_view(ce.loss)), MISMATCH),
    ]
    neg = tv(ce.logits)
    neg.shape[0] = -5
    cases.append((dict(logits=neg), INVALID))
    for views, want in cases:
        msg = _expect(capi, ce.fwd(capi, **views), want)
        assert len(msg) < 1024
        assert (ce.loss == 7.0).all() and (ce.lse == 7.0).all(), f"outputs written on {msg}"
    # A good call after all that gives the same answer as before and clears the message.
    assert ce.fwd(capi) == OK and capi.llada_last_error() == b""
    np.testing.assert_array_equal(ce.loss, good_loss)


def test_masked_ce_bwd_bad_arguments(capi):
    ce = CE(np.random.default_rng(2))
    assert ce.fwd(capi) == OK
    assert ce.bwd(capi) == OK
    ce.grad[:] = 7.0
    shifted = np.zeros((5, 12), np.float32)
    cases = [
        (dict(lse=None), INVALID),
        (dict(grad_loss=None), INVALID),
        (dict(grad=None), INVALID),
        (dict(grad=tv(ce.grad.astype(np.float64))), DTYPE),
        (dict(grad=tv(ce.grad[:, :10])), INVALID),
        (dict(grad_loss=tv(ce.grad_loss[:2])), INVALID),
        (dict(lse=tv(ce.lse.astype(np.float64))), DTYPE),
        (dict(grad=_cuda_view(ce.grad)), MISMATCH),
        # In place must mean the very same layout.
        (dict(grad=tv(ce.logits, strides=(ctypes.c_int64 * 8)(12, 1))), INVALID),
        (dict(grad=tv(shifted[:, :11], data=ce.logits.ctypes.data)), INVALID),
    ]
    for views, want in cases:
        _expect(capi, ce.bwd(capi, **views), want)
        assert (ce.grad == 7.0).all()


def _attn_arrays(rng):
    q = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    mask = rng.random((2, 5)) > 0.3
    out = np.full((2, 3, 4, 8), 7.0, np.float32)
    lse = np.full((2, 4, 3), 7.0, np.float32)
    return dict(q=q, k=k, v=v, mask=mask, out=out, lse=lse)


def _attn_fwd(lib, a, scale=0.35, **views):
    p = _pointers(a, views)
    return lib.llada_attention_fwd(
        p["q"], p["k"], p["v"], p["mask"], scale, p["out"], p["lse"], None
    )


def test_attention_fwd_bad_arguments(capi):
    a = _attn_arrays(np.random.default_rng(3))
    assert _attn_fwd(capi, a) == OK
    assert _attn_fwd(capi, a, mask=None) == OK
    a["out"][:] = 7.0
    a["lse"][:] = 7.0
    q, k = a["q"], a["k"]
    cases = [
        (dict(q=None), INVALID),
        (dict(k=None), INVALID),
        (dict(v=None), INVALID),
        (dict(out=None), INVALID),
        (dict(lse=None), INVALID),
        (dict(q=tv(q, data=None)), INVALID),
        (dict(q=tv(q, ndim=3)), INVALID),
        (
            dict(
                q=tv(q.astype(np.float64)),
                k=tv(k.astype(np.float64)),
                v=tv(a["v"].astype(np.float64)),
            ),
            DTYPE,
        ),
        (
            dict(
                q=tv(q.astype(np.float16)),
                k=tv(k.astype(np.float16)),
                v=tv(a["v"].astype(np.float16)),
            ),
            DTYPE,
        ),  # float16 attention is CUDA-only
        (dict(k=tv(k.astype(np.float64))), DTYPE),
        (dict(mask=tv(a["mask"].astype(np.int32))), DTYPE),
        (dict(lse=tv(a["lse"].astype(np.float64))), DTYPE),
        (dict(out=tv(a["out"].astype(np.float64))), DTYPE),
        (dict(k=tv(k[:, :, :, :4].copy()), v=tv(a["v"][:, :, :, :4].copy())), INVALID),
        (dict(k=tv(k[:1].copy()), v=tv(a["v"][:1].copy())), INVALID),
        (dict(v=tv(a["v"][:, :4].copy())), INVALID),
        (
            dict(
                k=tv(np.zeros((2, 5, 3, 8), np.float32)), v=tv(np.zeros((2, 5, 3, 8), np.float32))
            ),
            INVALID,
        ),  # 4 % 3 heads
        (dict(mask=tv(a["mask"][:, :4].copy())), INVALID),
        (dict(lse=tv(np.zeros((2, 3, 4), np.float32))), INVALID),  # [B, Sq, H] not [B, H, Sq]
        (dict(out=tv(np.zeros((2, 3, 4, 7), np.float32))), INVALID),
        (dict(q=tv(np.asfortranarray(q))), INVALID),
        (dict(k=_cuda_view(k)), MISMATCH),
        (dict(mask=_cuda_view(a["mask"])), MISMATCH),
        (dict(lse=_cuda_view(a["lse"])), MISMATCH),
    ]
    for views, want in cases:
        _expect(capi, _attn_fwd(capi, a, **views), want)
        assert (a["out"] == 7.0).all() and (a["lse"] == 7.0).all()
    for bad_scale in (float("nan"), float("inf")):
        _expect(capi, _attn_fwd(capi, a, scale=bad_scale), INVALID)


def test_attention_bwd_bad_arguments(capi):
    a = _attn_arrays(np.random.default_rng(4))
    assert _attn_fwd(capi, a) == OK
    dout = np.random.default_rng(5).standard_normal(a["q"].shape).astype(np.float32)
    grads = {n: np.full(a[n].shape, 7.0, np.float32) for n in ("q", "k", "v")}

    def bwd(workspace=None, nbytes=0, **views):
        arrays = {n: a[n] for n in ("q", "k", "v", "mask", "out")}
        arrays.update(dout=dout, lse=a["lse"], dq=grads["q"], dk=grads["k"], dv=grads["v"])
        p = list(_pointers(arrays, views).values())  # q, k, v, mask, out, dout, lse, dq, dk, dv
        return capi.llada_attention_bwd(*p[:7], 0.35, *p[7:], workspace, nbytes, None)

    nbytes = ctypes.c_size_t(123)
    assert (
        capi.llada_attention_bwd_workspace_size(
            ctypes.byref(tv(a["q"])), ctypes.byref(tv(a["k"])), ctypes.byref(nbytes)
        )
        == OK
    )
    assert nbytes.value == 0  # the CPU kernels need no workspace
    _expect(
        capi,
        capi.llada_attention_bwd_workspace_size(
            ctypes.byref(tv(a["q"])), ctypes.byref(tv(a["k"])), None
        ),
        INVALID,
    )
    _expect(
        capi,
        capi.llada_attention_bwd_workspace_size(
            None, ctypes.byref(tv(a["k"])), ctypes.byref(nbytes)
        ),
        INVALID,
    )
    _expect(
        capi,
        capi.llada_attention_bwd_workspace_size(
            ctypes.byref(tv(a["q"])), ctypes.byref(_cuda_view(a["k"])), ctypes.byref(nbytes)
        ),
        MISMATCH,
    )

    assert bwd() == OK
    for g in grads.values():
        g[:] = 7.0
    cases = [
        (dict(dout=None), INVALID),
        (dict(dq=None), INVALID),
        (dict(dk=None), INVALID),
        (dict(dv=None), INVALID),
        (dict(out=None), INVALID),
        (dict(dout=tv(dout.astype(np.float64))), DTYPE),
        (dict(dk=tv(grads["k"][:, :3].copy())), INVALID),
        (dict(dq=tv(np.asfortranarray(grads["q"]))), INVALID),
        (dict(dv=_cuda_view(grads["v"])), MISMATCH),
    ]
    for views, want in cases:
        _expect(capi, bwd(**views), want)
        assert all((g == 7.0).all() for g in grads.values())


class RM:
    """Valid remask arguments (B=2, W=5, V=9, L=8) whose fields tests break one at a time."""

    def __init__(self, rng):
        self.logits = rng.standard_normal((2, 5, 9)).astype(np.float32)
        self.uncond = None  # no unconditional logits unless a test passes a view
        self.x = np.where(rng.random((2, 8)) < 0.6, 8, rng.integers(0, 8, (2, 8))).astype(np.int64)
        self.nt = np.array([2, 1], np.int64)
        self.x_out = np.full((2, 8), 77, np.int64)
        self.x0 = np.full((2, 5), 77, np.int64)
        self.conf = np.full((2, 5), 7.0, np.float32)
        self.params = RemaskParams(
            mask_id=8,
            offset=2,
            strategy=0,
            has_threshold=0,
            threshold=0.0,
            temperature=0.0,
            cfg_scale=0.0,
            seed=5,
        )

    def untouched(self) -> bool:
        return (self.x_out == 77).all() and (self.x0 == 77).all() and (self.conf == 7.0).all()

    def run(self, lib, params=True, workspace=None, nbytes=0, **views):
        names = ("logits", "uncond", "x", "nt", "x_out", "x0", "conf")
        arrays = {name: getattr(self, name) for name in names}
        p = list(_pointers(arrays, views).values())
        prm = ctypes.byref(self.params) if params else None
        return lib.llada_remask(*p[:4], prm, *p[4:], workspace, nbytes, None)


def test_remask_workspace_size_bad_arguments(capi):
    rm = RM(np.random.default_rng(6))
    nbytes = ctypes.c_size_t(99)
    assert (
        capi.llada_remask_workspace_size(
            ctypes.byref(tv(rm.logits)), ctypes.byref(tv(rm.x)), ctypes.byref(nbytes)
        )
        == OK
    )
    assert nbytes.value == 0
    _expect(
        capi,
        capi.llada_remask_workspace_size(ctypes.byref(tv(rm.logits)), ctypes.byref(tv(rm.x)), None),
        INVALID,
    )
    _expect(
        capi,
        capi.llada_remask_workspace_size(None, ctypes.byref(tv(rm.x)), ctypes.byref(nbytes)),
        INVALID,
    )


def test_remask_bad_arguments(capi):
    rm = RM(np.random.default_rng(6))
    assert rm.run(capi) == OK
    rm.x_out[:], rm.x0[:], rm.conf[:] = 77, 77, 7.0
    cases = [
        (dict(logits=None), INVALID),
        (dict(x=None), INVALID),
        (dict(nt=None), INVALID),
        (dict(x_out=None), INVALID),
        (dict(x0=None), INVALID),
        (dict(conf=None), INVALID),
        (dict(logits=tv(rm.logits.astype(np.float64))), DTYPE),
        (dict(logits=tv(rm.logits, dtype=BOOL)), DTYPE),
        (dict(x=tv(rm.x.astype(np.int32))), DTYPE),
        (dict(nt=tv(rm.nt.astype(np.int32))), DTYPE),
        (dict(conf=tv(rm.conf.astype(np.float64))), DTYPE),
        (dict(x0=tv(rm.x0.astype(np.int32))), DTYPE),
        (dict(uncond=tv(rm.logits.astype(np.float64))), (DTYPE, INVALID)),
        (dict(uncond=tv(rm.logits[:, :4].copy())), INVALID),
        (dict(x=tv(rm.x[:1].copy())), INVALID),
        (dict(nt=tv(rm.nt[:1].copy())), INVALID),
        (dict(x0=tv(rm.x0[:, :4].copy())), INVALID),
        (dict(x_out=tv(rm.x_out[:, :7].copy())), INVALID),
        (dict(logits=tv(np.zeros((2, 5, 0), np.float32))), INVALID),
        (dict(logits=tv(np.asfortranarray(rm.logits))), INVALID),
        (dict(x=_cuda_view(rm.x)), MISMATCH),
        (dict(conf=_cuda_view(rm.conf)), MISMATCH),
        # in place with a different layout
        (dict(x_out=tv(rm.x, strides=(ctypes.c_int64 * 8)(1, 2))), INVALID),
    ]
    for views, want in cases:
        _expect(capi, rm.run(capi, **views), want)
        assert rm.untouched()
    _expect(capi, rm.run(capi, params=False), INVALID)
    for field, value in [
        ("offset", 4),
        ("offset", -1),
        ("strategy", 4),
        ("strategy", -1),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("cfg_scale", math.nan),
    ]:
        old = getattr(rm.params, field)
        setattr(rm.params, field, value)
        _expect(capi, rm.run(capi), INVALID)
        setattr(rm.params, field, old)
        assert rm.untouched()
    # mask_id is any token id of x (a negative one just matches no candidate here)
    rm.params.mask_id = -3
    assert rm.run(capi) == OK
    rm.params.has_threshold, rm.params.threshold = 1, math.nan
    _expect(capi, rm.run(capi), INVALID)
    rm.params.has_threshold = 0
    assert rm.run(capi) == OK


def test_cuda_tensors_without_cuda(capi):
    """All-CUDA arguments: NOT_COMPILED without CUDA kernels; with them but no GPU, a CUDA error.
    Either way no kernel touches the (host) pointers."""
    ce = CE(np.random.default_rng(7))
    a = _attn_arrays(np.random.default_rng(8))
    device_id = 0
    if not capi.llada_has_cuda():
        want = NOT_COMPILED
    elif not torch.cuda.is_available():
        want = CUDA_ERR
    else:
        pytest.skip("a GPU is present: CUDA views of host memory would reach a kernel")
    cu = {n: _cuda_view(arr, device_id) for n, arr in a.items()}
    q16 = {n: _cuda_view(a[n].astype(np.float16), device_id) for n in ("q", "k", "v", "out")}
    cu.update(q16)
    _expect(capi, _attn_fwd(capi, a, **cu), want)
    views = {
        n: _cuda_view(getattr(ce, n), device_id)
        for n in ("logits", "targets", "weights", "loss", "lse")
    }
    _expect(capi, ce.fwd(capi, **views), want)
    rm = RM(np.random.default_rng(9))
    views = dict(
        logits=_cuda_view(rm.logits, device_id),
        x=_cuda_view(rm.x, device_id),
        nt=_cuda_view(rm.nt, device_id),
        x_out=_cuda_view(rm.x_out, device_id),
        x0=_cuda_view(rm.x0, device_id),
        conf=_cuda_view(rm.conf, device_id),
    )
    _expect(capi, rm.run(capi, **views), want)
    assert rm.untouched()


def test_insufficient_workspace_cuda(capi):
    """On CUDA, remask and the attention backward ask for a workspace; less is refused."""
    if not (capi.llada_has_cuda() and torch.cuda.is_available()):
        pytest.skip("needs a GPU and a CUDA build of the library")

    def cv(t: torch.Tensor) -> Tensor:
        codes = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.int64: I64}
        v = Tensor(
            data=t.data_ptr(),
            dtype=codes[t.dtype],
            device_type=CUDA,
            device_id=t.device.index or 0,
            ndim=t.dim(),
        )
        for i in range(t.dim()):
            v.shape[i], v.strides[i] = t.shape[i], t.stride(i)
        return v

    dev = torch.device("cuda")
    logits = torch.randn(3, 16, 50, device=dev)
    logits[..., 49] = -1e4  # never predict the mask token itself
    x = torch.full((3, 20), 49, dtype=torch.int64, device=dev)
    nt = torch.full((3,), 2, dtype=torch.int64, device=dev)
    x_out, x0 = torch.empty_like(x), torch.empty(3, 16, dtype=torch.int64, device=dev)
    conf = torch.empty(3, 16, device=dev)
    views = [cv(t) for t in (logits, x, nt, x_out, x0, conf)]
    nbytes = ctypes.c_size_t(0)
    assert (
        capi.llada_remask_workspace_size(
            ctypes.byref(views[0]), ctypes.byref(views[1]), ctypes.byref(nbytes)
        )
        == OK
    )
    params = RemaskParams(mask_id=49, offset=0, strategy=0)
    ws = torch.empty(max(nbytes.value, 1), dtype=torch.uint8, device=dev)
    r = [ctypes.byref(v) for v in views]

    def run(workspace, size):
        # logits, no uncond, x, nt, params, x_out, x0, conf, then the workspace, no stream
        return capi.llada_remask(
            r[0], None, r[1], r[2], ctypes.byref(params), *r[3:], workspace, size, None
        )

    if nbytes.value > 0:
        _expect(capi, run(ws.data_ptr(), nbytes.value - 1), WORKSPACE)
        _expect(capi, run(None, nbytes.value), WORKSPACE)
    assert run(ws.data_ptr(), nbytes.value) == OK
    torch.cuda.synchronize()
    assert int((x_out != 49).sum()) == 6


def test_last_error_is_thread_local(capi):
    ce = CE(np.random.default_rng(10))
    msg_main = _expect(capi, ce.fwd(capi, logits=None), INVALID)
    seen = {}

    def worker():
        seen["fresh"] = capi.llada_last_error()
        seen["status"] = ce.fwd(capi, targets=tv(ce.targets.astype(np.int32)))
        seen["own"] = capi.llada_last_error()

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert seen["fresh"] == b""
    assert seen["status"] == DTYPE and b"targets" in seen["own"]
    assert capi.llada_last_error().decode() == msg_main  # untouched by the other thread
    assert "logits" in msg_main


def test_concurrent_calls_are_independent(capi):
    """The library keeps no shared mutable state: threads calling at once get the answers they
    would get alone."""
    rng = np.random.default_rng(11)
    items = [CE(rng) for _ in range(4)]
    for ce in items:
        assert ce.fwd(capi) == OK
    expected = [ce.loss.copy() for ce in items]
    errors = []

    def worker(i):
        ce = items[i]
        for _ in range(50):
            ce.loss[:] = 0
            if ce.fwd(capi) != OK or not np.array_equal(ce.loss, expected[i]):
                errors.append(i)
            if ce.fwd(capi, logits=None) != INVALID or not capi.llada_last_error():
                errors.append(-i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


_LAYOUT_PROBE = r"""
#include <stddef.h>
#include <stdio.h>
#include <llada/llada.h>
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(llada_tensor), offsetof(llada_tensor, dtype),
         offsetof(llada_tensor, device_type), offsetof(llada_tensor, device_id),
         offsetof(llada_tensor, ndim), offsetof(llada_tensor, shape),
         offsetof(llada_tensor, strides));
  printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(llada_remask_params),
         offsetof(llada_remask_params, mask_id), offsetof(llada_remask_params, offset),
         offsetof(llada_remask_params, strategy), offsetof(llada_remask_params, has_threshold),
         offsetof(llada_remask_params, threshold), offsetof(llada_remask_params, temperature),
         offsetof(llada_remask_params, cfg_scale), offsetof(llada_remask_params, seed));
  printf("%d %d %d %d %d %d %d %d | %d %d %d %d %d %d %d | %d %d | %d %d %d %d | %d\n", LLADA_OK,
         LLADA_ERROR_INVALID_ARGUMENT, LLADA_ERROR_UNSUPPORTED_DTYPE, LLADA_ERROR_DEVICE_MISMATCH,
         LLADA_ERROR_NOT_COMPILED, LLADA_ERROR_CUDA, LLADA_ERROR_INSUFFICIENT_WORKSPACE,
         LLADA_ERROR_INTERNAL, LLADA_FLOAT32, LLADA_FLOAT16, LLADA_BFLOAT16, LLADA_FLOAT64,
         LLADA_INT64, LLADA_INT32, LLADA_BOOL, LLADA_CPU, LLADA_CUDA,
         LLADA_REMASK_LOW_CONFIDENCE, LLADA_REMASK_RANDOM, LLADA_REMASK_MARGIN,
         LLADA_REMASK_ENTROPY, LLADA_MAX_DIMS);
  return 0;
}
"""


def test_abi_layout_is_frozen(tmp_path):
    """The struct layouts and enum values of llada.h, as a C compiler sees them, equal the
    ctypes mirror above and the values the ABI promises for the whole major version."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    src = tmp_path / "probe.c"
    src.write_text(_LAYOUT_PROBE)
    exe = tmp_path / "probe"
    _run(["cc", "-std=c99", "-I", str(HEADER.parents[1]), str(src), "-o", str(exe)])
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split(
        "\n"
    )
    tensor = [int(x) for x in lines[0].split()]
    assert tensor == [152, 8, 12, 16, 20, 24, 88]
    assert tensor[0] == ctypes.sizeof(Tensor) and tensor[5] == Tensor.shape.offset
    params = [int(x) for x in lines[1].split()]
    assert params == [48, 0, 8, 16, 20, 24, 28, 32, 40]
    assert params[0] == ctypes.sizeof(RemaskParams) and params[8] == RemaskParams.seed.offset
    assert lines[2].split() == ("0 1 2 3 4 5 6 7 | 0 1 2 3 4 5 6 | 0 1 | 0 1 2 3 | 8").split()


# ------------------------------------------------------------------------------------------
# llada_ext.dlpack on NumPy (and other CPU DLPack producers)
# ------------------------------------------------------------------------------------------


def ref_attention(q, k, v, mask, scale):
    """float64 reference: out [B, Sq, Hq, D], lse [B, Hq, Sq]; all-masked rows -> 0, -inf."""
    q, k, v = (torch.as_tensor(np.asarray(t)).double() for t in (q, k, v))
    B, Sq, Hq, D = q.shape
    g = Hq // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~torch.as_tensor(np.asarray(mask))[:, None, None, :], -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).numpy(), lse.numpy()


def ref_masked_ce(logits, targets, weights):
    lg = torch.as_tensor(np.asarray(logits)).double()
    t = torch.as_tensor(np.asarray(targets))
    w = torch.as_tensor(np.asarray(weights)).double()
    nll = torch.logsumexp(lg, -1) - lg.gather(-1, t.clamp(0, lg.shape[-1] - 1)[..., None])[..., 0]
    return torch.where(w != 0, w * nll, torch.zeros_like(nll)).numpy()


def ref_remask_greedy(logits, x, k, mask_id, offset):
    """float64 reference of low-confidence remasking at temperature 0, top-k selection."""
    lg = torch.as_tensor(np.asarray(logits)).double()
    x = torch.as_tensor(np.asarray(x)).clone()
    B, W, _ = lg.shape
    p = torch.softmax(lg, -1)
    x0 = lg.argmax(-1)
    cand = x[:, offset : offset + W] == mask_id
    conf = torch.where(cand, p.gather(-1, x0[..., None])[..., 0], -math.inf)
    x0 = torch.where(cand, x0, x[:, offset : offset + W])
    for b in range(B):
        n = min(int(k[b]), int(cand[b].sum()))
        # stable sort: ties -> lower position first
        order = sorted(range(W), key=lambda j: (-conf[b, j].item(), j))[:n]
        for j in order:
            x[b, offset + j] = x0[b, j]
    return x.numpy(), x0.numpy(), conf.float().numpy()


def _strided(a: np.ndarray, rng, axis: int = 0) -> np.ndarray:
    """The same values as `a` in a non-contiguous array (every other slot along `axis`)."""
    shape = list(a.shape)
    shape[axis] *= 2
    big = rng.standard_normal(shape).astype(a.dtype)
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(None, None, 2)
    big[tuple(idx)] = a
    out = big[tuple(idx)]
    assert not out.flags.c_contiguous
    return out


@pytest.mark.parametrize("last_dim_strided", [False, True])
def test_dlpack_numpy_attention(last_dim_strided):
    rng = np.random.default_rng(12)
    B, Sq, Sk, Hq, Hkv, D = 3, 7, 11, 6, 2, 24
    q = rng.standard_normal((B, Sq, Hq, D)).astype(np.float32)
    k = rng.standard_normal((B, Sk, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, Sk, Hkv, D)).astype(np.float32)
    mask = rng.random((B, Sk)) > 0.3
    mask[2] = False  # a row with no key at all
    qn = _strided(q, rng, axis=3 if last_dim_strided else 1)
    kn, vn, mn = _strided(k, rng, 0), _strided(v, rng, 2), mask.T.copy().T  # F-ordered mask
    out, lse = dl.attention(qn, kn, vn, mn, scale=0.3, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == q.shape
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == (B, Hq, Sq)
    t_out, t_lse = lx.attention(
        *(torch.from_numpy(a) for a in (q, k, v, mask)), scale=0.3, return_lse=True
    )
    np.testing.assert_array_equal(out, t_out.numpy())
    np.testing.assert_array_equal(lse, t_lse.numpy())
    r_out, r_lse = ref_attention(q, k, v, mask, 0.3)
    np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, r_lse, atol=2e-5, rtol=1e-5)
    assert (out[2] == 0).all() and np.isneginf(lse[2]).all()
    # default scale and no mask
    out2 = dl.attention(q, k, v)
    np.testing.assert_allclose(out2, ref_attention(q, k, v, None, D**-0.5)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_dlpack_numpy_masked_ce(reduction):
    rng = np.random.default_rng(13)
    lead, V = (3, 5), 37
    logits = rng.standard_normal((*lead, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, lead).astype(np.int64)
    weights = (rng.random(lead) * (rng.random(lead) > 0.4)).astype(np.float32)
    targets[weights == 0] = -100  # ignored rows may hold anything
    ln = _strided(logits, rng, axis=1)
    tn = _strided(targets, rng, axis=0)
    got = dl.masked_cross_entropy(ln, tn, weights, reduction=reduction)
    want_t = lx.masked_cross_entropy(
        torch.from_numpy(logits),
        torch.from_numpy(targets),
        torch.from_numpy(weights),
        reduction=reduction,
    )
    ref = ref_masked_ce(logits, targets, weights)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    if reduction == "none":
        assert got.shape == lead
        np.testing.assert_array_equal(got, want_t.numpy())
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
        assert (got[weights == 0] == 0).all()
    else:
        assert got.shape == ()
        np.testing.assert_allclose(got, want_t.numpy(), rtol=1e-6)
        np.testing.assert_allclose(got, ref.sum(), rtol=1e-5)
    # float16 logits and a strided last dimension (copied once, same numbers)
    half = logits.astype(np.float16)
    got16 = dl.masked_cross_entropy(np.asfortranarray(half), targets, weights, reduction="none")
    np.testing.assert_allclose(got16, ref_masked_ce(half, targets, weights), atol=1e-4, rtol=1e-4)


def test_dlpack_numpy_remask_greedy():
    rng = np.random.default_rng(14)
    B, W, V, L, offset, mask_id = 3, 9, 23, 15, 4, 22
    logits = rng.standard_normal((B, W, V)).astype(np.float32) * 2
    x = rng.integers(0, mask_id, (B, L)).astype(np.int64)
    x[:, offset : offset + W][rng.random((B, W)) < 0.7] = mask_id
    x_before = x.copy()
    k = np.array([3, 0, 20], np.int64)
    x_new, x0, conf = dl.remask(
        _strided(logits, rng, 0), x, k, mask_id=mask_id, offset=offset, return_details=True
    )
    np.testing.assert_array_equal(x, x_before)
    rx, rx0, rconf = ref_remask_greedy(logits, x, k, mask_id, offset)
    np.testing.assert_array_equal(x_new, rx)
    np.testing.assert_array_equal(x0, rx0)
    np.testing.assert_allclose(conf, rconf, atol=1e-6, rtol=1e-5)
    # num_transfer as a Python int, a 0-d array and an int32 array all mean the same
    for nt in (2, np.array(2), np.full(B, 2, np.int32)):
        np.testing.assert_array_equal(
            dl.remask(logits, x, nt, mask_id=mask_id, offset=offset),
            ref_remask_greedy(logits, x, [2] * B, mask_id, offset)[0],
        )


@pytest.mark.parametrize(
    "strategy,temperature,threshold,cfg",
    [
        ("low_confidence", 0.7, None, 0.0),
        ("random", 0.0, None, 0.0),
        ("margin", 1.3, 0.2, 0.0),
        ("entropy", 0.0, -1.5, 1.5),
        ("low_confidence", 0.5, None, 0.8),
    ],
)
def test_dlpack_numpy_remask_matches_torch_op(strategy, temperature, threshold, cfg):
    rng = np.random.default_rng(15)
    B, W, V, L, offset, mask_id = 4, 8, 31, 13, 3, 30
    logits = rng.standard_normal((B, W, V)).astype(np.float32)
    uncond = rng.standard_normal((B, W, V)).astype(np.float32) if cfg else None
    x = rng.integers(0, mask_id, (B, L)).astype(np.int64)
    x[:, offset : offset + W][rng.random((B, W)) < 0.6] = mask_id
    k = rng.integers(0, 4, B).astype(np.int64)
    seed = int(rng.integers(0, 2**62))
    step = dict(
        mask_id=mask_id,
        offset=offset,
        strategy=strategy,
        temperature=temperature,
        threshold=threshold,
        uncond_logits=uncond,
        cfg_scale=cfg,
        return_details=True,
    )
    got = dl.remask(logits, x, k, seed=seed, **step)
    T = torch.from_numpy
    want = ops._remask._remask(
        T(logits),
        T(x),
        T(k),
        None if uncond is None else T(uncond),
        mask_id,
        offset,
        ops.REMASK_STRATEGIES[strategy],
        temperature,
        threshold is not None,
        0.0 if threshold is None else threshold,
        cfg,
        seed,
    )
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.numpy())
    # The seed matters when the step is random.
    if temperature > 0 or strategy == "random":
        other = dl.remask(logits, x, k, seed=seed + 1, **step)
        assert not (np.array_equal(other[1], got[1]) and np.array_equal(other[2], got[2]))


def test_dlpack_numpy_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(16)
    q = rng.standard_normal((2, 5, 2, 16)).astype(ml_dtypes.bfloat16)
    k = rng.standard_normal((2, 6, 1, 16)).astype(ml_dtypes.bfloat16)
    v = rng.standard_normal((2, 6, 1, 16)).astype(ml_dtypes.bfloat16)
    out = dl.attention(q, k, v)
    assert out.dtype == q.dtype
    tq, tk, tv_ = (torch.from_numpy(a.astype(np.float32)).bfloat16() for a in (q, k, v))
    np.testing.assert_array_equal(out.astype(np.float32), lx.attention(tq, tk, tv_).float().numpy())


class _Producer:
    """A minimal third-party CPU array: nothing but the DLPack protocol."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_other_producers():
    rng = np.random.default_rng(17)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    targets = rng.integers(0, 10, 6).astype(np.int64)
    weights = rng.random(6).astype(np.float32)
    ref = ref_masked_ce(logits, targets, weights)
    # plain DLPack objects: NumPy arrays come back
    got = dl.masked_cross_entropy(
        _Producer(logits), _Producer(targets), _Producer(weights), reduction="none"
    )
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # torch tensors: torch comes back; mixing producers on one device is fine
    got_t = dl.masked_cross_entropy(
        torch.from_numpy(logits), targets, _Producer(weights), reduction="none"
    )
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_allclose(got_t.numpy(), ref, atol=1e-5, rtol=1e-5)


def test_dlpack_bad_input():
    rng = np.random.default_rng(18)
    logits = rng.standard_normal((2, 4, 7)).astype(np.float32)
    x = np.full((2, 6), 6, np.int64)
    with pytest.raises(TypeError, match="logits"):
        dl.remask(logits.tolist(), x, 1, mask_id=6)
    with pytest.raises(TypeError, match="x: expected dtype int64"):
        dl.remask(logits, x.astype(np.int32), 1, mask_id=6)
    with pytest.raises(ValueError, match="offset"):
        dl.remask(logits, x, 1, mask_id=6, offset=3)
    with pytest.raises(ValueError, match="mask_id"):
        dl.remask(logits, x, 1, mask_id=2**63)
    with pytest.raises(ValueError, match="strategy"):
        dl.remask(logits, x, 1, mask_id=6, strategy="greedy")
    with pytest.raises(ValueError, match="num_transfer"):
        dl.remask(logits, x, np.array([1, -1]), mask_id=6)
    with pytest.raises(ValueError, match="num_transfer"):
        dl.remask(logits, x, np.array([1, 1, 1]), mask_id=6)
    with pytest.raises(TypeError, match="num_transfer"):
        dl.remask(logits, x, np.array([1.0, 1.0]), mask_id=6)
    with pytest.raises(ValueError, match="temperature"):
        dl.remask(logits, x, 1, mask_id=6, temperature=-1.0)
    with pytest.raises(TypeError, match="logits"):
        dl.masked_cross_entropy(
            logits.astype(np.float64), np.zeros((2, 4), np.int64), np.ones((2, 4), np.float32)
        )
    with pytest.raises(ValueError, match="targets"):
        dl.masked_cross_entropy(logits, np.full((2, 4), 7, np.int64), np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="weights"):
        dl.masked_cross_entropy(
            logits, np.zeros((2, 4), np.int64), np.full((2, 4), np.inf, np.float32)
        )
    with pytest.raises(ValueError, match="reduction"):
        dl.masked_cross_entropy(
            logits, np.zeros((2, 4), np.int64), np.ones((2, 4), np.float32), reduction="mean"
        )
    q = rng.standard_normal((1, 3, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 5, 3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="heads"):
        dl.attention(q, k, k)
    with pytest.raises(TypeError, match="q"):
        dl.attention(q.astype(np.float16), k.astype(np.float16), k.astype(np.float16))
    with pytest.raises(TypeError, match="key_mask"):
        dl.attention(q, q, q, np.ones((1, 3), np.int64))
    with pytest.raises(TypeError, match="renamed to key_mask.*opposite"):
        dl.attention(q, q, q, key_padding_mask=np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="scale"):
        dl.attention(q, q, q, scale=math.nan)


def _bad_calls() -> dict:
    """Calls with one bad argument each, on NumPy arrays: (op, args, kwargs) by case name, a
    name that starts with the argument the error must name."""
    rng = np.random.default_rng(21)
    lg = rng.standard_normal((2, 4, 7)).astype(np.float32)
    x = np.full((2, 6), 6, np.int64)
    q = rng.standard_normal((1, 3, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 5, 2, 8)).astype(np.float32)
    t, w = np.zeros((2, 4), np.int64), np.ones((2, 4), np.float32)
    rm = dict(mask_id=6)
    return {
        "remask logits 2-d": ("remask", (lg[0], x, 1), rm),
        "remask logits float64": ("remask", (lg.astype(np.float64), x, 1), rm),
        "remask x int32": ("remask", (lg, x.astype(np.int32), 1), rm),
        "remask x rows": ("remask", (lg, x[:1], 1), rm),
        "remask offset": ("remask", (lg, x, 1), dict(rm, offset=3)),
        "remask offset type": ("remask", (lg, x, 1), dict(rm, offset=1.0)),
        "remask mask_id range": ("remask", (lg, x, 1), dict(mask_id=2**63)),
        "remask mask_id type": ("remask", (lg, x, 1), dict(mask_id="6")),
        "remask strategy": ("remask", (lg, x, 1), dict(rm, strategy="greedy")),
        "remask temperature": ("remask", (lg, x, 1), dict(rm, temperature=-1.0)),
        "remask temperature nan": ("remask", (lg, x, 1), dict(rm, temperature=math.nan)),
        "remask threshold": ("remask", (lg, x, 1), dict(rm, threshold=math.inf)),
        "remask cfg_scale": ("remask", (lg, x, 1), dict(rm, cfg_scale="1")),
        "remask uncond_logits": ("remask", (lg, x, 1), dict(rm, uncond_logits=lg[:, :3])),
        "remask num_transfer negative": ("remask", (lg, x, -1), rm),
        "remask num_transfer float": ("remask", (lg, x, 1.5), rm),
        "remask num_transfer bool": ("remask", (lg, x, True), rm),
        "remask num_transfer dtype": ("remask", (lg, x, np.ones(2, np.float32)), rm),
        "remask num_transfer shape": ("remask", (lg, x, np.ones(3, np.int64)), rm),
        "remask num_transfer values": ("remask", (lg, x, np.array([1, -1])), rm),
        "attention q 3-d": ("attention", (q[0], k, k), {}),
        "attention q dtype": ("attention", (q.astype(np.float64), k, k), {}),
        "attention k dtype": ("attention", (q, k.astype(np.float16), k), {}),
        "attention k batch": ("attention", (q, np.concatenate([k, k]), k), {}),
        "attention v shape": ("attention", (q, k, k[:, :4]), {}),
        "attention k heads": (
            "attention",
            (q, k[:, :, :1].repeat(3, 2), k[:, :, :1].repeat(3, 2)),
            {},
        ),
        "attention key_mask dtype": ("attention", (q, k, k, np.ones((1, 5), np.int64)), {}),
        "attention key_mask shape": ("attention", (q, k, k, np.ones((1, 4), bool)), {}),
        "attention scale": ("attention", (q, k, k), dict(scale=math.nan)),
        "attention scale type": ("attention", (q, k, k), dict(scale="x")),
        "ce logits dtype": ("masked_cross_entropy", (lg.astype(np.float64), t, w), {}),
        "ce logits 0-d": ("masked_cross_entropy", (np.ones((), np.float32), t, w), {}),
        "ce targets dtype": ("masked_cross_entropy", (lg, t.astype(np.int32), w), {}),
        "ce weights dtype": ("masked_cross_entropy", (lg, t, w.astype(np.float64)), {}),
        "ce targets shape": ("masked_cross_entropy", (lg, t[:1], w), {}),
        "ce weights shape": ("masked_cross_entropy", (lg, t, w[:, :3]), {}),
        "ce weights values": ("masked_cross_entropy", (lg, t, w * np.inf), {}),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_dlpack_checks_match_the_torch_ops(case):
    """The DLPack functions and the torch ops check their arguments the same way: the same
    exception type and message for the same bad argument."""
    op, args, kwargs = _bad_calls()[case]

    def torch_arg(a):
        return torch.from_numpy(a) if isinstance(a, np.ndarray) else a

    errors = []
    for fn, convert in ((getattr(dl, op), lambda a: a), (getattr(lx, op), torch_arg)):
        with pytest.raises((TypeError, ValueError)) as info:
            fn(*map(convert, args), **{key: convert(a) for key, a in kwargs.items()})
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert re.match(rf"{case.split()[1]}[:,] ", errors[0][1]), errors  # names the argument


# ------------------------------------------------------------------------------------------
# CUDA producers: CuPy and JAX (skipped without them or without a GPU)
# ------------------------------------------------------------------------------------------


def _gpu_ready() -> bool:
    return torch.cuda.is_available() and lx.has_cuda_kernels()


def test_dlpack_cupy():
    cp = pytest.importorskip("cupy")
    if not _gpu_ready():
        pytest.skip("needs a GPU and the CUDA kernels")
    rng = np.random.default_rng(19)
    q = rng.standard_normal((2, 9, 4, 64)).astype(np.float16)
    k = rng.standard_normal((2, 13, 2, 64)).astype(np.float16)
    v = rng.standard_normal((2, 13, 2, 64)).astype(np.float16)
    mask = rng.random((2, 13)) > 0.2
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:  # the kernels must run on CuPy's current stream
        out = dl.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(mask))
        assert isinstance(out, cp.ndarray)
        host = cp.asnumpy(out, stream=stream)
        stream.synchronize()
    T = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    want = lx.attention(T(q), T(k), T(v), T(mask)).cpu().numpy()
    np.testing.assert_allclose(host.astype(np.float32), want.astype(np.float32), atol=2e-3)

    logits = rng.standard_normal((5, 7, 50)).astype(np.float32)
    targets = rng.integers(0, 50, (5, 7)).astype(np.int64)
    weights = rng.random((5, 7)).astype(np.float32)
    got = dl.masked_cross_entropy(
        cp.asarray(logits), cp.asarray(targets), cp.asarray(weights), reduction="none"
    )
    np.testing.assert_allclose(
        cp.asnumpy(got), ref_masked_ce(logits, targets, weights), atol=1e-4, rtol=1e-5
    )

    x = rng.integers(0, 49, (5, 11)).astype(np.int64)
    x[:, 2:9][rng.random((5, 7)) < 0.6] = 49
    got = dl.remask(
        cp.asarray(logits),
        cp.asarray(x),
        2,
        mask_id=49,
        offset=2,
        temperature=0.9,
        seed=1234,
        return_details=True,
    )
    want = dl.remask(
        logits, x, 2, mask_id=49, offset=2, temperature=0.9, seed=1234, return_details=True
    )  # the CPU twin: same seed, same result
    np.testing.assert_array_equal(cp.asnumpy(got[0]), want[0])
    np.testing.assert_array_equal(cp.asnumpy(got[1]), want[1])
    np.testing.assert_allclose(cp.asnumpy(got[2]), want[2], atol=1e-6, rtol=1e-5)


def test_dlpack_jax():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(20)
    logits = rng.standard_normal((4, 6, 21)).astype(np.float32)
    targets = rng.integers(0, 21, (4, 6)).astype(np.int64)
    weights = rng.random((4, 6)).astype(np.float32)
    x = rng.integers(0, 20, (4, 9)).astype(np.int64)
    x[:, 1:7][rng.random((4, 6)) < 0.6] = 20
    want_x = dl.remask(logits, x, 2, mask_id=20, offset=1, temperature=0.8, seed=99)
    gpu = [d for d in jax.devices() if d.platform == "gpu"]
    devices = [jax.devices("cpu")[0]] + (gpu[:1] if _gpu_ready() else [])
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)  # int64 targets and tokens need 64-bit mode
    try:
        for dev in devices:
            lj, tj, wj, xj = (jax.device_put(a, dev) for a in (logits, targets, weights, x))
            got = dl.masked_cross_entropy(lj, tj, wj, reduction="none")
            assert isinstance(got, jax.Array)
            np.testing.assert_allclose(
                np.asarray(got), ref_masked_ce(logits, targets, weights), atol=1e-4, rtol=1e-5
            )
            got_x = dl.remask(lj, xj, 2, mask_id=20, offset=1, temperature=0.8, seed=99)
            assert isinstance(got_x, jax.Array)
            np.testing.assert_array_equal(np.asarray(got_x), want_x)
            q = jax.device_put(jnp.asarray(rng.standard_normal((1, 5, 2, 32)), jnp.bfloat16), dev)
            out = dl.attention(q, q, q)
            assert isinstance(out, jax.Array) and out.dtype == jnp.bfloat16
            qf = np.asarray(q, dtype=np.float32)
            ref = ref_attention(qf, qf, qf, None, 32**-0.5)[0]
            np.testing.assert_allclose(np.asarray(out, dtype=np.float32), ref, atol=3e-2)
    finally:
        jax.config.update("jax_enable_x64", x64)
