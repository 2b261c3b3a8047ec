"""lx.attention (forward, lse, backward) against a plain PyTorch float64 reference.

Accuracy rules: float32 kernels must match the float64 reference to float32 rounding; for the
16-bit dtypes the flash-attention rule applies: the kernel's error against the float64
reference may be at most twice the error of the same plain PyTorch code run in that dtype
(three times for gradients), plus a small epsilon.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

import llada_ext as lx

# ---------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention computed in q's dtype (float64 inputs give the reference).

    Parameters
    ----------
    q : Tensor
        ``[B, Sq, Hq, D]``.
    k, v : Tensor
        ``[B, Sk, Hkv, D]`` with ``Hq % Hkv == 0``; query head h uses kv head
        ``h // (Hq // Hkv)``.
    key_mask : Tensor, optional
        bool ``[B, Sk]``, True = attended.
    scale : float, optional
        Defaults to ``D ** -0.5``.

    Returns
    -------
    (Tensor, Tensor)
        ``out [B, Sq, Hq, D]`` (zero rows for queries without any attended key) and
        ``lse [B, Hq, Sq]`` (-inf for those queries).
    """
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_mask is None:
        has_key = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    else:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        has_key = key_mask.any(dim=1)
    lse = torch.logsumexp(s, dim=-1)
    # A row without any attended key: softmax would be 0/0. Give it finite scores so no NaN
    # appears (not even in the backward), then zero its probabilities.
    s = s.masked_fill(~has_key[:, None, None, None], 0.0)
    p = torch.softmax(s, dim=-1) * has_key[:, None, None, None]
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}
_DTYPE_IDS = ["wide", "bf16"]  # cpu: float32 / bfloat16, cuda: float16 / bfloat16


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _check(
    got: torch.Tensor,
    ref64: torch.Tensor,
    plain: torch.Tensor,
    factor: float,
    name: str,
    f32_tol: tuple[float, float] = (1e-5, 2e-6),
) -> None:
    """float32: tight rtol/atol; 16-bit: err(got) <= factor * err(plain) + eps."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.dtype == torch.float32:
        rtol, atol = f32_tol
        torch.testing.assert_close(got.double(), ref64, rtol=rtol, atol=atol, msg=name)
        return
    err, err_plain = _err(got, ref64), _err(plain, ref64)
    eps = 1e-4 * max(1.0, ref64.abs().max().item())
    assert err <= factor * err_plain + eps, (
        f"{name}: kernel error {err:.3g} > {factor} x plain {got.dtype} error {err_plain:.3g}"
    )


def _mask(B: int, Sk: int, device: str, *, empty_row: Optional[int] = None) -> torch.Tensor:
    """Random key padding, different per row, at least one attended key per row except
    `empty_row` (no attended key at all)."""
    m = torch.rand(B, Sk, device=device) > 0.35
    m[torch.arange(B), torch.randint(0, Sk, (B,))] = True
    if empty_row is not None:
        m[empty_row] = False
    return m


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: Optional[float],
    dout: torch.Tensor,
    grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[list[torch.Tensor]]]:
    """out, lse and (q, k, v) gradients of lx.attention for leaves q, k, v."""
    leaves = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    out, lse = lx.attention(*leaves, mask, scale=scale, return_lse=True)
    if not grads:
        return out.detach(), lse, None
    out.backward(dout)
    return out.detach(), lse, [t.grad for t in leaves]


def _run_ref(q, k, v, mask, scale, dout, dtype):
    """out, lse, grads of attention_ref with leaves cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_ref(*leaves, mask, scale)
    out.backward(dout.to(dtype))
    return out.detach(), lse, [t.grad for t in leaves]


def _compare(q, k, v, mask, scale=None, *, dout=None, grads=True):
    """Runs lx.attention and both references and checks out, lse and gradients."""
    if dout is None:
        dout = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    out, lse, g = _run(q, k, v, mask, scale, dout, grads)
    out64, lse64, g64 = _run_ref(q, k, v, mask, scale, dout, torch.float64)
    plain = _run_ref(q, k, v, mask, scale, dout, q.dtype) if q.dtype != torch.float32 else None

    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    _check(out, out64, plain[0] if plain else None, 2.0, "out")
    # lse is accumulated in float32 from the (exactly upcast) inputs in every dtype, so it is
    # held to float32 accuracy even for 16-bit inputs.
    empty = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf exactly at the empty rows"
    torch.testing.assert_close(lse[~empty].double(), lse64[~empty], rtol=1e-5, atol=1e-5)
    if grads:
        for name, a, r, i in zip(("dq", "dk", "dv"), g, g64, range(3)):
            _check(a, r, plain[2][i] if plain else None, 3.0, name, f32_tol=(1e-4, 1e-5))
    return out, lse, g


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------

# (B, Sq, Sk, Hq, Hkv, D): GQA, MQA, MHA, Sq != Sk both ways, several key and query blocks
# with ragged ends, a single query, fewer keys than one block.
_SHAPES = [
    (2, 37, 91, 4, 2, 40),
    (2, 91, 37, 3, 1, 8),
    (1, 64, 64, 2, 2, 64),
    (1, 130, 300, 4, 2, 72),
    (2, 1, 300, 2, 1, 64),
    (3, 70, 5, 2, 2, 16),
]


