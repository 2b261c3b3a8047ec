"""CUDA masked cross-entropy and remask kernels run on the CPU executor (llada_ext.emu).

The same kernel sources as the GPU build, with every memory access and synchronisation checked
as they run (see csrc/emu). References and cases follow test_cuda_ce_remask.py: float64 PyTorch
for the losses and gradients; for the remask, exact agreement with the C++ CPU twin for the
same seed (x and x0 equal, confidences to float rounding).
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_ce_remask import (
    assert_conf_close,
    make_remask_case,
    ref_confidence,
    ref_masked_ce,
    ref_select,
    tol_bound,
)
from test_cuda_ce_remask import ce_case as cuda_ce_case

import llada_ext as lx
from llada_ext import emu

pytestmark = pytest.mark.skipif(not emu.available(), reason="built without the executor")

STRATEGIES = ["low_confidence", "random", "margin", "entropy"]


# ---- remask ------------------------------------------------------------------------------


def remask_case(B, L, W, V, mask_id, dtype, seed, noncontig):
    """(logits, x) of the CUDA test's case, on the host."""
    _, logits, x = make_remask_case(B, L, W, V, 0, mask_id, dtype, seed, noncontig, device="cpu")
    return logits, x


def remask_cpu_and_emu(logits, x, num_transfer, seed, uncond=None, **kw):
    """lx.remask on the CPU twin with a generator of `seed`, and the CUDA kernels on the
    executor with the Philox seed that generator gives."""
    cpu = lx.remask(
        logits,
        x,
        num_transfer,
        generator=torch.Generator().manual_seed(seed),
        uncond_logits=uncond,
        return_details=True,
        **kw,
    )
    philox = int(torch.randint(0, 1 << 62, (1,), generator=torch.Generator().manual_seed(seed)))
    nt = torch.full((x.shape[0],), num_transfer) if isinstance(num_transfer, int) else num_transfer
    x_before = x.clone()
    dev = emu.remask(logits, x, nt, seed=philox, uncond_logits=uncond, **kw)
    assert torch.equal(x, x_before), "remask must not modify x"
    return cpu, dev


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("V", [1001, 1024])  # scalar path / 16-byte vector path
def test_remask_matches_cpu(strategy, temperature, V):
    B, L, W, offset, mask_id = 3, 45, 19, 11, 7
    logits, x = remask_case(
        B, L, W, V, mask_id, torch.float32, V + int(temperature * 10), noncontig=V == 1024
    )
    nt = torch.tensor([4, 0, 50])  # some, none, more than there are candidates
    (xc, x0c, cc), (xd, x0d, cd) = remask_cpu_and_emu(
        logits,
        x,
        nt,
        1234,
        mask_id=mask_id,
        offset=offset,
        strategy=strategy,
        temperature=temperature,
    )
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)
    assert_conf_close(cc, cd, strategy)
    cand = x[:, offset : offset + W] == mask_id
    assert torch.equal(x0d[~cand], x[:, offset : offset + W][~cand])
    assert torch.equal(xd, ref_select(x, x0d, cd, cand, nt, offset, None))


@pytest.mark.parametrize("temperature", [0.0, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [515, 512])
def test_remask_cfg_threshold_matches_cpu(temperature, dtype, V):
    B, L, W, offset, mask_id = 2, 64, 32, 32, 3  # a later block window
    logits, x = remask_case(B, L, W, V, mask_id, dtype, 5, noncontig=False)
    unc = (torch.randn(B, W, V, generator=torch.Generator().manual_seed(6)) * 3.0).to(dtype)
    (xc, x0c, cc), (xd, x0d, cd) = remask_cpu_and_emu(
        logits,
        x,
        2,
        99,
        uncond=unc,
        mask_id=mask_id,
        offset=offset,
        temperature=temperature,
        threshold=0.05,
        cfg_scale=1.5,
    )
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)
    assert_conf_close(cc, cd, "low_confidence")
    cand = x[:, offset : offset + W] == mask_id
    assert torch.equal(xd, ref_select(x, x0d, cd, cand, torch.tensor([2, 2]), offset, 0.05))


