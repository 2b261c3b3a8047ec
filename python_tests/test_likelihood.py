"""Tests of lx.log_likelihood (Alg. 3): same draws as a float64 reference, and unbiasedness."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import llada_ext as lx
from llada_ext.likelihood import stratified_mask
from llada_ext.model import LLaDAConfig, LLaDAModel

CUDA = torch.cuda.is_available()


def tiny_model(backend="torch", seed=0, vocab=23, n_layers=2) -> LLaDAModel:
    torch.manual_seed(seed)
    cfg = LLaDAConfig(
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_size=40,
        vocab_size=vocab,
        max_sequence_length=64,
        rope_theta=10000.0,
        mask_token_id=vocab - 1,
        eos_token_id=vocab - 2,
        bos_token_id=vocab - 3,
        pad_token_id=vocab - 2,
        eot_token_id=None,
        initializer_range=0.3,
    )
    return LLaDAModel(cfg, backend=backend).eval()


def ref_draws(answer_len: int, batch: int, g: torch.Generator):
    """The documented draw order: one randint for k, then one randperm(L) per row."""
    k = int(torch.randint(1, answer_len + 1, (), generator=g))
    ls = []
    rows = []
    for j in range(batch):
        off = math.floor(j * answer_len / batch + 0.5)  # round half up
        ls.append((k - 1 + off) % answer_len + 1)
    for j in range(batch):
        perm = torch.randperm(answer_len, generator=g)
        rows.append(torch.tensor([bool(perm[i] < ls[j]) for i in range(answer_len)]))
    return torch.stack(rows), torch.tensor(ls)


@torch.no_grad()
def ref_log_likelihood(model, prompt, answer, mc_num, batch, cfg, seed) -> float:
    """float64 Alg. 3 with full logits: -mean_mc [ sum_masked CE / (l / L) ] / batch."""
    ref = LLaDAModel(model.config, backend="torch")
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, assign=True)
    mask_id = model.config.mask_token_id
    g = torch.Generator().manual_seed(seed)
    L, P = len(answer), len(prompt)
    seq = torch.cat([prompt, answer])[None].repeat(batch, 1)
    losses = []
    for _ in range(mc_num // batch):
        is_mask, ls = ref_draws(L, batch, g)
        noisy = seq.clone()
        noisy[:, P:][is_mask] = mask_id
        logits = ref(noisy).logits
        if cfg > 0:
            un = noisy.clone()
            un[:, :P] = mask_id
            u = ref(un).logits
            logits = u + (cfg + 1) * (logits - u)
        p_mask = (ls.double() / L)[:, None].expand(batch, L)
        ce = F.cross_entropy(logits[:, P:][is_mask], seq[:, P:][is_mask], reduction="none")
        losses.append((ce / p_mask[is_mask]).sum().item() / batch)
    return -sum(losses) / len(losses)


@pytest.mark.parametrize("cfg", [0.0, 0.7])
@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_matches_float64_reference_with_same_draws(cfg, backend):
    model = tiny_model(backend)
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 20, (5,), generator=g)
    answer = torch.randint(0, 20, (7,), generator=g)
    for mc, bs, seed in ((12, 4, 0), (10, 5, 3), (6, 6, 9)):
        est = lx.log_likelihood(
            model,
            prompt,
            answer,
            mc_num=mc,
            batch_size=bs,
            cfg_scale=cfg,
            generator=torch.Generator().manual_seed(seed),
        )
        ref = ref_log_likelihood(model, prompt, answer, mc, bs, cfg, seed)
        assert isinstance(est, float) and est < 0
        assert abs(est - ref) <= 1e-4 * abs(ref) + 1e-5, (est, ref)


def test_stratified_mask():
    g = torch.Generator().manual_seed(0)
    for L, b in ((4, 16), (7, 3), (1, 5), (10, 4)):
        for _ in range(5):
            is_mask, ls = stratified_mask(L, b, g)
            assert is_mask.shape == (b, L) and is_mask.dtype == torch.bool
            assert torch.equal(is_mask.sum(1), ls)
            assert ls.min() >= 1 and ls.max() <= L
            if b % L == 0:  # stratified: every l equally often
                assert torch.equal(
                    torch.bincount(ls, minlength=L + 1)[1:], torch.full((L,), b // L)
                )
    # every row's l is exactly uniform: enumerate k through the generator's first draw
    L, b = 4, 6  # j * L / b hits .5 for j = 3 (the case where round-half-to-even skews)
    counts = torch.zeros(b, L + 1)
    for seed in range(400):
        _, ls = stratified_mask(L, b, torch.Generator().manual_seed(seed))
        counts[torch.arange(b), ls] += 1
    freq = counts[:, 1:] / 400
    assert (freq - 0.25).abs().max() < 0.09, freq


def test_prompt_never_masked_and_cfg_pass(monkeypatch):
    model = tiny_model()
    prompt = torch.randint(0, 20, (4,))
    answer = torch.randint(0, 20, (6,))
    seen = []
    real = model.forward_hidden

    def spy(ids, attention_mask=None, **kw):
        seen.append(ids.clone())
        return real(ids, attention_mask, **kw)

    monkeypatch.setattr(model, "forward_hidden", spy)
    lx.log_likelihood(model, prompt, answer, mc_num=8, batch_size=4, cfg_scale=1.0)
    assert len(seen) == 2
    for ids in seen:
        cond, uncond = ids[:4], ids[4:]
        assert (cond[:, :4] == prompt).all()
        assert (uncond[:, :4] == 22).all()
        assert torch.equal(cond[:, 4:], uncond[:, 4:])
        masked = cond[:, 4:] == 22
        assert masked.any(1).all()  # l >= 1
        assert torch.equal(cond[:, 4:][~masked], answer.expand(4, 6)[~masked])


def test_unbiased_over_seeds():
    """The average estimate approaches the exact expectation, computed by enumerating every
    l in 1..L and every l-subset of masked answer tokens (float64)."""
    model = tiny_model(vocab=13, n_layers=1, seed=2)
    prompt = torch.tensor([3, 7, 1])
    answer = torch.tensor([5, 2, 9, 4])
    L, P = 4, 3
    ref = LLaDAModel(model.config, backend="torch")
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, assign=True)
    exact = unweighted = 0.0
    with torch.no_grad():
        for n in range(1, L + 1):
            subsets = list(itertools.combinations(range(L), n))
            for s in subsets:
                x = torch.cat([prompt, answer])[None].clone()
                x[0, [P + i for i in s]] = model.config.mask_token_id
                logp = torch.log_softmax(ref(x).logits[0], -1)
                ce = -sum(logp[P + i, answer[i]].item() for i in s)
                exact += (1 / L) * (1 / len(subsets)) * (L / n) * ce
                unweighted += (1 / L) * (1 / len(subsets)) * ce
    exact, unweighted = -exact, -unweighted
    ests = torch.tensor(
        [
            lx.log_likelihood(
                model,
                prompt,
                answer,
                mc_num=32,
                batch_size=8,
                generator=torch.Generator().manual_seed(s),
            )
            for s in range(40)
        ],
        dtype=torch.float64,
    )
    se = ests.std().item() / math.sqrt(len(ests))
    assert ests.std().item() > 0  # the estimator is random...
    assert abs(ests.mean().item() - exact) < 4 * se + 1e-4, (ests.mean().item(), exact, se)
    # ...and a biased variant (no L / l weight) would be far off: the test can tell
    assert abs(unweighted - exact) > 8 * se


def test_validation():
    model = tiny_model()
    p, a = torch.randint(0, 20, (3,)), torch.randint(0, 20, (4,))
    with pytest.raises(ValueError, match="multiple of batch_size"):
        lx.log_likelihood(model, p, a, mc_num=10, batch_size=4)
    with pytest.raises(ValueError, match="answer_ids"):
        lx.log_likelihood(model, p, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="mc_num"):
        lx.log_likelihood(model, p, a, mc_num=0)
    with pytest.raises(TypeError, match="prompt_ids"):
        lx.log_likelihood(model, "abc", a)
    # lists, [1, n] tensors and an empty prompt are fine
    g = torch.Generator
    x = lx.log_likelihood(
        model, p.tolist(), a[None], mc_num=4, batch_size=4, generator=g().manual_seed(0)
    )
    y = lx.log_likelihood(model, p, a, mc_num=4, batch_size=4, generator=g().manual_seed(0))
    assert x == y
    assert lx.log_likelihood(model, [], a, mc_num=4, batch_size=4) < 0


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
def test_cuda_bf16_close_to_reference():
    model = tiny_model("kernels").to("cuda", torch.bfloat16)
    prompt, answer = torch.randint(0, 20, (5,)), torch.randint(0, 20, (7,))
    est = lx.log_likelihood(
        model, prompt, answer, mc_num=8, batch_size=4, generator=torch.Generator().manual_seed(1)
    )
    ref = ref_log_likelihood(model.cpu().float(), prompt, answer, 8, 4, 0.0, 1)
    assert abs(est - ref) <= 0.03 * abs(ref) + 0.05, (est, ref)