@pytest.mark.parametrize("which", [0, 1], ids=_DTYPE_IDS)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, which, shape):
    B, Sq, Sk, Hq, Hkv, D = shape
    dtype = _DTYPES[device][which]
    q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    _compare(q, k, v, None)
    _compare(q, k, v, _mask(B, Sk, device))


@pytest.mark.parametrize("which", [0, 1], ids=_DTYPE_IDS)
def test_scale(device, which):
    dtype = _DTYPES[device][which]
    q = torch.randn(2, 19, 4, 24, device=device, dtype=dtype)
    k = torch.randn(2, 23, 4, 24, device=device, dtype=dtype)
    v = torch.randn(2, 23, 4, 24, device=device, dtype=dtype)
    _compare(q, k, v, _mask(2, 23, device), scale=0.31)
    # scale=None means D ** -0.5
    a = lx.attention(q, k, v)
    b = lx.attention(q, k, v, scale=24**-0.5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("which", [0, 1], ids=_DTYPE_IDS)
def test_non_contiguous(device, which):
    """Transposed, sliced, strided and broadcast (stride 0) views of q, k, v and dout."""
    dtype = _DTYPES[device][which]
    B, Sq, Sk, Hq, Hkv, D = 2, 45, 77, 4, 2, 32
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    q = rnd(B, Hq, Sq, D).transpose(1, 2)  # [B, Sq, Hq, D] with the head outside
    k = rnd(B, Sk, 2 * Hkv, D + 8)[:, :, ::2, 3 : 3 + D]  # strided heads, offset into D
    v = rnd(Sk, B, Hkv, D).permute(1, 0, 2, 3)  # batch inside sequence
    dout = rnd(B, Hq, Sq, D).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    _compare(q, k, v, _mask(B, Sk, device), dout=dout)
    # the same kv head broadcast to all kv heads, and one query repeated along the sequence
    k1 = rnd(B, Sk, 1, D).expand(B, Sk, Hkv, D)
    q1 = rnd(B, 1, Hq, D).expand(B, Sq, Hq, D)
    _compare(q1, k1, v, _mask(B, Sk, device), dout=dout)


@pytest.mark.parametrize("which", [0, 1], ids=_DTYPE_IDS)
def test_fully_masked_rows(device, which):
    """A batch row without any attended key: out = 0 exactly, lse = -inf, zero gradients,
    no NaN anywhere; padded keys get exactly zero dk/dv. Sk spans several key blocks, and
    one row pads whole blocks at once."""
    dtype = _DTYPES[device][which]
    B, Sq, Sk, Hq, Hkv, D = 3, 33, 600, 4, 2, 64
    q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    mask = _mask(B, Sk, device, empty_row=1)
    mask[2, :520] = False  # left padding longer than two blocks
    out, lse, (dq, dk, dv) = _compare(q, k, v, mask)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert (out[1] == 0).all()
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[[0, 2]]).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    padded = ~mask[:, :, None, None].expand_as(dk)
    assert (dk[padded] == 0).all() and (dv[padded] == 0).all()


@pytest.mark.parametrize("which", [0, 1], ids=_DTYPE_IDS)
def test_masked_keys_are_never_read(device, which):
    """NaN and inf in the K/V rows of masked keys reach neither the output nor any gradient:
    the result is the one with zeros there, and those keys get zero dk/dv. Sk spans several
    key blocks, one of them partly masked."""
    dtype = _DTYPES[device][which]
    B, Sq, Sk, Hq, Hkv, D = 2, 17, 300, 4, 2, 32
    q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    mask = _mask(B, Sk, device)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[~mask] = float("nan")
    poisoned_v[~mask] = float("inf")
    dout = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    results = []
    for kk, vv in ((poisoned_k, poisoned_v), (k.masked_fill(~mask[..., None, None], 0), v)):
        qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, kk, vv))
        out = lx.attention(qs, ks, vs, key_mask=mask)
        out.backward(dout)
        results.append((out, qs.grad, ks.grad, vs.grad))
    for got, clean in zip(results[0], results[1]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, clean, rtol=0, atol=0)
    assert (results[0][2][~mask] == 0).all() and (results[0][3][~mask] == 0).all()


def test_key_padding_mask_is_refused_with_the_rename(device):
    """The former argument name is a TypeError that explains the rename and its polarity;
    key_mask works by keyword and positionally."""
    q = torch.randn(1, 3, 2, 8, device=device, dtype=_DTYPES[device][1])
    mask = torch.tensor([[True, False, True]], device=device)
    with pytest.raises(TypeError, match="renamed to key_mask.*True = attend.*opposite"):
        lx.attention(q, q, q, key_padding_mask=mask)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bias'"):
        lx.attention(q, q, q, bias=None)
    assert torch.equal(lx.attention(q, q, q, key_mask=mask), lx.attention(q, q, q, mask))


