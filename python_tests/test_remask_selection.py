"""What lx.remask and lx.remask_ select and return, and what they refuse: the Gumbel sampling
frequencies, the tie rules, how many tokens each row gets, the returned details and the
in-place variant, and the argument checks, on the CPU and (where present) CUDA. The exact
agreement with the public LLaDA sampler's step is in test_remask.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_remask import STRATEGIES, make_x

import llada_ext as lx

# ---------------------------------------------------------------------------------------
# sampling frequencies, ties, selection sizes, details, in place
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_frequencies(device, temperature):
    """x0 histogram over many draws matches softmax(l / T); a banned token never appears."""
    V, W = 12, 4000
    row = torch.randn(V) * 1.5
    row[4] = float("-inf")
    logits = row.expand(1, W, V).contiguous().to(device)
    x = torch.zeros(1, W, dtype=torch.int64).to(device)  # mask_id 0: every position
    counts = torch.zeros(V, dtype=torch.float64)
    for s in range(5):
        x0 = lx.remask(
            logits,
            x,
            0,
            mask_id=0,
            temperature=temperature,
            return_details=True,
            generator=torch.Generator().manual_seed(100 + s),
        )[1].cpu()
        counts += torch.bincount(x0[0], minlength=V).double()
    p = torch.softmax(row.double() / temperature, -1)
    assert counts[4] == 0
    cos = F.cosine_similarity(counts, p, dim=0).item()
    assert cos > 0.99
    assert (counts / counts.sum() - p).abs().max() < 0.02


def test_ties(device):
    """Argmax ties -> lowest token id; confidence ties -> lower position first."""
    V, W = 40, 10
    row = torch.randn(V)
    row[[3, 17, 30]] = row.max() + 1
    logits = row.expand(1, W, V).contiguous()
    x = torch.full((1, W + 2), 2)
    x[0, [2, 4, 5, 8, 11]] = 9  # window [1, 11): candidates 1, 3, 4, 7; x[0, 11] is outside
    out, x0, conf = lx.remask(
        logits.to(device), x.to(device), 3, mask_id=9, offset=1, return_details=True
    )
    cand = (x[:, 1 : 1 + W] == 9)[0]
    assert bool((x0.cpu()[0][cand] == 3).all())
    expected = x.clone()
    expected[0, [2, 4, 5]] = 3
    assert torch.equal(out.cpu(), expected)
    for strategy in STRATEGIES[2:]:  # equal rows tie under every strategy
        out2 = lx.remask(logits.to(device), x.to(device), 2, mask_id=9, offset=1, strategy=strategy)
        expected2 = x.clone()
        expected2[0, [2, 4]] = 3
        assert torch.equal(out2.cpu(), expected2)


def test_selection_sizes(device):
    B, L, W, V = 4, 16, 16, 64
    mask_id = 63
    logits = torch.randn(B, W, V)
    logits[..., mask_id] = float("-inf")  # every transfer then changes x
    x = make_x(B, L, mask_id, V, 0.5)
    x[3] = mask_id
    n_cand = (x == mask_id).sum(1)
    for k in [
        torch.tensor([0, 100, 1, 16]),
        2,
        0,
        torch.tensor(3),
        torch.tensor([1, 2, 3, 4], dtype=torch.int32),
    ]:
        out = lx.remask(
            logits.to(device),
            x.to(device),
            k.to(device) if isinstance(k, torch.Tensor) else k,
            mask_id=mask_id,
        )
        kk = (k if isinstance(k, torch.Tensor) else torch.tensor(k)).expand(B).long()
        assert torch.equal((out.cpu() != x).sum(1), torch.minimum(kk, n_cand))
        assert bool((out.cpu()[out.cpu() != x] != mask_id).all())


def test_details_and_inplace(device):
    B, L, W, offset, V = 2, 12, 6, 5, 30
    mask_id = 29
    logits = torch.randn(B, W, V).to(device)
    x = make_x(B, L, mask_id, V, 0.6).to(device)
    x_before = x.clone()
    out, x0, conf = lx.remask(logits, x, 2, mask_id=mask_id, offset=offset, return_details=True)
    assert out.shape == (B, L) and out.dtype == torch.int64 and out.device == x.device
    assert x0.shape == (B, W) and x0.dtype == torch.int64
    assert conf.shape == (B, W) and conf.dtype == torch.float32
    assert torch.equal(x, x_before)
    win = x[:, offset : offset + W]
    cand = win == mask_id
    assert bool((conf[~cand] == float("-inf")).all()) and bool(torch.isfinite(conf[cand]).all())
    assert torch.equal(x0[~cand], win[~cand])
    assert torch.equal(out[:, :offset], x[:, :offset])
    assert torch.equal(out[:, offset + W :], x[:, offset + W :])
    assert torch.equal(lx.remask(logits, x, 2, mask_id=mask_id, offset=offset), out)
    # remask_ updates x itself, with the same result.
    x2 = x.clone()
    res = lx.remask_(logits, x2, 2, mask_id=mask_id, offset=offset)
    assert res is x2 and torch.equal(x2, out)
    # Non-contiguous logits and x.
    big = torch.randn(B, W, V + 7).to(device)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    o1 = lx.remask(big[..., :V], xt, 2, mask_id=mask_id, offset=offset)
    o2 = lx.remask(big[..., :V].contiguous(), x, 2, mask_id=mask_id, offset=offset)
    assert torch.equal(o1, o2)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"logits": "f64"}, TypeError, "logits"),
        ({"logits": "2d"}, ValueError, "logits"),
        ({"x": "int32"}, TypeError, "x"),
        ({"x": "rows"}, ValueError, "x"),
        ({"num_transfer": 1.5}, TypeError, "num_transfer"),
        ({"num_transfer": "float_tensor"}, TypeError, "num_transfer"),
        ({"num_transfer": "wrong_shape"}, ValueError, "num_transfer"),
        ({"mask_id": 2**63}, ValueError, "mask_id"),
        ({"mask_id": "7"}, TypeError, "mask_id"),
        ({"offset": 10}, ValueError, "offset"),
        ({"temperature": -0.5}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"strategy": "lowest"}, ValueError, "strategy"),
        ({"uncond_logits": "shape"}, ValueError, "uncond_logits"),
    ],
)
def test_bad_inputs_name_the_argument(device, kwargs, exc, name):
    B, L, W, V = 2, 12, 4, 40
    args = {
        "logits": torch.randn(B, W, V).to(device),
        "x": torch.full((B, L), 3).to(device),
        "num_transfer": 1,
        "mask_id": 3,
        "offset": 0,
    }
    special = {
        "f64": lambda: args["logits"].double(),
        "2d": lambda: args["logits"][0],
        "int32": lambda: args["x"].int(),
        "rows": lambda: args["x"][:1],
        "float_tensor": lambda: torch.ones(B).to(device),
        "wrong_shape": lambda: torch.ones(B + 1, dtype=torch.int64).to(device),
        "shape": lambda: torch.randn(B, W + 1, V).to(device),
    }
    for key, val in kwargs.items():
        args[key] = special[val]() if isinstance(val, str) and val in special else val
    logits, x, k = args.pop("logits"), args.pop("x"), args.pop("num_transfer")
    with pytest.raises(exc, match=name):
        lx.remask(logits, x, k, **args)


@pytest.mark.parametrize("mask_id", [40, -1])  # the vocabulary size itself, and a negative id
def test_mask_id_need_not_be_a_class(device, mask_id):
    """mask_id is a token id of x: it need not be a class of the logits."""
    B, L, W, V, offset = 2, 12, 8, 40, 2
    logits = torch.randn(B, W, V)
    x = torch.randint(0, V, (B, L))
    x[:, offset : offset + 6] = mask_id
    out, x0, conf = lx.remask(
        logits.to(device), x.to(device), 3, mask_id=mask_id, offset=offset, return_details=True
    )
    out, x0, conf = out.cpu(), x0.cpu(), conf.cpu()
    cand = x[:, offset : offset + W] == mask_id
    assert torch.equal(x0[cand], logits.argmax(-1)[cand])
    assert torch.isneginf(conf[~cand]).all() and torch.isfinite(conf[cand]).all()
    assert ((out == mask_id).sum(1) == cand.sum(1) - 3).all()


def test_inplace_on_rows_sharing_memory_is_refused(device):
    """remask_ on an expanded x (rows that share memory) would fill every row's masks at
    once: a ValueError naming x, and x unchanged."""
    x = torch.full((1, 6), 5).expand(3, 6).to(device)
    if device == "cuda":
        x = x[:1].expand(3, 6)
    before = x.clone()
    with pytest.raises(ValueError, match="x: several of its elements share memory"):
        lx.remask_(torch.randn(3, 4, 9).to(device), x, 1, mask_id=5)
    assert torch.equal(x, before)


def test_empty_non_contiguous_inputs_give_empty_results(device):
    logits = torch.empty(0, 8, 9, device=device)[:, ::2]
    x = torch.empty(0, 12, dtype=torch.int64, device=device)[:, ::2]
    out, x0, conf = lx.remask(logits, x, 1, mask_id=5, return_details=True)
    assert out.shape == (0, 6) and x0.shape == (0, 4) and conf.shape == (0, 4)


@pytest.mark.parametrize("k", [2**63, 2**200])
def test_huge_num_transfer_means_every_candidate(device, k):
    """An int beyond int64 is not an error: it unmasks every candidate, like k = W."""
    logits = torch.randn(3, 4, 9).to(device)
    x = torch.full((3, 6), 9).to(device)  # mask id 9 = V: no prediction equals it
    expect = lx.remask(logits, x, 4, mask_id=9, offset=1)
    assert torch.equal(lx.remask(logits, x, k, mask_id=9, offset=1), expect)
    assert (expect[:, 1:5] != 9).all() and (expect[:, [0, 5]] == 9).all()
