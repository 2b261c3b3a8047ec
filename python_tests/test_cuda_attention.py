"""CUDA attention (lx.attention on cuda tensors) against float64 PyTorch references.

Accuracy follows the flash-attention rule: the kernel's error against a float64 reference
computed from the same (rounded) inputs must be at most twice the error of plain PyTorch
attention evaluated in the same low precision (three times for gradients), plus a tiny
absolute slack. Every test is skipped when no CUDA device is available.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float16, torch.bfloat16]


def _lx():
    import llada_ext as lx

    return lx


# ---- references -------------------------------------------------------------------------


def ref_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in ``compute_dtype``; returns (out [B, Sq, Hq, D], lse [B, Hq, Sq]).

    Fully masked query rows give out = 0 and lse = -inf without NaN in value or gradient.
    """
    hq, hkv = q.shape[2], k.shape[2]
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(hq // hkv, dim=2)
    vc = v.to(compute_dtype).repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / denom.clamp_min(torch.finfo(compute_dtype).tiny)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vc)
    lse = (torch.log(denom) + row_max).squeeze(-1).float()
    return out, lse


def make_inputs(
    b: int,
    sq: int,
    sk: int,
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: str = "cuda",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g).to(device, dtype)
    k = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype)
    return q, k, v


def random_mask(
    b: int, sk: int, seed: int = 1, p_keep: float = 0.7, device: str = "cuda"
) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    m = torch.rand(b, sk, generator=g) < p_keep
    m[:, 0] = True  # every row keeps at least one key unless a test wants otherwise
    return m.to(device)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_forward(q, k, v, mask, scale, out, lse=None) -> None:
    ref, ref_lse = ref_attention(q, k, v, mask, scale)
    low, _ = ref_attention(q, k, v, mask, scale, compute_dtype=q.dtype)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err, base = max_err(out, ref), max_err(low, ref)
    assert err <= 2 * base + 1e-5, f"forward error {err:.3g} vs low-precision torch {base:.3g}"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        assert (lse[~fin] == float("-inf")).all()
        torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=1e-3, atol=2e-3)


def check_backward(q, k, v, mask, scale, seed: int = 3) -> None:
    lx = _lx()
    g = torch.Generator(device="cpu").manual_seed(seed)
    dout = torch.randn(q.shape, generator=g).to(q.device, q.dtype)

    qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = lx.attention(qs, ks, vs, mask, scale=scale)
    got = torch.autograd.grad(out, (qs, ks, vs), dout)
    check_grads(q, k, v, mask, scale, dout, got)


def check_grads(q, k, v, mask, scale, dout, got) -> None:
    """got = (dq, dk, dv) for upstream dout, against float64 and low-precision torch."""
    grads = {}
    for name, cdt in (("ref", torch.float64), ("low", q.dtype)):
        qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        o, _ = ref_attention(qr, kr, vr, mask, scale, compute_dtype=cdt)
        grads[name] = torch.autograd.grad(o, (qr, kr, vr), dout.to(cdt))

    for name, x, gx, gr, gl in zip("qkv", (q, k, v), got, grads["ref"], grads["low"]):
        assert gx.dtype == x.dtype and gx.shape == x.shape, name
        assert torch.isfinite(gx).all(), f"d{name} has non-finite values"
        err, base = max_err(gx, gr), max_err(gl, gr)
        assert err <= 3 * base + 1e-4, f"d{name} error {err:.3g} vs low-precision torch {base:.3g}"


# ---- forward / backward accuracy ---------------------------------------------------------

