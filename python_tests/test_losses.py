"""Tests of the training objectives (Alg. 1 pre-training, Alg. 2 SFT) and the LR schedule.

The reference is a plain float64 PyTorch computation written here: full logits of a float64
copy of the model, cross-entropy per position, summed over the masked positions with the
factors of the paper.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import llada_ext  # noqa: F401  (loads the kernels)
from llada_ext.model import LLaDAConfig, LLaDAModel
from llada_ext.training.losses import (
    EPS,
    MaskedLMObjective,
    MaskNoise,
    build_pretrain_batch,
    build_sft_batch,
    cut_length,
    draw_noise,
    keyed_noise,
    masked_token_loss,
    pretrain_loss,
    sft_loss,
)
from llada_ext.training.schedule import make_wsd_scheduler, wsd_factor

MASK = 33


# one torch thread per test (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def small_config() -> LLaDAConfig:
    # Odd vocabulary, GQA, head_dim 16: small enough for float64 references on a CPU.
    return LLaDAConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        mlp_hidden_size=48,
        vocab_size=37,
        max_sequence_length=64,
        rope_theta=10000.0,
        mask_token_id=MASK,
        eos_token_id=34,
        bos_token_id=35,
        pad_token_id=34,
        eot_token_id=36,
    )


def make_model(backend: str = "torch", seed: int = 0) -> LLaDAModel:
    torch.manual_seed(seed)
    model = LLaDAModel(small_config(), backend=backend)
    # Larger weights than the default init so the logits are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


def ref_logits64(model: LLaDAModel, noisy: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(model).double()
    m.backend = "torch"
    return m(noisy).logits


def ref_ce64(model, ids, masked) -> torch.Tensor:
    """float64 cross-entropy ``[B, L]`` of every position, ``masked`` replaced by the mask."""
    B, L = ids.shape
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    return F.cross_entropy(
        ref_logits64(model, noisy).reshape(B * L, -1), ids.reshape(-1), reduction="none"
    ).reshape(B, L)


def ref_pretrain(model, ids, noise, eps=EPS) -> torch.Tensor:
    """sum_masked CE / p_mask / (B * L), float64, straight from Alg. 1."""
    B, L = ids.shape
    p = (1 - eps) * noise.t.double() + eps
    masked = noise.u.double() < p[:, None]
    ce = ref_ce64(model, ids, masked)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            if masked[b, i]:
                total += ce[b, i] / p[b]
    return total / (B * L)


def ref_sft(model, ids, plen, noise, eps=EPS) -> torch.Tensor:
    """sum_masked CE / p_mask / answer_len / B, float64, straight from Alg. 2."""
    B, L = ids.shape
    p = (1 - eps) * noise.t.double() + eps
    masked = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for i in range(int(plen[b]), L):
            masked[b, i] = bool(noise.u[b, i].double() < p[b])
    ce = ref_ce64(model, ids, masked)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        ans = L - int(plen[b])
        for i in range(L):
            if masked[b, i]:
                total += ce[b, i] / p[b] / ans
    return total / B


def random_ids(B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 33, (B, L), generator=g)  # never the mask id


BACKENDS = ["torch", "kernels"]


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_pretrain_loss_matches_float64_reference(backend: str) -> None:
    model = make_model(backend)
    ids = random_ids(3, 13, seed=1)
    noise = draw_noise(3, 13, generator=torch.Generator().manual_seed(2))
    got = pretrain_loss(model, ids, noise=noise, random_length_prob=0.0)
    want = ref_pretrain(model, ids, noise)
    assert got.dtype == torch.float32
    assert want > 0
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_loss_matches_float64_reference(backend: str) -> None:
    model = make_model(backend)
    ids = random_ids(4, 11, seed=3)
    plen = torch.tensor([3, 5, 1, 7])
    noise = draw_noise(4, 11, generator=torch.Generator().manual_seed(4))
    got = sft_loss(model, ids, plen, noise=noise)
    want = ref_sft(model, ids, plen, noise)
    assert want > 0
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


def test_sft_prompt_never_masked_and_padding_trained() -> None:
    ids = random_ids(3, 16, seed=5)
    ids[:, 10:] = 34  # EOS padding of the answers
    plen = torch.tensor([4, 9, 15])
    # t = 1 everywhere: every answer token (padding included) must be masked.
    noise = MaskNoise(torch.ones(3), torch.rand(3, 16, generator=torch.Generator().manual_seed(6)))
    mb = build_sft_batch(ids, plen, mask_id=MASK, noise=noise)
    for b in range(3):
        assert torch.equal(mb.noisy[b, : plen[b]], ids[b, : plen[b]])
        assert not mb.masked[b, : plen[b]].any()
        assert mb.masked[b, plen[b] :].all()
        expect = 1.0 / (1.0 * (16 - int(plen[b])) * 3)
        torch.testing.assert_close(
            mb.weights[b, plen[b] :], torch.full((16 - int(plen[b]),), expect)
        )
    assert (mb.weights[~mb.masked] == 0).all()


def test_pretrain_weights_and_mask_rate() -> None:
    B, L = 5, 4001
    ids = torch.randint(0, 33, (B, L))
    noise = draw_noise(B, L, generator=torch.Generator().manual_seed(7))
    mb = build_pretrain_batch(ids, mask_id=MASK, noise=noise)
    p = (1 - EPS) * noise.t + EPS
    assert ((noise.t > 0) & (noise.t <= 1)).all()
    rate = mb.masked.float().mean(1)
    # Binomial(L, p) frequency: 5 standard deviations of slack.
    assert (rate - p).abs().max() < 5 * math.sqrt(0.25 / L)
    assert torch.equal(mb.noisy[mb.masked], torch.full_like(ids[mb.masked], MASK))
    assert torch.equal(mb.noisy[~mb.masked], ids[~mb.masked])
    want = mb.masked.double() / (p.double()[:, None] * B * L)
    torch.testing.assert_close(mb.weights.double(), want, rtol=1e-6, atol=0)


def test_random_length_cut_uses_cut_length_in_the_denominator() -> None:
    model = make_model("torch")
    ids = random_ids(2, 17, seed=8)
    noise = draw_noise(2, 17, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(10)
    got = pretrain_loss(model, ids, noise=noise, random_length_prob=1.0, generator=g)
    # Replay the generator to learn the cut length.
    new_len = cut_length(17, prob=1.0, generator=torch.Generator().manual_seed(10))
    assert 1 <= new_len < 17
    want = ref_pretrain(model, ids[:, :new_len], noise.narrow(new_len))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


def test_cut_length_probability_and_range() -> None:
    g = torch.Generator().manual_seed(11)
    draws = [cut_length(9, prob=0.3, generator=g) for _ in range(4000)]
    cut = [d for d in draws if d != 9]
    frac = sum(d != 9 for d in draws) / len(draws)
    # P(cut and the draw is not 9 itself) = 0.3 * 8 / 9.
    assert abs(frac - 0.3 * 8 / 9) < 0.03
    assert set(cut) == set(range(1, 9))
    assert all(cut_length(9, prob=0.0, generator=g) == 9 for _ in range(100))


def test_keyed_noise_depends_only_on_the_key() -> None:
    a = keyed_noise([5, 9, 2], 12, seed=3)
    b = keyed_noise([2, 7, 5], 12, seed=3)
    torch.testing.assert_close(a.u[0], b.u[2])
    torch.testing.assert_close(a.u[2], b.u[0])
    torch.testing.assert_close(a.t[0], b.t[2])
    assert not torch.equal(a.u[1], b.u[1])
    assert not torch.equal(keyed_noise([5], 12, seed=4).u[0], a.u[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    model = make_model(backend)
    big = random_ids(3, 26, seed=12)
    ids = big[:, ::2]  # [3, 13], stride 2
    assert not ids.is_contiguous()
    noise_u = torch.rand(13, 3, generator=torch.Generator().manual_seed(13)).t()
    noise = MaskNoise(torch.tensor([0.3, 0.7, 0.05]), noise_u)
    got = pretrain_loss(model, ids, noise=noise, random_length_prob=0.0)
    want = ref_pretrain(model, ids.contiguous(), MaskNoise(noise.t, noise_u.contiguous()))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


def test_kernel_and_torch_paths_give_the_same_gradients() -> None:
    ids = random_ids(3, 15, seed=14)
    plen = torch.tensor([2, 6, 4])
    noise = draw_noise(3, 15, generator=torch.Generator().manual_seed(15))
    grads = {}
    for backend in BACKENDS:
        model = make_model(backend)
        loss = MaskedLMObjective(model)(*_sft_args(ids, plen, noise))
        loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # float64 reference gradients
    model64 = make_model("torch").double()
    mb = build_sft_batch(ids, plen, mask_id=MASK, noise=noise)
    logits = model64(mb.noisy).logits
    ce = F.cross_entropy(logits.reshape(-1, 37), ids.reshape(-1), reduction="none")
    (ce * mb.weights.double().reshape(-1)).sum().backward()
    for n, p in model64.named_parameters():
        ref = p.grad
        scale = ref.abs().max().item() + 1e-12
        for backend in BACKENDS:
            err = (grads[backend][n].double() - ref).abs().max().item()
            assert err <= 1e-4 * scale + 1e-7, (backend, n, err, scale)


def _sft_args(ids, plen, noise):
    mb = build_sft_batch(ids, plen, mask_id=MASK, noise=noise)
    return mb.noisy, mb.targets, mb.weights


def test_masked_token_loss_skips_unweighted_rows() -> None:
    model = make_model("torch")
    ids = random_ids(2, 9, seed=16)
    w = torch.zeros(2, 9)
    assert masked_token_loss(model, ids, ids, w).item() == 0.0
    w[1, 4] = 0.5
    logits = ref_logits64(model, ids)
    want = 0.5 * F.cross_entropy(logits[1, 4][None], ids[1, 4][None])
    torch.testing.assert_close(
        masked_token_loss(model, ids, ids, w).double(), want, rtol=1e-5, atol=1e-7
    )


def test_bad_inputs_raise_clear_errors() -> None:
    model = make_model("torch")
    with pytest.raises(ValueError, match="input_ids"):
        pretrain_loss(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        pretrain_loss(model, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="noise"):
        pretrain_loss(model, random_ids(2, 5, 0), noise=draw_noise(2, 6), random_length_prob=0.0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        sft_loss(model, random_ids(2, 5, 0), torch.tensor([1, 2, 3]))


# --------------------------------------------------------------------------------------------
def test_wsd_schedule_shape() -> None:
    kw = dict(total_steps=100, warmup_steps=10, decay_steps=20, min_ratio=0.1)
    f = [wsd_factor(s, **kw) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # warmup rises
    assert all(x == 1.0 for x in f[10:80])  # stable
    assert all(a > b for a, b in zip(f[80:99], f[81:100]))  # decay falls
    assert f[99] == pytest.approx(0.1)
    for shape in ("cosine", "sqrt"):
        assert wsd_factor(99, shape=shape, **kw) == pytest.approx(0.1)
        assert 0.1 < wsd_factor(90, shape=shape, **kw) < 1.0
    with pytest.raises(ValueError):
        wsd_factor(0, total_steps=10, warmup_steps=1, decay_steps=1, shape="bogus")


def test_wsd_scheduler_drives_the_optimizer_and_round_trips() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.5)
    sch = make_wsd_scheduler(opt, total_steps=7, warmup_steps=2, decay_steps=3, min_ratio=0.2)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    want = [
        0.5 * wsd_factor(s, total_steps=7, warmup_steps=2, decay_steps=3, min_ratio=0.2)
        for s in range(7)
    ]
    assert lrs == pytest.approx(want)
    state = sch.state_dict()
    opt2 = torch.optim.AdamW([p], lr=0.5)
    sch2 = make_wsd_scheduler(opt2, total_steps=7, warmup_steps=2, decay_steps=3, min_ratio=0.2)
    sch2.load_state_dict(state)
    assert sch2.last_epoch == sch.last_epoch
