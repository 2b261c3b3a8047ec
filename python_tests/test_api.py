"""The op layer as a whole: registration (opcheck), torch.compile, bad input, build facts."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import llada_ext as lx
from llada_ext import ops

# ---------------------------------------------------------------------------------------
# torch.library registration: schema, fake implementations, autograd wiring
# ---------------------------------------------------------------------------------------


def _attn_args(device, dtype=torch.float32):
    q = torch.randn(2, 7, 4, 16, device=device, dtype=dtype)
    k = torch.randn(2, 9, 2, 16, device=device, dtype=dtype)
    v = torch.randn(2, 9, 2, 16, device=device, dtype=dtype)
    mask = torch.rand(2, 9, device=device) > 0.3
    return q, k, v, mask


def test_opcheck_attention(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, mask = _attn_args(device, dtype)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.library.opcheck(ops._attention._attention_fwd, (q, k, v, mask, 0.25))
    torch.library.opcheck(ops._attention._attention_fwd, (q, k, v, None, 0.25))


def test_opcheck_masked_ce(device):
    logits = torch.randn(11, 37, device=device, requires_grad=True)
    targets = torch.randint(0, 37, (11,), device=device)
    weights = torch.rand(11, device=device) * (torch.rand(11, device=device) > 0.4)
    torch.library.opcheck(ops._cross_entropy._masked_ce_fwd, (logits, targets, weights))


def test_opcheck_linear_masked_ce(device):
    hidden = torch.randn(13, 8, device=device, requires_grad=True)
    weight = torch.randn(29, 8, device=device, requires_grad=True)
    targets = torch.randint(0, 29, (13,), device=device)
    weights = torch.rand(13, device=device) * (torch.rand(13, device=device) > 0.4)
    torch.library.opcheck(ops._cross_entropy._linear_ce_fwd, (hidden, weight, targets, weights, 4))


def test_opcheck_remask(device):
    logits = torch.randn(2, 6, 17, device=device)
    x = torch.randint(0, 16, (2, 10), device=device)
    x[:, 3:8] = 16
    nt = torch.tensor([2, 3], device=device)
    torch.library.opcheck(
        ops._remask._remask, (logits, x, nt, None, 16, 2, 0, 0.0, False, 0.0, 0.0, 0)
    )
    torch.library.opcheck(
        ops._remask._remask_inplace,
        (logits, x.clone(), nt, None, 16, 2, 0, 0.0, False, 0.0, 0.0, 0),
    )


# ---------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) traces through every op (fake impls, no graph break)
# ---------------------------------------------------------------------------------------


def test_compile_fullgraph_training_step(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, mask = _attn_args(device, dtype)
    w_head = torch.randn(31, 16, device=device, dtype=dtype)
    targets = torch.randint(0, 31, (2, 7), device=device)
    weights = (torch.rand(2, 7, device=device) > 0.5).float() * 2.0

    def step(q, k, v):
        h = lx.attention(q, k, v, mask)
        hidden = h.reshape(2, 7, 64)[..., :16]
        loss = lx.linear_masked_cross_entropy(hidden, w_head, targets, weights)
        loss2 = lx.masked_cross_entropy(hidden.float() @ w_head.float().t(), targets, weights)
        return loss + loss2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = compiled(*args)
    ref = step(*ref_args)
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    for a, b in zip(args, ref_args):
        torch.testing.assert_close(a.grad, b.grad)


def test_compile_fullgraph_remask(device):
    logits = torch.randn(2, 5, 23, device=device)
    x = torch.full((2, 9), 22, device=device)
    x[:, :4] = torch.randint(0, 22, (2, 4), device=device)

    def step(logits, x):
        return lx.remask(logits, x, 2, mask_id=22, offset=4)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, x), step(logits, x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# bad input: a clear exception naming the argument, and the process survives
# ---------------------------------------------------------------------------------------


def _bad_attention_calls():
    q, k, v, mask = _attn_args("cpu")
    return [
        (lambda: lx.attention("q", k, v), TypeError, "q"),
        (lambda: lx.attention(q[0], k, v), ValueError, "q"),
        (lambda: lx.attention(q.double(), k.double(), v.double()), TypeError, "q"),
        (lambda: lx.attention(q, k.bfloat16(), v), TypeError, "k"),
        (lambda: lx.attention(q, k[:1], v[:1]), ValueError, "k"),
        (lambda: lx.attention(q, k, v[:, :3]), ValueError, "v"),
        (
            lambda: lx.attention(
                q, k[:, :, :1].expand(2, 9, 3, 16), v[:, :, :1].expand(2, 9, 3, 16)
            ),
            ValueError,
            "k",
        ),
        (lambda: lx.attention(q, k, v, mask.float()), TypeError, "key_mask"),
        (lambda: lx.attention(q, k, v, mask[:, :4]), ValueError, "key_mask"),
        (lambda: lx.attention(q, k, v, scale=float("nan")), ValueError, "scale"),
        (lambda: lx.attention(q, k, v, scale="x"), TypeError, "scale"),
    ]


def _bad_ce_calls():
    logits = torch.randn(5, 11)
    t = torch.randint(0, 11, (5,))
    w = torch.ones(5)
    h = torch.randn(5, 4)
    W = torch.randn(11, 4)
    return [
        (lambda: lx.masked_cross_entropy(logits.double(), t, w), TypeError, "logits"),
        (lambda: lx.masked_cross_entropy(logits, t.int(), w), TypeError, "targets"),
        (lambda: lx.masked_cross_entropy(logits, t, w.double()), TypeError, "weights"),
        (lambda: lx.masked_cross_entropy(logits, t[:4], w), ValueError, "targets"),
        (lambda: lx.masked_cross_entropy(logits, t, w[:4]), ValueError, "weights"),
        (lambda: lx.masked_cross_entropy(logits, t + 11, w), ValueError, "targets"),
        (lambda: lx.masked_cross_entropy(logits, t - 20, w), ValueError, "targets"),
        (lambda: lx.masked_cross_entropy(logits, t, w * float("inf")), ValueError, "weights"),
        (lambda: lx.masked_cross_entropy(logits, t, w, reduction="avg"), ValueError, "reduction"),
        (
            lambda: lx.masked_cross_entropy(logits, t, w, ignore_index=None),
            TypeError,
            "ignore_index",
        ),
        (lambda: lx.linear_masked_cross_entropy(h, W[:, :3], t, w), ValueError, "weight"),
        (lambda: lx.linear_masked_cross_entropy(h, W[0], t, w), ValueError, "weight"),
        (lambda: lx.linear_masked_cross_entropy(h, W, t + 11, w), ValueError, "targets"),
        (
            lambda: lx.linear_masked_cross_entropy(h, W, t, w, chunk_rows=-1),
            ValueError,
            "chunk_rows",
        ),
    ]


def _bad_remask_calls():
    logits = torch.randn(2, 4, 13)
    x = torch.full((2, 6), 12)
    return [
        (lambda: lx.remask(logits, x.int(), 1, mask_id=12), TypeError, "x"),
        (lambda: lx.remask(logits[0], x, 1, mask_id=12), ValueError, "logits"),
        (lambda: lx.remask(logits.double(), x, 1, mask_id=12), TypeError, "logits"),
        (lambda: lx.remask(logits, x[:1], 1, mask_id=12), ValueError, "x"),
        (lambda: lx.remask(logits, x, 1, mask_id=2**63), ValueError, "mask_id"),
        (lambda: lx.remask(logits, x, 1, mask_id=1.0), TypeError, "mask_id"),
        (lambda: lx.remask(logits, x, 1, mask_id=12, offset=3), ValueError, "offset"),
        (lambda: lx.remask(logits, x, 1, mask_id=12, temperature=-1.0), ValueError, "temperature"),
        (lambda: lx.remask(logits, x, 1, mask_id=12, strategy="best"), ValueError, "strategy"),
        (lambda: lx.remask(logits, x, -1, mask_id=12), ValueError, "num_transfer"),
        (
            lambda: lx.remask(logits, x, torch.tensor([1, -2]), mask_id=12),
            ValueError,
            "num_transfer",
        ),
        (
            lambda: lx.remask(logits, x, torch.tensor([1, 2, 3]), mask_id=12),
            ValueError,
            "num_transfer",
        ),
        (lambda: lx.remask(logits, x, 1.5, mask_id=12), TypeError, "num_transfer"),
        (
            lambda: lx.remask(logits, x, 1, mask_id=12, threshold=float("nan")),
            ValueError,
            "threshold",
        ),
        (
            lambda: lx.remask(logits, x, 1, mask_id=12, uncond_logits=logits[:, :3]),
            ValueError,
            "uncond_logits",
        ),
        (
            lambda: lx.remask(logits, x, 1, mask_id=12, generator=3, temperature=1.0),
            TypeError,
            "generator",
        ),
    ]


@pytest.mark.parametrize(
    "call,exc,name",
    _bad_attention_calls() + _bad_ce_calls() + _bad_remask_calls(),
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc) as info:
        call()
    assert name in str(info.value)


def test_bad_input_fuzz_never_crashes():
    """Random shapes and dtypes through every op in a child process: only Python exceptions."""
    code = r"""
