"""CUDA attention kernels run on the CPU executor (llada_ext.emu), against float64 references.

The same kernel sources as the GPU build, compiled for the executor, which checks every memory
access and synchronisation as the kernels run (see csrc/emu). The cases and accuracy rules are
those of test_cuda_attention.py: error at most twice that of plain PyTorch in the same low
precision (three times for gradients). Sizes are smaller where a case only needs to cross a
tile edge, because each emulated thread is a fiber on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_attention import (
    SHAPES,
    check_forward,
    check_grads,
    make_inputs,
    max_err,
    random_mask,
    ref_attention,
)

import llada_ext as lx
from llada_ext import emu

pytestmark = pytest.mark.skipif(not emu.available(), reason="built without the executor")

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128, 72, 256]  # the three buckets, and 72 zero-padded into the 128 bucket


def inputs(b, sq, sk, hq, hkv, d, dtype, seed=0):
    return make_inputs(b, sq, sk, hq, hkv, d, dtype, seed=seed, device="cpu")


def emu_forward_backward(q, k, v, mask, scale, seed: int = 3) -> None:
    """Forward and backward kernels on the executor, checked against the references."""
    out, lse = emu.attention_fwd(q, k, v, mask, scale)
    check_forward(q, k, v, mask, scale, out, lse)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=g).to(q.dtype)
    got = emu.attention_bwd(q, k, v, mask, out, dout, lse, scale)
    check_grads(q, k, v, mask, scale, dout, got)
    return out, lse, got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(dtype: torch.dtype, d: int, shape: tuple) -> None:
    b, sq, sk, hq, hkv = shape
    q, k, v = inputs(b, sq, sk, hq, hkv, d, dtype, seed=d)
    emu_forward_backward(q, k, v, None, d**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_key_mask(dtype: torch.dtype, d: int) -> None:
    q, k, v = inputs(3, 50, 91, 4, 2, d, dtype, seed=5)
    mask = random_mask(3, 91, seed=6, p_keep=0.5, device="cpu")
    emu_forward_backward(q, k, v, mask, 0.37)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows(dtype: torch.dtype) -> None:
    """A batch row with every key masked: out 0, lse -inf, zero grads, no NaN anywhere; a
    masked key is never read, so NaN in its K/V rows cannot reach anything."""
    q, k, v = inputs(2, 40, 70, 4, 4, 128, dtype, seed=7)
    mask = random_mask(2, 70, seed=8, device="cpu")
    mask[1] = False
    k[~mask] = float("nan")
    v[~mask] = float("nan")
    kc = torch.where(mask[:, :, None, None], k, torch.zeros_like(k))
    vc = torch.where(mask[:, :, None, None], v, torch.zeros_like(v))
    out, lse = emu.attention_fwd(q, k, v, mask)
    check_forward(q, kc, vc, mask, 128**-0.5, out, lse)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    dout = torch.randn(q.shape).to(dtype)
    dq, dk, dv = emu.attention_bwd(q, k, v, mask, out, dout, lse)
    check_grads(q, kc, vc, mask, 128**-0.5, dout, (dq, dk, dv))
    for gx in (dq, dk, dv):
        assert torch.isfinite(gx).all()
        assert (gx[1] == 0).all()
    assert (dk[0][~mask[0]] == 0).all() and (dv[0][~mask[0]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_queries_long_keys(dtype: torch.dtype) -> None:
    """A block of 32 queries against many keys (semi-autoregressive sampling shape)."""
    q, k, v = inputs(1, 32, 600, 2, 2, 128, dtype, seed=9)
    mask = random_mask(1, 600, seed=10, p_keep=0.9, device="cpu")
    emu_forward_backward(q, k, v, mask, 128**-0.5)


def fwd_workspace(q, k) -> int:
    return emu._load().attention_fwd_workspace_size(emu._view(q), emu._view(k))


# (B, Sq, Sk, Hq, Hkv, D, key splits the plan picks): decode-shaped calls
DECODE = [
    (1, 32, 700, 4, 4, 128, 4),  # a sampler block against a long cache, MHA: short tile
    (1, 5, 900, 8, 2, 64, 5),  # GQA: the 4 query heads of a KV head packed into one tile
    (2, 1, 333, 6, 1, 256, 4),  # MQA, one query, the 256 bucket
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,splits", DECODE)
def test_decode_shapes_split_keys(dtype, b, sq, sk, hq, hkv, d, splits) -> None:
    """Few query rows against many keys: the keys are cut into ranges over separate CTAs and
    merged (flash-decoding), the GQA group's query heads share one tile. Against the float64
    reference, with a key mask that empties whole ranges; backward from that forward's lse;
    the single-pass kernel agrees; the result is deterministic."""
    q, k, v = inputs(b, sq, sk, hq, hkv, d, dtype, seed=sk)
    assert fwd_workspace(q, k) == b * hq * sq * splits * (d + 2) * 4
    mask = random_mask(b, sk, seed=sq, p_keep=0.8, device="cpu")
    mask[:, 100:260] = False  # whole key ranges without an attended key
    out, lse, _ = emu_forward_backward(q, k, v, mask, d**-0.5)
    again, lse2 = emu.attention_fwd(q, k, v, mask)
    assert torch.equal(out, again) and torch.equal(lse, lse2)
    one_pass, lse1 = emu.attention_fwd(q, k, v, mask, split=False)
    torch.testing.assert_close(lse, lse1, rtol=0, atol=1e-5)
    tol = 2 * max_err(one_pass, ref_attention(q, k, v, mask, d**-0.5)[0]) + 1e-3
    assert (out.float() - one_pass.float()).abs().max().item() <= tol


def bwd_workspace(q, k) -> int:
    return emu._load().attention_bwd_workspace_size(emu._view(q), emu._view(k))


# (B, Sq, Sk, Hq, Hkv, D, step ranges the backward plan picks): small grids
BWD_SPLIT = [
    (1, 70, 150, 8, 2, 128, 6),  # GQA at a short length: 3 key tiles x 2 KV heads
    (2, 33, 65, 4, 1, 64, 2),  # MQA
    (1, 40, 100, 4, 2, 256, 2),  # the 256 bucket (shared P^T / dS^T)
    (1, 19, 60, 2, 2, 64, 1),  # too few steps to split: dK, dV stored directly
]


@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,splits", BWD_SPLIT)
def test_backward_split_steps(b, sq, sk, hq, hkv, d, splits) -> None:
    """A small grid cuts each key tile's (query head, query tile) steps into ranges over
    separate CTAs, whose float32 partial dK/dV a reduce kernel adds in range order: against
    the float64 reference, with a key mask; deterministic from run to run."""
    q, k, v = inputs(b, sq, sk, hq, hkv, d, torch.bfloat16, seed=sk + d)
    base = b * hq * sq * (d + 1)
    partials = 2 * splits * b * hkv * sk * d if splits > 1 else 0
    assert bwd_workspace(q, k) == 4 * ((base + 3) // 4 * 4 if partials else base) + 4 * partials
    mask = random_mask(b, sk, seed=sq, p_keep=0.7, device="cpu")
    _, _, got = emu_forward_backward(q, k, v, mask, d**-0.5)
    out, lse = emu.attention_fwd(q, k, v, mask)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q.dtype)
    again = emu.attention_bwd(q, k, v, mask, out, dout, lse)
    assert all(torch.equal(x, y) for x, y in zip(got, again))


def test_split_keys_all_masked_row() -> None:
    """A batch row whose keys are all masked through every range: out 0 and lse -inf after
    the merge, and no NaN from the masked K/V rows."""
    q, k, v = inputs(2, 3, 500, 4, 2, 64, torch.bfloat16, seed=31)
    assert fwd_workspace(q, k) > 0
    mask = random_mask(2, 500, seed=32, device="cpu")
    mask[0] = False
    k[~mask] = float("nan")
    v[~mask] = float("nan")
    out, lse = emu.attention_fwd(q, k, v, mask)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    kc = torch.where(mask[:, :, None, None], k, torch.zeros_like(k))
    vc = torch.where(mask[:, :, None, None], v, torch.zeros_like(v))
    check_forward(q, kc, vc, mask, 64**-0.5, out, lse)


def test_no_keys() -> None:
    """Sk = 0: every row is fully masked (out 0, lse -inf), and dq is zero."""
    q, k, v = inputs(2, 19, 0, 2, 1, 64, torch.bfloat16, seed=21)
    out, lse = emu.attention_fwd(q, k, v)
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = emu.attention_bwd(q, k, v, None, out, torch.randn(q.shape).to(q.dtype), lse)
    assert (dq == 0).all() and dk.numel() == 0 and dv.numel() == 0


# ---- layouts -----------------------------------------------------------------------------


def test_non_contiguous_fused_qkv() -> None:
    """q, k, v as strided views of one fused [B, S, 3, H, D] projection (aligned strides)."""
    qkv = torch.randn(2, 45, 3, 4, 64).to(torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    emu_forward_backward(q, k, v, None, 64**-0.5)


def test_non_contiguous_head_major() -> None:
    """Inputs stored [B, H, S, D] and viewed as [B, S, H, D] (transposed strides)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 37, 128, generator=g).to(torch.float16).transpose(1, 2)
    k = torch.randn(2, 2, 53, 128, generator=g).to(torch.float16).transpose(1, 2)
    v = torch.randn(2, 2, 53, 128, generator=g).to(torch.float16).transpose(1, 2)
    emu_forward_backward(q, k, v, None, 128**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_strides(dtype: torch.dtype) -> None:
    """Row strides that are not multiples of 8 elements and a base that is not 16-byte
    aligned (the kernels' element-wise fallback path)."""
    g = torch.Generator().manual_seed(12)
    b, s, h, d = 2, 41, 3, 64
    q = torch.randn(b, s, h, d + 4, generator=g).to(dtype)[..., :d]
    buf = torch.randn(b * s * h * d + 1, generator=g).to(dtype)
    k = buf[1:].view(b, s, h, d)
    v = torch.randn(b, s, h, d + 2, generator=g).to(dtype)[..., 1 : d + 1]
    emu_forward_backward(q, k, v, None, d**-0.5)


def test_large_scores_are_stable() -> None:
    """Large logits (scale 1 on big inputs) must not overflow the online softmax."""
    q, k, v = inputs(1, 65, 130, 2, 2, 64, torch.bfloat16, seed=20)
    q = (q * 4).to(torch.bfloat16)
    out, lse = emu.attention_fwd(q, k, v, scale=1.0)
    check_forward(q, k, v, None, 1.0, out, lse)
    assert torch.isfinite(lse).all()


def test_executor_agrees_with_cpu_twin() -> None:
    """The CUDA kernel (on the executor) and the C++ CPU kernel on the same bfloat16 inputs."""
    q, k, v = inputs(2, 70, 90, 4, 2, 64, torch.bfloat16, seed=13)
    mask = random_mask(2, 90, seed=14, device="cpu")
    out_emu, lse_emu = emu.attention_fwd(q, k, v, mask)
    out_cpu, lse_cpu = lx.attention(q, k, v, mask, return_lse=True)
    ref, _ = ref_attention(q, k, v, mask, 64**-0.5)
    low, _ = ref_attention(q, k, v, mask, 64**-0.5, compute_dtype=torch.bfloat16)
    assert max_err(out_emu, out_cpu) <= 2 * (2 * max_err(low, ref) + 1e-5)
    torch.testing.assert_close(lse_emu, lse_cpu, rtol=1e-3, atol=2e-3)


def test_split_workspace_too_small_is_refused() -> None:
    q, k, v = inputs(1, 4, 400, 2, 2, 64, torch.float16, seed=41)
    need = fwd_workspace(q, k)
    assert need > 0
    ws = torch.empty(need // 4, dtype=torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty((1, 2, 4), dtype=torch.float32)
    args = [emu._view(t) for t in (q, k, v)] + [None, 0.125, emu._view(out), emu._view(lse), 0]
    with pytest.raises(ValueError, match="workspace"):
        emu._load().attention_fwd(*args, ws.data_ptr(), need - 1)
    emu._load().attention_fwd(*args, ws.data_ptr(), need)  # the size asked for is enough
    check_forward(q, k, v, None, 0.125, out, lse)


def test_backward_workspace_must_be_8_byte_aligned() -> None:
    """dQ is accumulated with 8-byte float2 atomics (sm_90): a workspace that is only 4-byte
    aligned is refused by name instead of faulting."""
    q, k, v = inputs(1, 8, 16, 2, 2, 64, torch.bfloat16, seed=43)
    out, lse = emu.attention_fwd(q, k, v)
    dout = torch.randn(q.shape).to(q.dtype)
    need = emu._load().attention_bwd_workspace_size(emu._view(q), emu._view(k))
    ws = torch.empty(need // 4 + 2, dtype=torch.float32)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    args = [emu._view(t) for t in (q, k, v)] + [None]
    args += [emu._view(t) for t in (out, dout, lse)] + [0.125] + [emu._view(g) for g in grads]
    with pytest.raises(Exception, match="aligned to 8 bytes"):
        emu._load().attention_bwd(*args, ws.data_ptr() + 4, need, 0)