# Slices per row of the CUDA row pass: until ~256 CTAs run, at least 8192 logits each
# (csrc/cuda/remask.cu); a slice's state is 40 bytes of workspace.
ROW_STATE_BYTES = 40


@pytest.mark.parametrize("strategy", ["low_confidence", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "V,dtype,splits",
    [(16411, torch.float32, 2), (24576, torch.bfloat16, 3)],  # scalar / vector path
)
def test_remask_split_vocabulary_matches_cpu(strategy, temperature, V, dtype, splits):
    """Few rows: each row's vocabulary is cut into slices that separate CTAs reduce, then a
    merge kernel combines them. x0 must stay bit-identical to the CPU twin, at temperature 0
    and with Gumbel noise (where the float pre-test discards most tokens)."""
    B, L, W, offset, mask_id = 1, 9, 2, 4, 5
    logits, x = remask_case(B, L, W, V, mask_id, dtype, V + splits, noncontig=False)
    x[:, offset : offset + W] = mask_id  # both rows are candidates
    x[0, 0] = mask_id  # outside the window: never touched
    ws = emu._load().remask_workspace_size(emu._view(logits), emu._view(x))
    assert ws == B * W * splits * ROW_STATE_BYTES
    unc = None
    if dtype == torch.bfloat16:  # CFG through the sliced path too
        unc = (torch.randn(B, W, V, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    (xc, x0c, cc), (xd, x0d, cd) = remask_cpu_and_emu(
        logits,
        x,
        1,
        77,
        uncond=unc,
        mask_id=mask_id,
        offset=offset,
        strategy=strategy,
        temperature=temperature,
        cfg_scale=0.5 if unc is not None else 0.0,
    )
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)
    assert_conf_close(cc, cd, strategy)


def test_remask_gumbel_near_uniform_rows_match_cpu():
    """Nearly equal logits at temperature 1: the Gumbel draws alone decide, so many tokens
    come within a hair of the best key, exactly where a float pre-test that skips too
    eagerly would drop the true winner."""
    B, W, V, mask_id = 4, 32, 4096, 1
    logits = torch.randn(B, W, V, generator=torch.Generator().manual_seed(8)) * 0.01
    x = torch.full((B, W), mask_id)
    (xc, x0c, cc), (xd, x0d, cd) = remask_cpu_and_emu(
        logits, x, 3, 2024, mask_id=mask_id, temperature=1.0
    )
    assert len(set(x0c.flatten().tolist())) > B * W // 2  # the noise, not the logits, decides
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)


def _unit_double(a: int, b: int) -> float:
    """philox_to_unit_double (csrc/common/philox.h) in Python."""
    bits = ((a >> 5) << 26) | (b >> 6)
    return min((bits + 0.5) * 2.0**-53, 1.0 - 2.0**-53)


def test_gumbel_pretest_never_skips_a_possible_winner():
    """The CUDA remask's float pre-test, tried right at its boundary: tokens whose uniform
    puts their Gumbel value within a hair of what winning needs. Every token it skips must
    lose to the best key (in exact double arithmetic, with room to spare), and it must skip
    the clear losers, or it would save nothing."""
    import math
    import random

    pretest = emu._load().remask_gumbel_pretest
    rng = random.Random(0)
    skipped = clear_losers = clear_skipped = 0
    for n in range(20000):
        temperature = rng.choice([0.25, 0.7, 1.0, 1.7])
        key = rng.uniform(-60.0, 60.0)
        gap = rng.uniform(-1.0, 40.0)
        l = float(torch.tensor((key - gap) * temperature, dtype=torch.float32))
        true_gap = key - l / temperature
        # 1 - u = exp(-gap) * (1 + delta): delta < 0 can win, delta > 0 cannot
        delta = rng.uniform(-0.2, 0.2) if n % 2 else rng.uniform(-2e-3, 2e-3)
        one_minus_u = min(max(math.exp(-true_gap) * (1 + delta), 2.0**-52), 1.0 - 2.0**-52)
        bits = int((1.0 - one_minus_u) * 2.0**53)
        a = ((bits >> 26) << 5) | rng.getrandbits(5)
        b = ((bits & ((1 << 26) - 1)) << 6) | rng.getrandbits(6)
        u = _unit_double(a, b)
        g = -math.log(-math.log(u))
        token_key = l / temperature + g
        if pretest(l, a, key, temperature):
            skipped += 1
            assert token_key < key - 5e-5, (key, l, temperature, u, token_key)
    assert skipped > 3000
    # typical tokens: a uniform u, a best key some way above; nearly all are skipped
    for _ in range(5000):
        temperature = rng.choice([0.25, 0.7, 1.0, 1.7])
        key = rng.uniform(-60.0, 60.0)
        l = float(torch.tensor((key - rng.uniform(1.0, 40.0)) * temperature, dtype=torch.float32))
        clear_losers += 1
        clear_skipped += pretest(l, rng.getrandbits(32), key, temperature)
    assert clear_skipped > 0.9 * clear_losers


def test_remask_float64_reference():
    """The kernels alone against float64 torch: argmax, the CFG combine, every confidence."""
    B, L, W, V, mask_id = 2, 40, 40, 777, 11
    logits, x = remask_case(B, L, W, V, mask_id, torch.float32, 21, noncontig=True)
    unc = torch.randn(B, W, V, generator=torch.Generator().manual_seed(22)) * 2.0
    cfg = 0.8
    comb = unc.double() + (cfg + 1.0) * (logits.double() - unc.double())
    cand = x[:, :W] == mask_id
    ref_x0 = torch.where(cand, comb.argmax(-1), x[:, :W])
    for strategy in ("low_confidence", "margin", "entropy"):
        _, x0, conf = emu.remask(
            logits,
            x,
            torch.full((B,), 5),
            mask_id=mask_id,
            strategy=strategy,
            uncond_logits=unc,
            cfg_scale=cfg,
        )
        assert torch.equal(x0, ref_x0)
        ref = ref_confidence(comb, ref_x0, strategy)
        torch.testing.assert_close(conf[cand].double(), ref[cand], rtol=1e-4, atol=1e-6)
        assert torch.isneginf(conf[~cand]).all()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_remask_nan_row_argmax_matches_cpu(temperature):
    """A row [NaN, -inf, ...] predicts 0 on every device (no logit can be drawn); NaN and
    -inf never win over a finite logit."""
    B, W, V = 1, 4, 64
    logits = torch.randn(B, W, V)
    logits[0, 0] = float("-inf")
    logits[0, 0, 0] = float("nan")
    logits[0, 1, :7] = float("nan")
    logits[0, 2, 5] = float("nan")
    logits[0, 3] = float("-inf")
    x = torch.zeros(B, W, dtype=torch.int64)
    (xc, x0c, cc), (xd, x0d, cd) = remask_cpu_and_emu(
        logits, x, 1, 0, mask_id=0, temperature=temperature
    )
    assert x0d[0, 0] == 0 and x0c[0, 0] == 0 and x0d[0, 3] == 0
    if temperature == 0.0:
        assert x0d[0, 1] == 7 + logits[0, 1, 7:].argmax() and x0d[0, 2] != 5
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)