import random, torch, llada_ext as lx
random.seed(0)
dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]
def rnd_tensor():
    nd = random.randint(0, 4)
    shape = [random.randint(0, 5) for _ in range(nd)]
    dt = random.choice(dtypes)
    t = torch.randn(shape) if dt.is_floating_point else torch.randint(0, 3, shape)
    return t.to(dt)
ok = err = 0
for i in range(400):
    args = [rnd_tensor() for _ in range(3)]
    fn = random.choice([
        lambda: lx.attention(*args),
        lambda: lx.masked_cross_entropy(*args),
        lambda: lx.linear_masked_cross_entropy(args[0], args[1], args[2], rnd_tensor()),
        lambda: lx.remask(args[0], args[1], random.randint(-1, 3), mask_id=random.randint(-1, 4)),
    ])
    try:
        fn(); ok += 1
    except (ValueError, TypeError):
        err += 1
print("done", ok, err)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "done" in res.stdout


# ---------------------------------------------------------------------------------------
# randomness: same generator seed -> same seed on every device
# ---------------------------------------------------------------------------------------


def test_seed_stream_is_the_cpu_generator_stream():
    g = torch.Generator().manual_seed(1234)
    seeds = [ops._remask._draw_seed(g) for _ in range(3)]
    ref = torch.randint(0, 1 << 62, (3,), generator=torch.Generator().manual_seed(1234)).tolist()
    assert seeds == ref
    assert len(set(seeds)) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seed_stream_same_on_cuda_generator():
    gc = torch.Generator("cpu").manual_seed(7)
    gg = torch.Generator("cuda").manual_seed(7)
    assert [ops._remask._draw_seed(gc) for _ in range(4)] == [
        ops._remask._draw_seed(gg) for _ in range(4)
    ]