SHAPES = [
    # (B, Sq, Sk, Hq, Hkv)
    (2, 77, 77, 3, 3),  # odd sizes, partial tiles
    (1, 130, 257, 6, 2),  # GQA, Sq != Sk
    (2, 33, 65, 4, 1),  # MQA
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 72, 256])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(dtype: torch.dtype, d: int, shape: tuple) -> None:
    b, sq, sk, hq, hkv = shape
    q, k, v = make_inputs(b, sq, sk, hq, hkv, d, dtype)
    out, lse = _lx().attention(q, k, v, return_lse=True)
    check_forward(q, k, v, None, d**-0.5, out, lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 72, 256])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(dtype: torch.dtype, d: int, shape: tuple) -> None:
    b, sq, sk, hq, hkv = shape
    q, k, v = make_inputs(b, sq, sk, hq, hkv, d, dtype, seed=d)
    check_backward(q, k, v, None, d**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_key_mask(dtype: torch.dtype, d: int) -> None:
    q, k, v = make_inputs(3, 50, 91, 4, 2, d, dtype, seed=5)
    mask = random_mask(3, 91, seed=6, p_keep=0.5)
    scale = 0.37
    out, lse = _lx().attention(q, k, v, mask, scale=scale, return_lse=True)
    check_forward(q, k, v, mask, scale, out, lse)
    check_backward(q, k, v, mask, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows(dtype: torch.dtype) -> None:
    """A batch row with every key masked: out 0, lse -inf, zero grads, no NaN anywhere."""
    lx = _lx()
    q, k, v = make_inputs(2, 40, 70, 4, 4, 128, dtype, seed=7)
    mask = random_mask(2, 70, seed=8)
    mask[1] = False
    out, lse = lx.attention(q, k, v, mask, return_lse=True)
    check_forward(q, k, v, mask, 128**-0.5, out, lse)
    assert (out[1] == 0).all()
    assert (lse[1] == float("-inf")).all()

    qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o = lx.attention(qs, ks, vs, mask)
    dq, dk, dv = torch.autograd.grad(o, (qs, ks, vs), torch.randn_like(o))
    for gx in (dq, dk, dv):
        assert torch.isfinite(gx).all()
        assert (gx[1] == 0).all()
    assert (dk[0][~mask[0]] == 0).all() and (dv[0][~mask[0]] == 0).all()
    check_backward(q, k, v, mask, 128**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_queries_long_keys(dtype: torch.dtype) -> None:
    """A block of 32 queries against 1000 keys (semi-autoregressive sampling shape)."""
    q, k, v = make_inputs(2, 32, 1000, 8, 8, 128, dtype, seed=9)
    mask = random_mask(2, 1000, seed=10, p_keep=0.9)
    out, lse = _lx().attention(q, k, v, mask, return_lse=True)
    check_forward(q, k, v, mask, 128**-0.5, out, lse)
    check_backward(q, k, v, mask, 128**-0.5)


# ---- layouts -----------------------------------------------------------------------------


def test_non_contiguous_fused_qkv() -> None:
    """q, k, v as strided views of one fused [B, S, 3, H, D] projection (aligned strides)."""
    dtype = torch.bfloat16
    qkv = torch.randn(2, 45, 3, 4, 64, device="cuda").to(dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    out, lse = _lx().attention(q, k, v, return_lse=True)
    check_forward(q, k, v, None, 64**-0.5, out, lse)
    check_backward(q, k, v, None, 64**-0.5)


def test_non_contiguous_head_major() -> None:
    """Inputs stored [B, H, S, D] and viewed as [B, S, H, D] (transposed strides)."""
    dtype = torch.float16
    g = torch.Generator(device="cpu").manual_seed(11)
    q = torch.randn(2, 4, 37, 128, generator=g).to("cuda", dtype).transpose(1, 2)
    k = torch.randn(2, 2, 53, 128, generator=g).to("cuda", dtype).transpose(1, 2)
    v = torch.randn(2, 2, 53, 128, generator=g).to("cuda", dtype).transpose(1, 2)
    out, lse = _lx().attention(q, k, v, return_lse=True)
    check_forward(q, k, v, None, 128**-0.5, out, lse)
    check_backward(q, k, v, None, 128**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_strides(dtype: torch.dtype) -> None:
    """Row strides that are not multiples of 8 elements and a base that is not 16-byte
    aligned (the kernels' element-wise fallback path)."""
    g = torch.Generator(device="cpu").manual_seed(12)
    b, s, h, d = 2, 41, 3, 64
    q = torch.randn(b, s, h, d + 4, generator=g).to("cuda", dtype)[..., :d]
    buf = torch.randn(b * s * h * d + 1, generator=g).to("cuda", dtype)
    k = buf[1:].view(b, s, h, d)
    v = torch.randn(b, s, h, d + 2, generator=g).to("cuda", dtype)[..., 1 : d + 1]
    out, lse = _lx().attention(q, k, v, return_lse=True)
    check_forward(q, k, v, None, d**-0.5, out, lse)
    check_backward(q, k, v, None, d**-0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cpu_and_cuda_agree(dtype: torch.dtype) -> None:
    lx = _lx()
    q, k, v = make_inputs(2, 70, 90, 4, 2, 64, dtype, seed=13)
    mask = random_mask(2, 90, seed=14)
    out_cuda, lse_cuda = lx.attention(q, k, v, mask, return_lse=True)
    out_cpu, lse_cpu = lx.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), return_lse=True)
    ref, _ = ref_attention(q, k, v, mask, 64**-0.5)
    low, _ = ref_attention(q, k, v, mask, 64**-0.5, compute_dtype=dtype)
    bound = 2 * max_err(low, ref) + 1e-5
    assert max_err(out_cuda.cpu(), out_cpu) <= 2 * bound
    torch.testing.assert_close(lse_cuda.cpu(), lse_cpu, rtol=1e-3, atol=2e-3)


def test_runs_on_current_stream() -> None:
    lx = _lx()
    q, k, v = make_inputs(1, 64, 64, 2, 2, 64, torch.bfloat16, seed=15)
    expected = lx.attention(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = lx.attention(q, k, v)
    stream.synchronize()
    assert torch.equal(out, expected)


# ---- CUDA graphs -------------------------------------------------------------------------


def test_cuda_graph_capture_forward() -> None:
    """Capture the forward once, replay it on new data copied into the static inputs."""
    lx = _lx()
    dtype = torch.bfloat16
    q_s, k_s, v_s = make_inputs(2, 48, 80, 4, 2, 128, dtype, seed=16)
    mask_s = random_mask(2, 80, seed=17)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, attributes)
        for _ in range(2):
            lx.attention(q_s, k_s, v_s, mask_s)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_s, lse_s = lx.attention(q_s, k_s, v_s, mask_s, return_lse=True)

    for seed in (18, 19):
        q, k, v = make_inputs(2, 48, 80, 4, 2, 128, dtype, seed=seed)
        mask = random_mask(2, 80, seed=seed + 100)
        q_s.copy_(q)
        k_s.copy_(k)
        v_s.copy_(v)
        mask_s.copy_(mask)
        graph.replay()
        torch.cuda.synchronize()
        eager, eager_lse = lx.attention(q, k, v, mask, return_lse=True)
        assert torch.equal(out_s, eager)
        assert torch.equal(lse_s, eager_lse)
        check_forward(q, k, v, mask, 128**-0.5, out_s.clone(), lse_s.clone())


def test_large_scores_are_stable() -> None:
    """Large logits (scale 1 on big inputs) must not overflow the online softmax."""
    dtype = torch.bfloat16
    q, k, v = make_inputs(1, 65, 130, 2, 2, 64, dtype, seed=20)
    q = (q * 4).to(dtype)
    out, lse = _lx().attention(q, k, v, scale=1.0, return_lse=True)
    check_forward(q, k, v, None, 1.0, out, lse)
    assert math.isfinite(lse.max().item())


# ---- decode-shaped calls: split keys, packed GQA groups ---------------------------------

DECODE_SHAPES = [
    # (B, Sq, Sk, Hq, Hkv, D): a sampler block against a long cache
    (1, 32, 4096, 32, 32, 128),  # LLaDA-8B dimensions
    (1, 32, 2048, 32, 4, 64),  # the 1b preset's GQA
    (2, 1, 777, 6, 1, 256),  # MQA, one query
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_shapes_split_keys(dtype: torch.dtype, shape: tuple) -> None:
    """lx.attention takes the split-KV plan for these shapes (a workspace is asked for): the
    merged result meets the accuracy rule, gradients too, and repeated calls are bitwise
    equal (a fixed split per shape, merged in order)."""
    from llada_ext import _C
    from llada_ext._views import view

    b, sq, sk, hq, hkv, d = shape
    q, k, v = make_inputs(b, sq, sk, hq, hkv, d, dtype, seed=sk)
    assert _C.attention_fwd_workspace_size(view(q), view(k)) > 0
    mask = random_mask(b, sk, seed=sq, p_keep=0.9)
    out, lse = _lx().attention(q, k, v, mask, return_lse=True)
    check_forward(q, k, v, mask, d**-0.5, out, lse)
    again = _lx().attention(q, k, v, mask)
    assert torch.equal(out, again)
    check_backward(q, k, v, mask, d**-0.5)


def test_decode_attention_in_a_cuda_graph() -> None:
    """The split-KV path (its workspace included) captures into a CUDA graph and replays to
    the eager result."""
    lx = _lx()
    q, k, v = make_inputs(1, 32, 1024, 8, 8, 128, torch.bfloat16, seed=3)
    eager = lx.attention(q, k, v)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lx.attention(q, k, v)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lx.attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