def test_remask_gumbel_frequencies():
    """Gumbel-argmax samples follow softmax(l / T): histogram cosine similarity > 0.99, and
    a token of probability 0 (-inf logit) is never drawn."""
    V, T = 10, 0.8
    row = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 1.5
    row[4] = float("-inf")
    B, W = 4, 256
    logits = row.expand(B, W, V).contiguous()
    x = torch.zeros((B, W), dtype=torch.int64)
    _, x0, _ = emu.remask(
        logits, x, torch.zeros(B, dtype=torch.int64), mask_id=0, temperature=T, seed=7
    )
    counts = torch.bincount(x0.flatten(), minlength=V).double()
    probs = torch.softmax(row.double() / T, dim=0)
    assert torch.nn.functional.cosine_similarity(counts, probs, dim=0) > 0.99
    assert counts[4] == 0


# Several positions per thread; 6200 positions need > 48 KiB of shared memory for the keys.
@pytest.mark.parametrize("W,V,nt", [(700, 40, [233, 17]), (6200, 8, [9, 0])])
def test_remask_wide_window_matches_cpu(W, V, nt):
    B, mask_id = 2, 1
    logits, x = remask_case(B, W + 3, W, V, mask_id, torch.float32, W, noncontig=False)
    nt = torch.tensor(nt)
    (xc, x0c, cc), (xd, x0d, cd) = remask_cpu_and_emu(logits, x, nt, 5, mask_id=mask_id, offset=3)
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)
    assert_conf_close(cc, cd, "low_confidence")