def test_deterministic_remask_consumes_no_randomness():
    g = torch.Generator().manual_seed(5)
    state = g.get_state().clone()
    logits = torch.randn(1, 4, 9)
    x = torch.full((1, 4), 8)
    lx.remask(logits, x, 2, mask_id=8, generator=g)
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------------------------------
# build facts
# ---------------------------------------------------------------------------------------


def _nvcc_present() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/bin/nvcc")


@pytest.mark.skipif(not _nvcc_present(), reason="nvcc is not on this machine")
@pytest.mark.skipif(os.environ.get("LLADA_CUDA") == "0", reason="CPU-only build requested")
def test_cuda_sources_compiled_when_nvcc_present():
    """With nvcc present the default build compiles every CUDA kernel into the library."""
    assert lx.has_cuda_kernels()


def test_version_matches_header():
    header = open(
        os.path.join(os.path.dirname(__file__), "..", "csrc", "include", "llada", "llada.h")
    ).read()
    parts = {}
    for name in ("MAJOR", "MINOR", "PATCH"):
        line = next(li for li in header.splitlines() if f"#define LLADA_VERSION_{name} " in li)
        parts[name] = int(line.split()[-1])
    expected = parts["MAJOR"] * 10000 + parts["MINOR"] * 100 + parts["PATCH"]
    assert lx._C.version() == expected
    assert lx.__version__ == f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}"


def test_cuda_status_gives_the_runtime_reason():
    """cuda_status says whether the CUDA kernels can run here, with the runtime's own reason
    when they cannot (has_cuda_kernels only says they were built)."""
    status = lx.cuda_status()
    assert isinstance(status, lx.CudaStatus)
    if not lx.has_cuda_kernels():
        assert not status.usable and "without the CUDA kernels" in status.reason
    elif status.usable:
        assert status.reason == ""
    else:
        assert "CUDA runtime is" in status.reason
        assert "driver" in status.reason
        with pytest.raises(RuntimeError, match="cannot run on this machine"):
            from llada_ext._cuda import require_cuda_kernels

            require_cuda_kernels()


def test_model_attention_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    """When the CUDA kernels cannot run (e.g. a driver older than their runtime), the model's
    CUDA attention takes torch SDPA, with one warning per process."""
    from llada_ext import _cuda
    from llada_ext.model import _kernel_attention_supported

    monkeypatch.setattr(_cuda, "cuda_status", lambda: _cuda.CudaStatus(False, "driver too old"))
    _cuda.warn_torch_fallback.cache_clear()

    class FakeCudaTensor:
        device = torch.device("cuda")
        dtype = torch.bfloat16
        shape = (1, 4, 2, 64)

    with caplog.at_level("WARNING", logger="llada_ext"):
        assert _kernel_attention_supported(FakeCudaTensor()) is False
        assert _kernel_attention_supported(FakeCudaTensor()) is False
    warnings = [r for r in caplog.records if "driver too old" in r.getMessage()]
    assert len(warnings) == 1 and "torch SDPA" in warnings[0].getMessage()
    monkeypatch.setattr(_cuda, "cuda_status", lambda: _cuda.CudaStatus(True, ""))
    assert _kernel_attention_supported(FakeCudaTensor()) is True
    _cuda.warn_torch_fallback.cache_clear()
