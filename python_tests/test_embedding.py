"""Embedding the kernels in other programs: the C library as an installed CMake package, and
the ctypes mirror of its ABI. The package is configured, built and installed once a session
(CPU-only, no Python module, no OpenBLAS, so it is self-contained; the ``installed_prefix``
fixture in conftest.py), then the tests check its layout and exported symbols, build and run
the C and C++ examples against the installed prefix, and check the package's version rules and
pkg-config. The second half mirrors ``llada.h`` in ctypes (status and dtype codes, the
``llada_tensor`` and ``llada_remask_params`` structs, the entry points' signatures) with the
argument builders that test_embedding_capi.py and test_capi_fuzz.py call the library with.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CMAKE, ROOT, _generator, _run

HEADER = ROOT / "csrc" / "include" / "llada" / "llada.h"


# ------------------------------------------------------------------------------------------
# building the installed package (the installed_prefix fixture is in conftest.py)
# ------------------------------------------------------------------------------------------


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
# the C ABI through ctypes: the mirror of llada.h, and valid arguments to break
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
