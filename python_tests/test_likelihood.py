"""Tests of lx.log_likelihood (Alg. 3): same draws as a float64 reference, and unbiasedness."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llada

import llada_ext as lx
import llada_ext.likelihood
from llada_ext.likelihood import score_choices, stratified_mask
from llada_ext.model import LLaDAModel

CUDA = torch.cuda.is_available()


def tiny_model(backend="torch", seed=0, vocab=23, n_layers=2) -> LLaDAModel:
    """The sampler tests' tiny model with a smaller vocabulary, MLP and context."""
    return tiny_llada(
        backend,
        seed=seed,
        vocab=vocab,
        n_layers=n_layers,
        mlp_hidden_size=40,
        max_sequence_length=64,
    )


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


# --------------------------------------------------------------------------------------------
# score_choices (multiple-choice ranking)
# --------------------------------------------------------------------------------------------
def fixed_logit_model(logits: list[float]) -> LLaDAModel:
    """A model whose prediction at every masked position is exactly ``logits``.

    The blocks' output projections are zeroed, so the residual stream is the token embedding
    and a masked position's hidden state is ``ln_f(wte[mask])`` whatever the context; the LM
    head is the rank-1 map sending that vector to ``logits``. The cross-entropy of a masked
    token then depends on its value only, so log p(answer) = sum_i log_softmax(logits)[a_i]
    exactly, for every masking draw."""
    vocab = len(logits)
    model = tiny_model(vocab=vocab, n_layers=1, seed=3)
    with torch.no_grad():
        for block in model.model.transformer.blocks:
            block.attn_out.weight.zero_()
            block.ff_out.weight.zero_()
        h = model.forward_hidden(torch.tensor([[vocab - 1]]))[0, 0].float()
        target = torch.tensor(logits, dtype=torch.float32)
        model.lm_head.weight.copy_(target[:, None] * h[None, :] / (h @ h))
        got = model(torch.tensor([[1, vocab - 1, 4]])).logits[0, 1]
    assert torch.allclose(got, target, atol=1e-4)
    return model


def test_score_choices_equals_log_likelihood_per_choice():
    model = tiny_model(vocab=23, n_layers=1)
    g = torch.Generator().manual_seed(5)
    context = torch.randint(0, 20, (4,), generator=g)
    choices = [torch.randint(0, 20, (n,), generator=g) for n in (3, 5, 3)]
    choices[1] = choices[1].tolist()  # lists of ints are fine too
    kw = dict(mc_num=8, batch_size=4, cfg_scale=0.5)
    scores = score_choices(
        model, context, choices, generator=torch.Generator().manual_seed(7), **kw
    )
    expected = [
        lx.log_likelihood(model, context, c, generator=torch.Generator().manual_seed(7), **kw)
        for c in choices
    ]
    assert scores == expected
    assert all(isinstance(s, float) for s in scores)
    normed = score_choices(
        model, context, choices, generator=torch.Generator().manual_seed(7), normalize=True, **kw
    )
    assert normed == pytest.approx([s / len(c) for s, c in zip(expected, choices)], rel=1e-12)


def test_score_choices_common_random_numbers():
    model = tiny_model(vocab=23, n_layers=1)
    context, answer = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7])
    other = torch.tensor([9, 5, 6, 7])
    for gen in (torch.Generator().manual_seed(0), None):
        a, b, c = score_choices(
            model, context, [answer, other, answer], mc_num=4, batch_size=4, generator=gen
        )
        assert a == c  # same draws for every choice; independent draws would differ
        assert a != b
    # the caller's generator moves on: the next call draws afresh
    g = torch.Generator().manual_seed(0)
    first = score_choices(model, context, [answer], mc_num=4, batch_size=4, generator=g)
    second = score_choices(model, context, [answer], mc_num=4, batch_size=4, generator=g)
    assert first != second


def test_score_choices_ranks_the_preferred_answer_first():
    # token 1 is the model's favourite, token 2 a close second, the rest unlikely
    logits = [-2.0, 3.0, 2.6, 0.5, 0.0, -1.0] + [-3.0] * 6 + [0.0]  # last id is the mask
    model = fixed_logit_model(logits)
    logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0)
    context = torch.tensor([7, 8])
    choices = [[3, 4, 5, 2], [3, 4, 5, 1], [7, 7, 7, 7], [1, 1, 1]]
    exact = [float(logp[c].sum()) for c in choices]
    assert exact[1] > exact[0]  # the choices differ only in their last token
    wins = 0
    for seed in range(8):
        scores = score_choices(
            model,
            context,
            choices,
            mc_num=4,
            batch_size=4,
            generator=torch.Generator().manual_seed(seed),
        )
        # with common draws the difference of choices 0 and 1 is L/l * (CE(2) - CE(1)) summed
        # over the draws masking their last token, which the l = L row always does
        assert scores[1] > scores[0] > scores[2], (seed, scores)
        assert scores[3] == pytest.approx(exact[3], abs=1e-4)  # equal CEs: no MC noise
        # independent draws for the two close choices (what the shared draws avoid)
        a = lx.log_likelihood(
            model,
            context,
            choices[0],
            mc_num=4,
            batch_size=4,
            generator=torch.Generator().manual_seed(2 * seed),
        )
        b = lx.log_likelihood(
            model,
            context,
            choices[1],
            mc_num=4,
            batch_size=4,
            generator=torch.Generator().manual_seed(2 * seed + 1),
        )
        wins += b > a
    assert wins < 8  # the test can tell shared draws from independent ones
    # normalize: per-token scores; a short and a long run of the favourite score the same
    short, long_ = score_choices(
        model, context, [[1], [1, 1, 1]], mc_num=4, batch_size=4, normalize=True
    )
    assert short == pytest.approx(float(logp[1]), abs=1e-5)
    assert long_ == pytest.approx(float(logp[1]), abs=1e-5)
    s, lng = score_choices(model, context, [[1], [1, 1, 1]], mc_num=4, batch_size=4)
    assert lng == pytest.approx(3 * s, rel=1e-5)


def test_score_choices_validation():
    model = tiny_model(vocab=23, n_layers=1)
    ctx = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="choices"):
        score_choices(model, ctx, [])
    with pytest.raises(ValueError, match=r"choices\[1\]"):
        score_choices(model, ctx, [[1, 2], []])
    with pytest.raises(TypeError, match="choices"):
        score_choices(model, ctx, "abc")
    with pytest.raises(TypeError, match=r"choices\[0\]"):
        score_choices(model, ctx, ["abc"])
    with pytest.raises(TypeError, match="context"):
        score_choices(model, "abc", [[1]])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        score_choices(model, ctx, [[1]], mc_num=6, batch_size=4)
    assert "score_choices" in llada_ext.likelihood.__all__