def test_remask_ties_lower_position_first():
    """Identical rows give identical confidences: the lower positions are taken first."""
    B, W, V, mask_id = 1, 50, 64, 0
    logits = torch.randn(V).expand(B, W, V).contiguous()
    x = torch.full((B, W), mask_id, dtype=torch.int64)
    out, _, _ = emu.remask(logits, x, torch.tensor([7]), mask_id=mask_id)
    assert (out != mask_id).nonzero()[:, 1].tolist() == list(range(7))


def test_remask_inplace_matches_out_of_place():
    B, L, W, V, mask_id = 4, 30, 30, 300, 2
    logits, x = remask_case(B, L, W, V, mask_id, torch.float16, 8, noncontig=False)
    nt = torch.full((B,), 6)
    expect, _, _ = emu.remask(logits, x, nt, mask_id=mask_id, strategy="margin")
    xi = x.clone()
    got, _, _ = emu.remask(logits, xi, nt, mask_id=mask_id, strategy="margin", x_out=xi)
    assert got.data_ptr() == xi.data_ptr()
    assert torch.equal(xi, expect)


# ---- masked cross-entropy -------------------------------------------------------------------


def ce_case(N, V, dtype, noncontig, seed, col0=0):
    """The CUDA test's masked-CE case, on the host."""
    return cuda_ce_case(N, V, dtype, noncontig, seed, col0, device="cpu")


