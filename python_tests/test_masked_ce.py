"""Masked cross-entropy (lx.masked_cross_entropy, lx.linear_masked_cross_entropy).

Every value and gradient is held against the float64 reference written below
(``weights * (logsumexp - gather)``, differentiated by float64 autograd). Low precision
follows the flash-attention rule: the kernel's error against float64 may be at most twice
the error of the same formula evaluated by plain PyTorch in that precision.
"""

from __future__ import annotations

import math

import pytest
import torch

import llada_ext as lx

# ---------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------


def ref_masked_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """Per-row loss ``w * (logsumexp(l) - l[t])`` in float64; rows of weight 0 give exactly 0
    (whatever their logits hold). Differentiable w.r.t. ``logits`` when it requires grad."""
    lf = logits if logits.dtype == torch.float64 else logits.double()
    w = weights.double()
    lse = torch.logsumexp(lf, dim=-1)
    tgt = lf.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(w != 0, w * (lse - tgt), torch.zeros_like(w))


def ref_loss_and_grad(logits, targets, weights, grad_out=None):
    """(loss [...], d(sum(grad_out * loss))/d(logits)) in float64 via autograd."""
    l64 = logits.detach().double().requires_grad_(True)
    loss = ref_masked_ce(l64, targets, weights)
    g = torch.ones_like(loss) if grad_out is None else grad_out.double()
    (loss * g).sum().backward()
    return loss.detach(), l64.grad


def make_case(lead, V, device, *, zero_frac=0.4, scale=3.0, dtype=torch.float32):
    """Random logits [*lead, V], targets and weights with about zero_frac rows of weight 0."""
    logits = (torch.randn(*lead, V, dtype=torch.float64) * scale).to(dtype).to(device)
    targets = torch.randint(0, V, lead).to(device)
    weights = torch.rand(lead) * 3 + 0.25
    weights[torch.rand(lead) < zero_frac] = 0
    return logits, targets, weights.to(device)


def kernel_loss_and_grad(logits, targets, weights, reduction="none", grad_out=None):
    leaf = logits.detach().clone().requires_grad_(True)
    loss = lx.masked_cross_entropy(leaf, targets, weights, reduction=reduction)
    g = torch.ones_like(loss) if grad_out is None else grad_out
    loss.backward(g)
    return loss.detach(), leaf.grad


# ---------------------------------------------------------------------------------------
# float32 values and gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lead,V",
    [((37,), 1001), ((1,), 5), ((3,), 20000), ((5, 7), 333), ((4,), 2 * 2048 + 3)],
)
def test_float32_matches_float64(device, lead, V):
    logits, targets, weights = make_case(lead, V, device)
    grad_out = (torch.rand(lead) + 0.5).to(device)  # a non-uniform upstream gradient
    loss, grad = kernel_loss_and_grad(logits, targets, weights, "none", grad_out)
    ref_loss, ref_grad = ref_loss_and_grad(
        logits.cpu(), targets.cpu(), weights.cpu(), grad_out.cpu()
    )
    assert loss.dtype == torch.float32 and loss.shape == lead
    assert grad.dtype == torch.float32 and grad.shape == logits.shape
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_uniform_weights_are_f_cross_entropy(device, reduction, ignore_index):
    """With weights of 1, masked_cross_entropy is F.cross_entropy: the same ignore_index
    rule (those rows are skipped: loss 0, gradient 0) and the same "mean" (the sum over the
    rows not ignored, divided by their number)."""
    logits, targets, _ = make_case((3, 7), 101, device)
    targets[0, :4] = ignore_index
    targets[2, 6] = ignore_index
    weights = torch.ones(targets.shape, device=device)
    x = logits.detach().clone().requires_grad_(True)
    loss = lx.masked_cross_entropy(
        x, targets, weights, reduction=reduction, ignore_index=ignore_index
    )
    loss.backward(torch.ones_like(loss))
    xr = logits.detach().double().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(
        xr.reshape(-1, 101), targets.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )
    ref = ref.reshape(3, 7) if reduction == "none" else ref
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    ignored = targets == ignore_index
    assert (x.grad[ignored] == 0).all()


