"""CUDA masked cross-entropy and remask kernels.

Every test here needs a GPU and a CUDA build of the kernels and is skipped otherwise. The
references are plain float64 PyTorch written below; the remask kernels are also held to
bitwise agreement with the CPU twin (same seed, same float32 logits -> same x and x0).
"""

from __future__ import annotations

import pytest
import torch

import llada_ext as lx
from llada_ext import _C
from llada_ext._views import stream_of, view

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and lx.has_cuda_kernels()),
    reason="needs a CUDA device and a CUDA build of the kernels",
)

CUDA = "cuda"
LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------


def ref_masked_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """Per-row loss and d(loss)/d(logits) with unit upstream gradient, in float64."""
    lf = logits.double()
    lse = torch.logsumexp(lf, dim=-1)
    tgt = lf.gather(-1, targets.clamp(0, lf.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    w = weights.double()
    loss = torch.where(w != 0, w * (lse - tgt), torch.zeros_like(w))
    onehot = torch.nn.functional.one_hot(targets.clamp(0, lf.shape[-1] - 1), lf.shape[-1])
    grad = w.unsqueeze(-1) * (torch.softmax(lf, dim=-1) - onehot.double())
    grad = torch.where((w != 0).unsqueeze(-1), grad, torch.zeros_like(grad))
    return loss, grad


def ref_confidence(logits: torch.Tensor, x0: torch.Tensor, strategy: str) -> torch.Tensor:
    """Confidence of every window position in float64 (strategies except "random")."""
    p = torch.softmax(logits.double(), dim=-1)
    if strategy == "low_confidence":
        return p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    if strategy == "margin":
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if strategy == "entropy":
        return (p * torch.log(p.clamp_min(1e-300))).sum(-1)
    raise ValueError(strategy)


def ref_select(x, x0, conf, cand, num_transfer, offset, threshold):
    """x with the selected candidates of each row replaced by x0 (ranking of the given conf:
    higher first, then lower position)."""
    out = x.clone()
    B, W = conf.shape
    for b in range(B):
        idx = [j for j in range(W) if cand[b, j]]
        idx.sort(key=lambda j: (-float(conf[b, j]), j))
        k = min(int(num_transfer[b]), len(idx))
        chosen = set(idx[:k])
        if threshold is not None:
            chosen |= {j for j in idx if float(conf[b, j]) > threshold}
        for j in chosen:
            out[b, offset + j] = x0[b, j]
    return out


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def strided_rows(base: torch.Tensor, V: int, col0: int = 0) -> torch.Tensor:
    """A non-contiguous [..., V] view: every other row of a padded pitch, from column col0
    (col0 = 1 misaligns the rows for 16-byte loads)."""
    return base[..., ::2, col0 : col0 + V]


def make_remask_case(B, L, W, V, offset, mask_id, dtype, seed, noncontig, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 2 * W, V + 8, generator=g) * 3.0
    logits_cpu = strided_rows(base, V)
    logits_cpu = logits_cpu if noncontig else logits_cpu.contiguous()
    x = torch.randint(0, V, (B, L), generator=g)
    x[x == mask_id] = (mask_id + 1) % V
    masked = torch.rand(B, L, generator=g) < 0.6
    x[masked] = mask_id
    logits_cpu = logits_cpu.to(dtype)
    if noncontig:
        base_dev = base.to(dtype).to(device)
        logits_dev = strided_rows(base_dev, V)
    else:
        logits_dev = logits_cpu.to(device)
    return logits_cpu, logits_dev, x


def remask_both(logits_cpu, logits_dev, x, num_transfer, seed, uncond=None, **kw):
    """Runs lx.remask on the CPU and on CUDA with generators of the same seed."""
    gc = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=CUDA).manual_seed(seed)
    nt_c = num_transfer if isinstance(num_transfer, int) else num_transfer.clone()
    nt_d = num_transfer if isinstance(num_transfer, int) else num_transfer.to(CUDA)
    unc_c, unc_d = (None, None) if uncond is None else uncond
    xc = x.clone()
    xd = x.to(CUDA)
    rc = lx.remask(
        logits_cpu, xc, nt_c, generator=gc, uncond_logits=unc_c, return_details=True, **kw
    )
    rd = lx.remask(
        logits_dev, xd, nt_d, generator=gd, uncond_logits=unc_d, return_details=True, **kw
    )
    assert torch.equal(xc, x) and torch.equal(xd.cpu(), x), "remask must not modify x"
    return rc, tuple(t.cpu() for t in rd)


def assert_conf_close(conf_cpu, conf_dev, strategy):
    neg_c = torch.isneginf(conf_cpu)
    assert torch.equal(neg_c, torch.isneginf(conf_dev))
    if strategy == "random":  # the same double-precision Philox draw, rounded once
        assert torch.equal(conf_cpu, conf_dev)
    else:
        torch.testing.assert_close(conf_dev[~neg_c], conf_cpu[~neg_c], rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------
# remask: CUDA == CPU
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["low_confidence", "random", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("V", [1001, 1024])  # scalar path / 16-byte vector path
def test_remask_matches_cpu(strategy, temperature, V):
    B, L, W, offset, mask_id = 3, 45, 19, 11, 7
    logits_cpu, logits_dev, x = make_remask_case(
        B,
        L,
        W,
        V,
        offset,
        mask_id,
        torch.float32,
        seed=V + int(temperature * 10),
        noncontig=V == 1024,
    )
    nt = torch.tensor([4, 0, 50])  # some, none, more than there are candidates
    (xc, x0c, cc), (xd, x0d, cd) = remask_both(
        logits_cpu,
        logits_dev,
        x,
        nt,
        seed=1234,
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
    # the selection is exactly the ranking of the kernel's own confidences
    assert torch.equal(xd, ref_select(x, x0d, cd, cand, nt, offset, None))


@pytest.mark.parametrize("temperature", [0.0, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [515, 512])
def test_remask_cfg_threshold_matches_cpu(temperature, dtype, V):
    B, L, W, offset, mask_id = 2, 64, 32, 32, 3  # a later block window
    logits_cpu, logits_dev, x = make_remask_case(
        B, L, W, V, offset, mask_id, dtype, seed=5, noncontig=False
    )
    g = torch.Generator().manual_seed(6)
    unc_cpu = (torch.randn(B, W, V, generator=g) * 3.0).to(dtype)
    threshold = 0.05
    (xc, x0c, cc), (xd, x0d, cd) = remask_both(
        logits_cpu,
        logits_dev,
        x,
        2,
        seed=99,
        uncond=(unc_cpu, unc_cpu.to(CUDA)),
        mask_id=mask_id,
        offset=offset,
        temperature=temperature,
        threshold=threshold,
        cfg_scale=1.5,
    )
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)
    assert_conf_close(cc, cd, "low_confidence")
    cand = x[:, offset : offset + W] == mask_id
    assert torch.equal(xd, ref_select(x, x0d, cd, cand, torch.tensor([2, 2]), offset, threshold))


def test_remask_float64_reference():
    """CUDA alone against float64 torch: argmax, the CFG combine and every confidence."""
    B, L, W, V, offset, mask_id = 2, 40, 40, 777, 0, 11
    logits_cpu, logits_dev, x = make_remask_case(
        B, L, W, V, offset, mask_id, torch.float32, seed=21, noncontig=True
    )
    g = torch.Generator().manual_seed(22)
    unc = torch.randn(B, W, V, generator=g) * 2.0
    cfg = 0.8
    comb = unc.double() + (cfg + 1.0) * (logits_cpu.double() - unc.double())
    cand = x[:, offset : offset + W] == mask_id
    ref_x0 = torch.where(cand, comb.argmax(-1), x[:, offset : offset + W])
    for strategy in ("low_confidence", "margin", "entropy"):
        _, x0, conf = lx.remask(
            logits_dev,
            x.to(CUDA),
            5,
            mask_id=mask_id,
            offset=offset,
            strategy=strategy,
            uncond_logits=unc.to(CUDA),
            cfg_scale=cfg,
            return_details=True,
        )
        x0, conf = x0.cpu(), conf.cpu()
        assert torch.equal(x0, ref_x0)
        ref = ref_confidence(comb, ref_x0, strategy)
        torch.testing.assert_close(conf[cand].double(), ref[cand], rtol=1e-4, atol=1e-6)
        assert torch.isneginf(conf[~cand]).all()


def test_remask_gumbel_frequencies():
    """Gumbel-argmax samples follow softmax(l / T): histogram cosine similarity > 0.99 and
    a token of probability 0 (-inf logit) is never drawn."""
    V, T = 10, 0.8
    row = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 1.5
    row[4] = float("-inf")
    B, W = 16, 256
    logits = row.expand(B, W, V).contiguous().to(CUDA)
    x = torch.full((B, W), 0, dtype=torch.int64, device=CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(7)
    _, x0, _ = lx.remask(logits, x, 0, mask_id=0, temperature=T, generator=gen, return_details=True)
    counts = torch.bincount(x0.flatten().cpu(), minlength=V).double()
    probs = torch.softmax(row.double() / T, dim=0)
    cos = torch.nn.functional.cosine_similarity(counts, probs, dim=0)
    assert cos > 0.99, float(cos)
    assert counts[4] == 0


@pytest.mark.parametrize("W,V", [(1500, 40), (7000, 8)])  # several j per thread; large smem
def test_remask_wide_window_matches_cpu(W, V):
    B, mask_id = 2, 1
    logits_cpu, logits_dev, x = make_remask_case(
        B, W + 3, W, V, 3, mask_id, torch.float32, seed=W, noncontig=False
    )
    nt = torch.tensor([W // 3, 17])
    (xc, x0c, cc), (xd, x0d, cd) = remask_both(
        logits_cpu,
        logits_dev,
        x,
        nt,
        seed=5,
        mask_id=mask_id,
        offset=3,
        strategy="low_confidence",
    )
    assert torch.equal(x0c, x0d)
    assert torch.equal(xc, xd)
    assert_conf_close(cc, cd, "low_confidence")


def test_remask_ties_lower_position_first():
    """Identical rows give identical confidences: the lower positions are taken first."""
    B, W, V, mask_id = 1, 50, 64, 0
    row = torch.randn(V, device=CUDA)
    logits = row.expand(B, W, V).contiguous()
    x = torch.full((B, W), mask_id, dtype=torch.int64, device=CUDA)
    out = lx.remask(logits, x, 7, mask_id=mask_id)
    taken = (out != mask_id).nonzero()[:, 1].cpu()
    assert taken.tolist() == list(range(7))


def test_remask_inplace_matches_out_of_place():
    B, L, W, V, offset, mask_id = 4, 30, 30, 300, 0, 2
    _, logits_dev, x = make_remask_case(
        B, L, W, V, offset, mask_id, torch.float16, seed=8, noncontig=False
    )
    xd = x.to(CUDA)
    expect = lx.remask(logits_dev, xd, 6, mask_id=mask_id, strategy="margin")
    xi = xd.clone()
    got = lx.remask_(logits_dev, xi, 6, mask_id=mask_id, strategy="margin")
    assert got.data_ptr() == xi.data_ptr()
    assert torch.equal(xi, expect)


def test_remask_cuda_graph_replay():
    """A remask step captured in a CUDA graph, replayed on new logits, equals eager calls."""
    B, L, W, V, offset, mask_id = 2, 48, 16, 1024, 16, 5
    _, logits0, x = make_remask_case(
        B, L, W, V, offset, mask_id, torch.bfloat16, seed=11, noncontig=False
    )
    static_logits = logits0.clone()
    static_x = x.to(CUDA)
    nt = torch.tensor([3, 5], device=CUDA)
    kw = dict(mask_id=mask_id, offset=offset, strategy="low_confidence", threshold=0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        lx.remask(static_logits, static_x, nt, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = lx.remask(static_logits, static_x, nt, **kw)
    for trial in range(3):
        fresh = (torch.randn(B, W, V, device=CUDA) * (2.0 + trial)).to(torch.bfloat16)
        static_logits.copy_(fresh)
        graph.replay()
        eager = lx.remask(fresh, static_x, nt, **kw)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        assert (static_out != static_x).any()


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


def ce_case(N, V, dtype, noncontig, seed, col0=0, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2 * N, V + 8, generator=g) * 2.5
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g) * 3.0 + 0.1
    weights[torch.rand(N, generator=g) < 0.5] = 0.0
    base = base.to(dtype).to(device)
    logits = strided_rows(base, V, col0) if noncontig else base[:N, :V].contiguous()
    return logits, targets.to(device), weights.to(device)


def tol_bound(kernel_err, torch_err, factor, floor):
    return kernel_err <= max(factor * torch_err, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "V,noncontig,col0",
    [(1000, False, 0), (1001, True, 0), (2048, True, 0), (1024, True, 1)],
    ids=["vec", "scalar-odd-V", "vec-strided", "scalar-misaligned"],
)
def test_masked_ce_matches_float64(dtype, V, noncontig, col0):
    N = 67
    logits, targets, weights = ce_case(N, V, dtype, noncontig, seed=V, col0=col0)
    logits = logits.detach().requires_grad_(True)
    upstream = torch.rand(N, device=CUDA) + 0.5
    loss = lx.masked_cross_entropy(logits, targets, weights, reduction="none")
    loss.backward(upstream)
    ref_loss, ref_grad = ref_masked_ce(logits.detach(), targets, weights)
    ref_grad = ref_grad * upstream.double().unsqueeze(-1)

    loss_err = (loss.double() - ref_loss).abs().max().item()
    grad_err = (logits.grad.double() - ref_grad).abs().max().item()
    if dtype == torch.float32:
        assert loss_err <= 1e-4 * max(1.0, ref_loss.abs().max().item())
        assert grad_err <= 1e-5 * max(1.0, ref_grad.abs().max().item())
    else:
        # plain torch in the same low precision, against the same float64 reference
        lt = logits.detach().clone().requires_grad_(True)
        tl = torch.nn.functional.cross_entropy(lt, targets, reduction="none") * weights.to(dtype)
        tl.backward(upstream.to(dtype))
        t_loss_err = (tl.double() - ref_loss).abs().max().item()
        t_grad_err = (lt.grad.double() - ref_grad).abs().max().item()
        assert tol_bound(loss_err, t_loss_err, 2.0, 1e-4), (loss_err, t_loss_err)
        assert tol_bound(grad_err, t_grad_err, 3.0, 1e-5), (grad_err, t_grad_err)
    inactive = weights == 0
    assert (loss[inactive] == 0).all()
    assert (logits.grad[inactive] == 0).all()

    total = lx.masked_cross_entropy(logits.detach(), targets, weights)
    torch.testing.assert_close(total.double(), ref_loss.sum(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_ce_inplace_gradient(dtype):
    """grad_logits may be the logits buffer itself: same values as the out-of-place call."""
    N, V = 33, 1024
    logits, targets, weights = ce_case(N, V, dtype, noncontig=True, seed=3)
    loss = torch.empty(N, device=CUDA)
    lse = torch.empty(N, device=CUDA)
    s = stream_of(logits)
    _C.masked_ce_fwd(view(logits), view(targets), view(weights), view(loss), view(lse), s)
    grad_loss = torch.rand(N, device=CUDA) + 0.5
    out_of_place = torch.empty_like(logits)
    _C.masked_ce_bwd(
        view(logits),
        view(targets),
        view(weights),
        view(lse),
        view(grad_loss),
        view(out_of_place),
        s,
    )
    ref_loss, ref_grad = ref_masked_ce(logits, targets, weights)
    inplace = logits  # the very same storage and strides
    _C.masked_ce_bwd(
        view(logits), view(targets), view(weights), view(lse), view(grad_loss), view(inplace), s
    )
    assert torch.equal(inplace, out_of_place)
    ref_grad = (ref_grad * grad_loss.double().unsqueeze(-1)).to(dtype)
    torch.testing.assert_close(out_of_place, ref_grad, rtol=2e-2, atol=1e-5)


def test_masked_ce_broadcast_grad_loss():
    """grad_loss with stride 0 (a scalar upstream gradient) as reduction='sum' produces."""
    N, V = 20, 640
    logits, targets, weights = ce_case(N, V, torch.float32, noncontig=False, seed=4)
    logits.requires_grad_(True)
    lx.masked_cross_entropy(logits, targets, weights).mul(1.7).backward()
    _, ref_grad = ref_masked_ce(logits.detach(), targets, weights)
    torch.testing.assert_close(logits.grad.double(), 1.7 * ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_ce_weight_zero_rows_not_read(dtype):
    """NaN in rows of weight 0 never reaches the loss or the gradient."""
    N, V = 40, 1008
    logits, targets, weights = ce_case(N, V, dtype, noncontig=False, seed=9)
    inactive = weights == 0
    assert inactive.any() and (~inactive).any()
    logits[inactive] = float("nan")
    logits.requires_grad_(True)
    loss = lx.masked_cross_entropy(logits, targets, weights, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert (loss[inactive] == 0).all()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[inactive] == 0).all()
    ref_loss, _ = ref_masked_ce(logits.detach()[~inactive], targets[~inactive], weights[~inactive])
    torch.testing.assert_close(loss[~inactive].double(), ref_loss, rtol=2e-3, atol=2e-3)


def test_masked_ce_large_vocab_bf16():
    """The LLaDA vocabulary (126464) in bfloat16: many loop trips per thread."""
    N, V = 9, 126464
    logits, targets, weights = ce_case(N, V, torch.bfloat16, noncontig=False, seed=12)
    weights[0] = 1.0
    logits.requires_grad_(True)
    loss = lx.masked_cross_entropy(logits, targets, weights, reduction="none")
    loss.sum().backward()
    ref_loss, ref_grad = ref_masked_ce(logits.detach(), targets, weights)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [0, 7])
def test_linear_masked_ce_cuda(chunk_rows):
    """The fused LM head + masked loss on CUDA: value and both gradients vs float64."""
    N, d, V = 37, 48, 1000
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(N, d, generator=g)
    weight = torch.randn(V, d, generator=g) * 0.2
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g) + 0.5
    weights[torch.rand(N, generator=g) < 0.4] = 0.0
    h = hidden.to(CUDA).requires_grad_(True)
    w = weight.to(CUDA).requires_grad_(True)
    loss = lx.linear_masked_cross_entropy(
        h, w, targets.to(CUDA), weights.to(CUDA), chunk_rows=chunk_rows
    )
    loss.backward()
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    logits = h64 @ w64.T
    ref = (
        weights.double() * (torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None])[:, 0])
    ).sum()
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, rtol=1e-3, atol=1e-4)