def ce_emu(logits, targets, weights, upstream):
    loss, lse = emu.masked_ce_fwd(logits, targets, weights)
    grad = emu.masked_ce_bwd(logits, targets, weights, lse, upstream)
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "V,noncontig,col0",
    [(1000, False, 0), (1001, True, 0), (2048, True, 0), (1024, True, 1)],
    ids=["vec", "scalar-odd-V", "vec-strided", "scalar-misaligned"],
)
def test_masked_ce_matches_float64(dtype, V, noncontig, col0):
    N = 67
    logits, targets, weights = ce_case(N, V, dtype, noncontig, seed=V, col0=col0)
    upstream = torch.rand(N) + 0.5
    loss, grad = ce_emu(logits, targets, weights, upstream)
    ref_loss, ref_grad = ref_masked_ce(logits, targets, weights)
    ref_grad = ref_grad * upstream.double().unsqueeze(-1)
    loss_err = (loss.double() - ref_loss).abs().max().item()
    grad_err = (grad.double() - ref_grad).abs().max().item()
    if dtype == torch.float32:
        assert loss_err <= 1e-4 * max(1.0, ref_loss.abs().max().item())
        assert grad_err <= 1e-5 * max(1.0, ref_grad.abs().max().item())
    else:
        lt = logits.detach().clone().requires_grad_(True)
        tl = torch.nn.functional.cross_entropy(lt, targets, reduction="none") * weights.to(dtype)
        tl.backward(upstream.to(dtype))
        t_loss_err = (tl.double() - ref_loss).abs().max().item()
        t_grad_err = (lt.grad.double() - ref_grad).abs().max().item()
        assert tol_bound(loss_err, t_loss_err, 2.0, 1e-4), (loss_err, t_loss_err)
        assert tol_bound(grad_err, t_grad_err, 3.0, 1e-5), (grad_err, t_grad_err)
    inactive = weights == 0
    assert (loss[inactive] == 0).all() and (grad[inactive] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_ce_inplace_gradient(dtype):
    """grad_logits may be the logits buffer itself: same values as the out-of-place call."""
    N, V = 33, 1024
    logits, targets, weights = ce_case(N, V, dtype, noncontig=True, seed=3)
    _, lse = emu.masked_ce_fwd(logits, targets, weights)
    grad_loss = torch.rand(N) + 0.5
    out_of_place = emu.masked_ce_bwd(logits, targets, weights, lse, grad_loss)
    ref_loss, ref_grad = ref_masked_ce(logits, targets, weights)
    inplace = emu.masked_ce_bwd(logits, targets, weights, lse, grad_loss, grad_logits=logits)
    assert inplace.data_ptr() == logits.data_ptr()
    assert torch.equal(inplace, out_of_place)
    ref_grad = (ref_grad * grad_loss.double().unsqueeze(-1)).to(dtype)
    torch.testing.assert_close(out_of_place, ref_grad, rtol=2e-2, atol=1e-5)


def test_masked_ce_broadcast_grad_loss():
    """grad_loss with stride 0 (a scalar upstream gradient), as reduction='sum' produces."""
    N, V = 20, 640
    logits, targets, weights = ce_case(N, V, torch.float32, noncontig=False, seed=4)
    _, grad = ce_emu(logits, targets, weights, torch.tensor(1.7).expand(N))
    _, ref_grad = ref_masked_ce(logits, targets, weights)
    torch.testing.assert_close(grad.double(), 1.7 * ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_ce_weight_zero_rows_not_read(dtype):
    """NaN in rows of weight 0 never reaches the loss or the gradient."""
    N, V = 40, 1008
    logits, targets, weights = ce_case(N, V, dtype, noncontig=False, seed=9)
    inactive = weights == 0
    assert inactive.any() and (~inactive).any()
    logits[inactive] = float("nan")
    loss, grad = ce_emu(logits, targets, weights, torch.ones(N))
    assert torch.isfinite(loss).all() and (loss[inactive] == 0).all()
    assert torch.isfinite(grad).all() and (grad[inactive] == 0).all()
    ref_loss, _ = ref_masked_ce(logits[~inactive], targets[~inactive], weights[~inactive])
    torch.testing.assert_close(loss[~inactive].double(), ref_loss, rtol=2e-3, atol=2e-3)


def test_masked_ce_target_out_of_range_is_nan():
    """A target outside [0, V) on an active row gives a NaN loss and a NaN gradient row."""
    N, V = 6, 200
    logits, targets, weights = ce_case(N, V, torch.float32, noncontig=False, seed=10)
    weights[:] = 1.0
    targets[2] = V
    targets[4] = -3
    loss, grad = ce_emu(logits, targets, weights, torch.ones(N))
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[2, 4]] = True
    assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all()
    assert torch.isnan(grad[bad]).all() and torch.isfinite(grad[~bad]).all()


def test_masked_ce_large_vocab_bf16():
    """The LLaDA vocabulary (126464) in bfloat16: many loop trips per thread."""
    N, V = 5, 126464
    logits, targets, weights = ce_case(N, V, torch.bfloat16, noncontig=False, seed=12)
    weights[0] = 1.0
    loss, grad = ce_emu(logits, targets, weights, torch.ones(N))
    ref_loss, ref_grad = ref_masked_ce(logits, targets, weights)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-6)


def test_remask_mask_id_outside_the_vocabulary_matches_cpu():
    """mask_id == V (not a class of the logits) on both devices."""
    B, L, W, V = 2, 20, 16, 300
    logits, x = remask_case(B, L, W, V, 0, torch.float32, 31, noncontig=False)
    x[torch.rand(B, L, generator=torch.Generator().manual_seed(32)) < 0.5] = V
    (xc, x0c, cc), (xd, x0d, cd) = remask_cpu_and_emu(logits, x, 4, 3, mask_id=V, offset=2)
    assert torch.equal(x0c, x0d) and torch.equal(xc, xd)
    assert ((x == V).sum() - (xd == V).sum()).item() == 8