def test_ignored_rows_are_not_read(device):
    """A row whose target is ignore_index is skipped like a row of weight 0: NaN in it never
    reaches the loss or the gradient, whatever its weight."""
    logits, targets, weights = make_case((4, 5), 64, device, zero_frac=0.0)
    targets[1, 2] = -100
    logits[1, 2] = float("nan")
    x = logits.detach().clone().requires_grad_(True)
    loss = lx.masked_cross_entropy(x, targets, weights, reduction="none")
    loss.sum().backward()
    assert loss[1, 2] == 0 and torch.isfinite(loss).all()
    assert (x.grad[1, 2] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("fused", [False, True])
def test_mean_with_every_row_skipped_is_zero(device, fused):
    """reduction="mean" over no active row is 0 (not 0/0), with a zero gradient."""
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    targets = torch.full((2, 3), -100, device=device)
    weights = torch.ones(2, 3, device=device)
    weights[0, 0] = 0.0
    if fused:
        w = torch.randn(11, 8, device=device, requires_grad=True)
        loss = lx.linear_masked_cross_entropy(x, w, targets, weights, reduction="mean")
    else:
        loss = lx.masked_cross_entropy(x, targets, weights, reduction="mean")
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_weighted_mean_divides_by_rows_not_skipped(device):
    """mean = (sum of weighted row losses) / (rows with weight != 0 and target not ignored),
    for the plain and the fused loss alike."""
    hidden = torch.randn(4, 6, 16, device=device)
    head = torch.randn(50, 16, device=device) * 0.3
    targets = torch.randint(0, 50, (4, 6), device=device)
    weights = torch.rand(4, 6, device=device) * 2 + 0.5
    weights[0] = 0.0
    targets[1, :3] = -100
    rows = ((weights != 0) & (targets != -100)).sum().item()
    none = lx.masked_cross_entropy(hidden @ head.T, targets, weights, reduction="none")
    mean = lx.masked_cross_entropy(hidden @ head.T, targets, weights, reduction="mean")
    fused = lx.linear_masked_cross_entropy(hidden, head, targets, weights, reduction="mean")
    torch.testing.assert_close(mean, none.sum() / rows)
    torch.testing.assert_close(fused, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(device, reduction):
    logits, targets, weights = make_case((2, 9), 257, device)
    loss, grad = kernel_loss_and_grad(logits, targets, weights, reduction)
    ref_loss, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu())
    if reduction == "sum":
        assert loss.shape == () and loss.dtype == torch.float32
        torch.testing.assert_close(loss.cpu().double(), ref_loss.sum(), rtol=2e-6, atol=1e-4)
    else:
        assert loss.shape == (2, 9)
        torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=2e-7)


def test_llada_vocabulary_few_rows(device):
    """V = 126464 (LLaDA) on a handful of rows: the row is split across threads."""
    logits, targets, weights = make_case((3,), 126464, device, zero_frac=0.0)
    weights[1] = 0
    loss, grad = kernel_loss_and_grad(logits, targets, weights)
    ref_loss, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu())
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=2e-6, atol=5e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-8)
    assert loss[1].item() == 0 and bool((grad[1] == 0).all())


def test_non_contiguous_logits(device):
    """Rows with a stride larger than V (a column slice), and permuted leading dims."""
    V = 517
    big = torch.randn(23, V + 40, dtype=torch.float64).float().to(device) * 2
    logits = big[:, 13 : 13 + V]
    assert logits.stride(0) == V + 40
    targets = torch.randint(0, V, (23,)).to(device)
    weights = (torch.rand(23) + 0.1).to(device)
    weights[::4] = 0
    loss, grad = kernel_loss_and_grad(logits, targets, weights)
    ref_loss, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu())
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=2e-7)

    base = torch.randn(6, 5, V).to(device)
    perm = base.transpose(0, 1)  # [5, 6, V], leading dims not contiguous
    t2 = torch.randint(0, V, (5, 6)).to(device)
    w2 = torch.rand(5, 6).to(device)
    loss2, grad2 = kernel_loss_and_grad(perm, t2, w2)
    ref_loss2, ref_grad2 = ref_loss_and_grad(perm.cpu(), t2.cpu(), w2.cpu())
    torch.testing.assert_close(loss2.cpu().double(), ref_loss2, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(grad2.cpu().double(), ref_grad2, rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_weight_rows_are_not_read(device, dtype):
    """NaN in every weight-0 row: the loss stays finite, those rows get exact zero gradients."""
    logits, targets, weights = make_case((41,), 300, device, dtype=dtype)
    weights[:3] = 0
    weights[-1] = 0
    zero = weights == 0
    logits[zero] = float("nan")
    targets[zero] = 0
    loss, grad = kernel_loss_and_grad(logits, targets, weights)
    assert bool(torch.isfinite(loss).all())
    assert bool((loss[zero] == 0).all())
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[zero] == 0).all())
    ref_loss = ref_masked_ce(logits.cpu(), targets.cpu(), weights.cpu())
    tol = 2e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=tol, atol=tol)
    total = lx.masked_cross_entropy(logits, targets, weights)
    assert bool(torch.isfinite(total))


