"""The C ABI under abuse, through ctypes: every entry point with null pointers, bad dtypes, bad
shapes and strides, mismatched or unavailable devices returns the documented status and a
message, never crashes, and never writes its outputs; the thread-local error message; calls
from several threads at once; the struct layouts and enum values that the ABI promises never
change. Each test runs on the installed CPU-only package and on the in-place build that the
Python module uses; the ctypes mirror of ``llada.h`` is in test_embedding.py.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _run
from test_embedding import (
    BF16,
    BOOL,
    CE,
    CUDA,
    CUDA_ERR,
    DTYPE,
    F16,
    F32,
    HEADER,
    I64,
    INVALID,
    MISMATCH,
    NOT_COMPILED,
    OK,
    RM,
    WORKSPACE,
    RemaskParams,
    Tensor,
    _attn_arrays,
    _attn_fwd,
    _cuda_view,
    _expect,
    _header_version,
    _installed_lib,
    _load,
    _pointers,
    tv,
)

import llada_ext as lx


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
    ctypes mirror in test_embedding.py and the values the ABI promises for the whole major
    version."""
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
