"""``llada_ext.dlpack``, the kernels for any DLPack producer: on NumPy arrays (and other CPU
producers) it gives the numbers of the torch ops and of plain float64 references, strided inputs
included, and checks its arguments exactly as the torch ops do (same exception, same message);
the CuPy and JAX cases run only where those libraries (and, for the CUDA ones, a GPU) are
present.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import llada_ext as lx
from llada_ext import dlpack as dl
from llada_ext import ops

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


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_dlpack_masked_ce_ignore_index_and_mean(reduction, ignore_index):
    """ignore_index and reduction="mean" as the torch op has them: rows whose target is
    ignore_index are skipped whatever their weight, and "mean" divides by the rows that count;
    on NumPy arrays and on torch tensors through the DLPack entry point."""
    rng = np.random.default_rng(21 + ignore_index % 7)
    lead, V = (4, 7), 11
    logits = rng.standard_normal((*lead, V)).astype(np.float32) * 2
    targets = rng.integers(0, V, lead).astype(np.int64)
    weights = (0.5 + rng.random(lead)).astype(np.float32)
    weights[0, :2] = 0
    targets[1, 1:4] = ignore_index  # nonzero weight, but skipped
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    want = lx.masked_cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(weights), **kw
    ).numpy()
    counted = (weights != 0) & (targets != ignore_index)
    ref = np.where(counted, ref_masked_ce(logits, np.where(counted, targets, 0), weights), 0)
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.sum() / counted.sum()}[reduction]
    got = dl.masked_cross_entropy(logits, targets, weights, **kw)
    got_t = dl.masked_cross_entropy(torch.from_numpy(logits), targets, weights, **kw)
    for g in (got, got_t.numpy()):
        assert g.shape == want.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert (got[~counted] == 0).all()
    # every row skipped: "mean" is 0, not NaN
    none = np.full(lead, ignore_index, np.int64)
    assert float(dl.masked_cross_entropy(logits, none, weights, **kw).sum()) == 0.0
    with pytest.raises(ValueError, match="ignore_index"):
        dl.masked_cross_entropy(logits, np.full(lead, V, np.int64), weights, **kw)


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
            logits, np.zeros((2, 4), np.int64), np.ones((2, 4), np.float32), reduction="avg"
        )
    with pytest.raises(TypeError, match="ignore_index"):
        dl.masked_cross_entropy(
            logits, np.zeros((2, 4), np.int64), np.ones((2, 4), np.float32), ignore_index=1.5
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