def test_float32_gradient_is_the_float64_gradient(device):
    """Gradcheck-style: float32 kernel gradients against float64 autograd of the reference,
    on every element, under a random upstream gradient, plus a directional derivative."""
    logits, targets, weights = make_case((11,), 97, device, zero_frac=0.3, scale=1.5)
    grad_out = torch.randn(11).to(device)
    loss, grad = kernel_loss_and_grad(logits, targets, weights, "none", grad_out)
    _, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu(), grad_out.cpu())
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-7)
    # Central difference of the float64 reference along a random direction.
    d = torch.randn(logits.shape, dtype=torch.float64)
    eps = 1e-6
    l64 = logits.cpu().double()

    def f(z):
        return (ref_masked_ce(z, targets.cpu(), weights.cpu()) * grad_out.cpu().double()).sum()

    fd = (f(l64 + eps * d) - f(l64 - eps * d)) / (2 * eps)
    directional = (grad.cpu().double() * d).sum()
    torch.testing.assert_close(directional, fd, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# low precision: the flash-attention rule
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1000, 32003])
def test_low_precision_flash_rule(device, dtype, V):
    logits, targets, weights = make_case((24,), V, device, dtype=dtype, scale=4.0)
    loss, grad = kernel_loss_and_grad(logits, targets, weights)
    assert grad.dtype == dtype
    ref_loss, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu())

    # The same formula in plain PyTorch at this precision.
    plain = logits.detach().clone().requires_grad_(True)
    w = weights.to(dtype)
    tgt = plain.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    plain_loss = torch.where(w != 0, w * (torch.logsumexp(plain, -1) - tgt), torch.zeros_like(w))
    plain_loss.sum().backward()

    def err(a, b):
        return (a.cpu().double() - b).abs().max().item()

    assert err(loss, ref_loss) <= 2 * err(plain_loss.detach(), ref_loss) + 1e-6
    assert err(grad, ref_grad) <= 2 * err(plain.grad, ref_grad) + 1e-6


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of |x| in dtype (x float64), subnormals included."""
    info = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return torch.exp2(e - mant - 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradient_is_rounded_once(device, dtype):
    """The 16-bit gradient is computed in float32 and rounded to nearest once: within half
    an ulp of the float64 gradient (plus float32 noise)."""
    logits, targets, weights = make_case((9,), 3001, device, dtype=dtype)
    _, grad = kernel_loss_and_grad(logits, targets, weights)
    _, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu())
    err = (grad.cpu().double() - ref_grad).abs()
    bound = half_ulp(ref_grad, dtype) * 1.001 + ref_grad.abs() * 1e-6 + 1e-30
    assert bool((err <= bound).all()), float((err / bound).max())


# ---------------------------------------------------------------------------------------
# hostile inputs
# ---------------------------------------------------------------------------------------


def test_banned_tokens_minus_inf(device):
    logits, targets, weights = make_case((19,), 611, device, zero_frac=0.2)
    banned = torch.rand(19, 611) < 0.3
    banned[torch.arange(19), targets.cpu()] = False  # the targets stay allowed
    logits[banned.to(device)] = float("-inf")
    loss, grad = kernel_loss_and_grad(logits, targets, weights)
    ref_loss, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu())
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=2e-7)
    assert bool((grad.cpu()[banned] == 0).all())


def test_large_magnitudes(device):
    """Logits around 1e4: no overflow, relative accuracy of float32 arithmetic."""
    logits, targets, weights = make_case((13,), 1500, device, scale=1.0)
    logits = logits * 1e4
    logits[0, 7] = 1e4
    logits[1, :] = -1e4
    logits[1, 3] = 1e4
    targets[1] = 3
    loss, grad = kernel_loss_and_grad(logits, targets, weights)
    ref_loss, ref_grad = ref_loss_and_grad(logits.cpu(), targets.cpu(), weights.cpu())
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    # The loss is a difference of numbers of size ~3e4: a few float32 ulps of that.
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-6, atol=2e-2)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_all_minus_inf_but_one(device):
    V = 4099
    logits = torch.full((4, V), float("-inf")).to(device)
    hot = torch.tensor([0, V - 1, 2048, 17])
    logits[torch.arange(4), hot.to(device)] = torch.tensor([3.0, -2.0, 1e4, 0.0]).to(device)
    targets = hot.clone().to(device)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0]).to(device)
    loss, grad = kernel_loss_and_grad(logits, targets, weights)
    assert bool((loss == 0).all())
    assert bool((grad == 0).all())
    # A target on a -inf entry costs +inf, like the float64 reference.
    targets2 = (hot + 1).clamp(max=V - 2).to(device)
    loss2 = lx.masked_cross_entropy(logits, targets2, weights, reduction="none")
    ref2 = ref_masked_ce(logits.cpu(), targets2.cpu(), weights.cpu())
    assert bool(torch.isinf(ref2).all()) and bool(torch.equal(loss2.cpu().double(), ref2))


# ---------------------------------------------------------------------------------------
# fused LM head
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_matches_unfused(device, reduction):
    B, L, d, V = 3, 7, 24, 211
    hidden = torch.randn(B, L, d).to(device)
    weight = (torch.randn(V, d) * 0.3).to(device)
    targets = torch.randint(0, V, (B, L)).to(device)
    weights = torch.rand(B, L).to(device) + 0.2
    weights[0] = 0  # a whole sequence of weight 0
    weights[1, ::2] = 0

    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(True)
    fused = lx.linear_masked_cross_entropy(h1, w1, targets, weights, reduction=reduction)
    g = torch.ones_like(fused) if reduction == "sum" else torch.rand(B, L).to(device) + 0.5
    fused.backward(g)

    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    unfused = lx.masked_cross_entropy(h2 @ w2.t(), targets, weights, reduction=reduction)
    unfused.backward(g)

    assert fused.shape == unfused.shape and fused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert bool((h1.grad[0] == 0).all())

    # And both against float64 autograd.
    h3 = hidden.cpu().double().requires_grad_(True)
    w3 = weight.cpu().double().requires_grad_(True)
    ref = ref_masked_ce(h3 @ w3.t(), targets.cpu(), weights.cpu())
    ref = ref.sum() if reduction == "sum" else ref
    ref.backward(g.cpu().double())
    torch.testing.assert_close(fused.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1.grad.cpu().double(), h3.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w1.grad.cpu().double(), w3.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(device):
    logits = torch.randn(4, 10).to(device)
    t = torch.randint(0, 10, (4,)).to(device)
    w = torch.ones(4).to(device)
    with pytest.raises(TypeError, match="targets"):
        lx.masked_cross_entropy(logits, t.int(), w)
    with pytest.raises(TypeError, match="weights"):
        lx.masked_cross_entropy(logits, t, w.double())
    with pytest.raises(ValueError, match="targets"):
        lx.masked_cross_entropy(logits, t[:3], w)
    with pytest.raises(ValueError, match="targets"):
        lx.masked_cross_entropy(logits, torch.full((4,), 10).to(device), w)
    with pytest.raises(ValueError, match="reduction"):
        lx.masked_cross_entropy(logits, t, w, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        lx.masked_cross_entropy(logits, t, w, ignore_index=1.5)
    with pytest.raises(TypeError, match="logits"):
        lx.masked_cross_entropy(logits.double(), t, w)
    # Out-of-range targets on weight-0 rows are never looked at.
    w0 = torch.tensor([1.0, 0.0, 1.0, 0.0]).to(device)
    t0 = torch.tensor([1, -5, 2, 99]).to(device)
    out = lx.masked_cross_entropy(logits, t0, w0, reduction="none")
    assert out[1].item() == 0 and out[3].item() == 0


def test_linear_with_hidden_size_zero(device):
    """d = 0: every logit is 0, so each weighted row costs w * log V; gradients are empty."""
    hidden = torch.randn(2, 3, 0, device=device, requires_grad=True)
    head = torch.randn(7, 0, device=device, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), device=device)
    weights = torch.rand(2, 3, device=device) + 0.5
    loss = lx.linear_masked_cross_entropy(hidden, head, targets, weights)
    loss.backward()
    torch.testing.assert_close(loss, weights.sum() * math.log(7))
    assert hidden.grad.shape == hidden.shape and head.grad.shape == head.shape