def test_all_keys_masked_everywhere(device):
    """Every row empty: the whole output and every gradient are zero."""
    dtype = _DTYPES[device][1]
    q = torch.randn(2, 9, 2, 16, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 11, 1, 16, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 11, 1, 16, device=device, dtype=dtype, requires_grad=True)
    mask = torch.zeros(2, 11, dtype=torch.bool, device=device)
    out, lse = lx.attention(q, k, v, mask, return_lse=True)
    out.backward(torch.randn_like(out))
    assert (out == 0).all() and torch.isneginf(lse).all()
    for t in (q, k, v):
        assert (t.grad == 0).all()


@pytest.mark.parametrize("which", [0, 1], ids=_DTYPE_IDS)
def test_large_scores(device, which):
    """q and k of magnitude ~1e2 (scores ~1e4, nearly one-hot softmax) stay finite and
    correct: out and dv may err at most 2x / 3x as much as plain torch in the same dtype,
    whose score rounding dominates at this magnitude.

    dq and dk are ~0 here. The backward forms dS = P * (dP - Di) with Di = rowsum(dO * O), a
    cancellation at a one-hot softmax whose rounding (relative ~1e-7 in float32) reaches dq
    and dk multiplied by scale * |k| or scale * |q|; autograd through an exactly one-hot
    softmax does not have it, so those two get that rounding allowance instead (a wrong
    gradient would be off by ~scale * |q| * |k|, orders of magnitude more).
    """
    dtype = _DTYPES[device][which]
    B, Sq, Sk, Hq, Hkv, D = 2, 29, 300, 2, 1, 64
    # float16 tops out at 65504: keep its plain reference's scores (~|q||k|) representable.
    mag = 30.0 if dtype == torch.float16 else 100.0
    q = (torch.randn(B, Sq, Hq, D, device=device) * mag).to(dtype)
    k = (torch.randn(B, Sk, Hkv, D, device=device) * mag).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    mask = _mask(B, Sk, device)
    dout = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    out, lse, g = _run(q, k, v, mask, None, dout)
    out64, lse64, g64 = _run_ref(q, k, v, mask, None, dout, torch.float64)
    plain = _run_ref(q, k, v, mask, None, dout, dtype)
    for t in (out, lse, *g):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=0.0)
    scale = D**-0.5
    unit = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    cancel = unit * scale * D * max(q.abs().max().item(), k.abs().max().item())
    allowance = {"out": 0.0, "dq": cancel, "dk": cancel, "dv": 0.0}
    for name, a, r, p, f in zip(
        ("out", "dq", "dk", "dv"), (out, *g), (out64, *g64), (plain[0], *plain[2]), (2, 3, 3, 3)
    ):
        err, err_plain = _err(a, r), _err(p, r)
        eps = 1e-4 * max(1.0, r.abs().max().item()) + allowance[name]
        assert err <= f * err_plain + eps, f"{name}: {err:.3g} vs plain {err_plain:.3g}"


@pytest.mark.parametrize("which", [0, 1], ids=_DTYPE_IDS)
def test_forward_only_no_grad(device, which):
    """Inference path (no autograd graph) gives the same numbers as the training path."""
    dtype = _DTYPES[device][which]
    q = torch.randn(1, 50, 4, 32, device=device, dtype=dtype)
    k = torch.randn(1, 70, 2, 32, device=device, dtype=dtype)
    v = torch.randn(1, 70, 2, 32, device=device, dtype=dtype)
    with torch.no_grad():
        a = lx.attention(q, k, v)
    b = lx.attention(q.requires_grad_(), k, v)
    assert torch.equal(a, b.detach())


def test_batch_rows_are_independent(device):
    """Each batch row's result depends only on that row (a padded row equals the same row
    computed alone without the padded keys)."""
    dtype = _DTYPES[device][0]
    B, Sq, Sk, Hq, Hkv, D = 3, 21, 40, 2, 2, 16
    q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
    mask = torch.ones(B, Sk, dtype=torch.bool, device=device)
    mask[1, :13] = False
    full = lx.attention(q, k, v, mask)
    alone = lx.attention(q[1:2], k[1:2, 13:], v[1:2, 13:])
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(full[1:2], alone, rtol=tol, atol=tol)


def test_no_keys(device):
    """Sk = 0: every query is empty (out 0, lse -inf, zero dq), like a fully masked row."""
    dtype = _DTYPES[device][0]
    q = torch.randn(2, 5, 2, 16, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 0, 1, 16, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 0, 1, 16, device=device, dtype=dtype, requires_grad=True)
    out, lse = lx.attention(q, k, v, return_lse=True)
    out.backward(torch.randn_like(out))
    assert (out == 0).all() and torch.isneginf(lse).all() and (q.grad == 0).all()
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


def test_cpu_result_independent_of_thread_count():
    """The CPU tile grid depends on the shapes only, so outputs and gradients are bitwise the
    same for any number of threads."""
    q = torch.randn(2, 70, 4, 32)
    k = torch.randn(2, 300, 2, 32)
    v = torch.randn(2, 300, 2, 32)
    mask = _mask(2, 300, "cpu")
    dout = torch.randn(2, 70, 4, 32)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse, g = _run(q, k, v, mask, None, dout)
            results.append((out, lse, *g))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
