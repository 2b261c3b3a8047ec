"""Tests of lx.generate against the public LLaDA sampler (generate.py), written out below."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LogitsOnly, left_padded_batch, tiny_llada

import llada_ext as lx
from llada_ext.sampling import (
    SamplerGraphs,
    factor_count,
    get_num_transfer_tokens,
    select_transfer,
)

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------
# The public LLaDA generate.py, line by line (only `mask_id` and the EOS ids are parameters
# here; `attention_mask_` is defined when attention_mask is None so that CFG runs without it)
# ------------------------------------------------------------------------------------------
def add_gumbel_noise(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def ref_get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)

    base = mask_num // steps
    remainder = mask_num % steps

    num_transfer_tokens = (
        torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    )

    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1

    return num_transfer_tokens


@torch.no_grad()
def ref_generate(
    model,
    prompt,
    attention_mask=None,
    steps=128,
    gen_length=128,
    block_length=128,
    temperature=0.0,
    cfg_scale=0.0,
    remasking="low_confidence",
    mask_id=126336,
    logits_eos_inf=False,
    confidence_eos_eot_inf=False,
    eos_id=126081,
    eot_id=126348,
    stable_ties=False,
):
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long).to(
        model.device
    )
    x[:, : prompt.shape[1]] = prompt.clone()

    if attention_mask is not None:
        attention_mask = torch.cat(
            [
                attention_mask,
                torch.ones(
                    (prompt.shape[0], gen_length), dtype=attention_mask.dtype, device=model.device
                ),
            ],
            dim=-1,
        )

    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length

    assert steps % num_blocks == 0
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        block_mask_index = (
            x[
                :,
                prompt.shape[1] + num_block * block_length : prompt.shape[1]
                + (num_block + 1) * block_length :,
            ]
            == mask_id
        )
        num_transfer_tokens = ref_get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                attention_mask_ = None
                if attention_mask is not None:
                    attention_mask_ = torch.cat([attention_mask, attention_mask], dim=0)
                logits = model(x_, attention_mask=attention_mask_).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask).logits

            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf

            logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)  # b, l

            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(
                    torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1
                )  # b, l
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -np.inf

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                if stable_ties:  # equal confidences (the zeroed EOS ones): lower position first
                    select_index = torch.sort(confidence[j], descending=True, stable=True)[1]
                    select_index = select_index[: num_transfer_tokens[j, i]]
                else:
                    _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]

    return x


# ------------------------------------------------------------------------------------------
class Counting:
    """Counts full and cached forward passes of a model."""

    def __init__(self, model, monkeypatch):
        self.full = self.sliced = 0
        real = model.forward_hidden

        def wrapped(ids, attention_mask=None, **kw):
            if kw.get("cache_start") is None:
                self.full += 1
            else:
                self.sliced += 1
            return real(ids, attention_mask, **kw)

        monkeypatch.setattr(model, "forward_hidden", wrapped)


COMBOS = [  # gen_length, steps, block_length, cfg_scale
    (8, 8, 8, 0.0),
    (12, 6, 4, 0.0),
    (12, 12, 4, 0.0),
    (10, 4, 5, 0.0),  # 5 masks over 2 steps per block: schedule 3, 2
    (9, 9, 3, 1.5),
    (16, 4, 8, 0.5),
    (6, 12, 6, 0.0),  # more steps than tokens: some steps transfer nothing
]


@pytest.mark.parametrize("gen_length,steps,block_length,cfg", COMBOS)
@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_matches_public_sampler_greedy(gen_length, steps, block_length, cfg, backend):
    model = tiny_llada(backend=backend)
    prompt = torch.randint(0, 55, (2, 5), generator=torch.Generator().manual_seed(gen_length))
    mask_id = model.config.mask_token_id
    ref = ref_generate(
        model,
        prompt,
        steps=steps,
        gen_length=gen_length,
        block_length=block_length,
        cfg_scale=cfg,
        mask_id=mask_id,
    )
    out = lx.generate(
        model, prompt, gen_length=gen_length, steps=steps, block_length=block_length, cfg_scale=cfg
    )
    assert out.dtype == torch.int64 and out.shape == (2, 5 + gen_length)
    assert torch.equal(out, ref)
    assert not (out == mask_id).any()


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_matches_public_sampler_left_padded(cfg):
    model = tiny_llada()
    prompt, mask = left_padded_batch(model)
    kw = dict(steps=8, gen_length=8, block_length=4, cfg_scale=cfg)
    ref = ref_generate(model, prompt, attention_mask=mask, mask_id=60, **kw)
    out = lx.generate(model, prompt, attention_mask=mask, **kw)
    assert torch.equal(out, ref)
    # and each padded row is what the row gives alone
    for r, n in enumerate((5, 3, 7)):
        alone = lx.generate(model, prompt[r : r + 1, 7 - n :], **kw)
        assert torch.equal(out[r : r + 1, 7 - n :], alone)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("gen_length,steps,block_length,cfg", COMBOS[1:5])
def test_every_reference_strategy_token_for_token(remasking, gen_length, steps, block_length, cfg):
    """Both strategies of the public sampler at temperature 0: "random" draws its
    confidences with torch.rand over the whole sequence, as the reference does, so the same
    seed gives the same tokens (with the global generator and with an explicit one)."""
    model = tiny_llada(seed=3)
    prompt, mask = left_padded_batch(model, lens=(4, 6), seed=gen_length)
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg)
    torch.manual_seed(11)
    ref = ref_generate(model, prompt, attention_mask=mask, remasking=remasking, mask_id=60, **kw)
    torch.manual_seed(11)
    out = lx.generate(model, prompt, attention_mask=mask, remasking=remasking, **kw)
    assert torch.equal(out, ref)
    if remasking == "random":
        g = torch.Generator().manual_seed(5)
        with_gen = lx.generate(
            model, prompt, attention_mask=mask, remasking=remasking, generator=g, **kw
        )
        torch.manual_seed(5)
        assert torch.equal(
            with_gen,
            ref_generate(model, prompt, attention_mask=mask, remasking=remasking, mask_id=60, **kw),
        )


def eos_prone_model():
    """A tiny model where EOS is the prediction at many, not all, positions."""
    model = tiny_llada(seed=2)
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] = model.lm_head.weight[45] * 1.1
    return model, eos


def test_forbid_eos_matches_reference_logits_eos_inf():
    model, eos = eos_prone_model()
    prompt = torch.randint(0, 55, (2, 5), generator=torch.Generator().manual_seed(8))
    kw = dict(steps=8, gen_length=8, block_length=4)
    plain = lx.generate(model, prompt, **kw)
    assert (plain[:, 5:] == eos).any()
    for cfg in (0.0, 1.0):
        ref = ref_generate(
            model, prompt, mask_id=60, logits_eos_inf=True, eos_id=eos, cfg_scale=cfg, **kw
        )
        out = lx.generate(model, prompt, forbid_eos=True, cfg_scale=cfg, **kw)
        assert torch.equal(out, ref)
        assert not (out == eos).any()


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_zero_eos_confidence_matches_reference_at_temperature_0(cfg):
    model, eos = eos_prone_model()
    eot = 7
    prompt = torch.randint(0, 55, (2, 5), generator=torch.Generator().manual_seed(8))
    kw = dict(steps=8, gen_length=8, block_length=8, cfg_scale=cfg)
    # the zeroed confidences tie; torch.topk orders ties arbitrarily, so the reference here
    # breaks them by position, as lx.remask does
    ref = ref_generate(
        model,
        prompt,
        mask_id=60,
        confidence_eos_eot_inf=True,
        eos_id=eos,
        eot_id=eot,
        stable_ties=True,
        **kw,
    )
    seen = []

    def watch(step, x, conf):
        seen.append((x.clone(), conf.clone()))

    out = lx.generate(model, prompt, zero_eos_confidence=True, eot_id=eot, callback=watch, **kw)
    assert torch.equal(out, ref)
    assert not torch.equal(out, lx.generate(model, prompt, **kw))  # the option matters here
    assert len(seen) == 8
    x_start = torch.cat([prompt, torch.full((2, 8), 60)], 1)
    assert check_end_tokens_last(x_start, seen, 5) > 0


def check_end_tokens_last(x_start, seen, plen):
    """At every step, a candidate whose confidence was demoted (EOS / EoT prediction) is
    unmasked only if every other candidate of its row was unmasked in that step too.
    Returns how many demoted candidates were seen."""
    before = x_start
    demoted_total = 0
    for after, conf in seen:
        cand = before[:, plen:] == 60
        new = cand & (after[:, plen:] != 60)
        demoted = cand & (conf < -1e29)
        normal = cand & (conf > -1e29)
        demoted_total += int(demoted.sum())
        for r in range(before.shape[0]):
            if (new[r] & demoted[r]).any():
                assert (new[r] | ~normal[r]).all()
        before = after
    return demoted_total


def test_zero_eos_confidence_at_temperature_demotes_end_predictions():
    """At temperature > 0 the reference leaves EOS confidences alone; the option does not."""
    model, eos = eos_prone_model()
    prompt = torch.randint(0, 55, (3, 5), generator=torch.Generator().manual_seed(9))
    seen = []

    def watch(step, x, conf):
        seen.append((x.clone(), conf.clone()))

    kw = dict(steps=8, gen_length=8, block_length=8, temperature=0.7)
    g = torch.Generator().manual_seed(3)
    lx.generate(model, prompt, zero_eos_confidence=True, generator=g, callback=watch, **kw)
    x_start = torch.cat([prompt, torch.full((3, 8), 60)], 1)
    assert check_end_tokens_last(x_start, seen, 5) > 0


def test_prompt_with_mask_token_is_refused():
    model = tiny_llada()
    prompt = torch.randint(0, 55, (2, 6), generator=torch.Generator().manual_seed(5))
    prompt[1, 4] = 60
    with pytest.raises(ValueError, match=r"prompt_ids contains mask_id 60 \(rows \[1\]\)"):
        lx.generate(model, prompt, steps=6, gen_length=6, block_length=3)


def test_plain_logits_model_path():
    """A module with only forward(ids, attention_mask).logits (Hugging Face style) works too."""
    model = tiny_llada()
    prompt, mask = left_padded_batch(model, lens=(4, 2))
    kw = dict(gen_length=8, steps=4, block_length=4, cfg_scale=0.5, attention_mask=mask)
    assert torch.equal(
        lx.generate(LogitsOnly(model), prompt, **kw), lx.generate(model, prompt, **kw)
    )
    with pytest.raises(ValueError, match="cache"):
        lx.generate(LogitsOnly(model), prompt, cache="prefix", **kw)


def test_schedule_matches_public():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = torch.rand(4, 11, generator=g) < 0.6
        steps = int(torch.randint(1, 9, (), generator=g))
        assert torch.equal(get_num_transfer_tokens(m, steps), ref_get_num_transfer_tokens(m, steps))


def test_temperature_sampling_is_reproducible_and_valid():
    model = tiny_llada()
    prompt = torch.randint(0, 55, (3, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(gen_length=12, steps=6, block_length=6, temperature=1.0)
    a = lx.generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    b = lx.generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    c = lx.generate(model, prompt, generator=torch.Generator().manual_seed(8), **kw)
    greedy = lx.generate(model, prompt, gen_length=12, steps=6, block_length=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, greedy)
    assert torch.equal(a[:, :4], prompt) and not (a == 60).any()
    r = lx.generate(
        model,
        prompt,
        remasking="random",
        generator=torch.Generator().manual_seed(1),
        gen_length=12,
        steps=12,
        block_length=4,
    )
    assert not (r == 60).any() and torch.equal(r[:, :4], prompt)
    for strategy in ("margin", "entropy"):
        s = lx.generate(model, prompt, remasking=strategy, gen_length=8, steps=4, block_length=4)
        assert not (s == 60).any()


def test_random_remasking_decodes_greedy_tokens_in_random_order():
    """With one token per step the order is random but every token is the argmax at its
    step; with all tokens in one step the result equals the greedy one-step decode."""
    model = tiny_llada()
    prompt = torch.randint(0, 55, (2, 4), generator=torch.Generator().manual_seed(3))
    one = lx.generate(
        model,
        prompt,
        gen_length=6,
        steps=1,
        block_length=6,
        remasking="random",
        generator=torch.Generator().manual_seed(0),
    )
    greedy_one = lx.generate(model, prompt, gen_length=6, steps=1, block_length=6)
    x = torch.cat([prompt, torch.full((2, 6), 60)], 1)
    assert torch.equal(one, greedy_one)
    assert torch.equal(one[:, 4:], model(x).logits[:, 4:].argmax(-1))


# ------------------------------------------------------------------------------------------
# opt-in speed features
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_cache_is_exact_for_a_one_layer_model(cache, cfg, monkeypatch):
    """With one layer, keys/values depend on each token and its position only, so a cache
    built at the block start stays exact: token-for-token equal to no cache."""
    model = tiny_llada(n_layers=1, seed=4)
    prompt, mask = left_padded_batch(model, lens=(6, 4), seed=2)
    kw = dict(gen_length=12, steps=12, block_length=4, cfg_scale=cfg, attention_mask=mask)
    plain = lx.generate(model, prompt, **kw)
    counter = Counting(model, monkeypatch)
    cached = lx.generate(model, prompt, cache=cache, **kw)
    assert torch.equal(cached, plain)
    assert (counter.full, counter.sliced) == (3, 9)  # one full pass per block


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_on_deeper_model(cache):
    model = tiny_llada(n_layers=3, seed=5)
    prompt = torch.randint(0, 55, (2, 5), generator=torch.Generator().manual_seed(9))
    cached = lx.generate(model, prompt, cache=cache, gen_length=12, steps=12, block_length=4)
    assert torch.equal(cached[:, :5], prompt) and not (cached == 60).any()
    # with one step per block the cache is never read: identical to no cache
    one = dict(gen_length=12, steps=3, block_length=4)
    assert torch.equal(
        lx.generate(model, prompt, cache=cache, **one), lx.generate(model, prompt, **one)
    )


def test_prefix_and_dual_cache_agree_without_suffix():
    """With a single block there is no suffix, so the dual cache (block only) and the prefix
    cache (block + suffix) recompute the same positions against the same cached prompt."""
    model = tiny_llada(n_layers=3, seed=6)
    prompt, mask = left_padded_batch(model, lens=(6, 3), seed=4)
    kw = dict(gen_length=8, steps=8, block_length=8, attention_mask=mask, cfg_scale=0.5)
    prefix = lx.generate(model, prompt, cache="prefix", **kw)
    dual = lx.generate(model, prompt, cache="dual", **kw)
    assert torch.equal(prefix, dual)
    assert not (dual == 60).any()


def test_threshold(monkeypatch):
    model = tiny_llada()
    prompt = torch.randint(0, 55, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(gen_length=12, steps=12, block_length=4)
    plain = lx.generate(model, prompt, **kw)
    # a threshold nobody reaches changes nothing
    assert torch.equal(lx.generate(model, prompt, threshold=1.5, **kw), plain)
    # a threshold everybody passes decodes each block in one step (one forward per block)
    counter = Counting(model, monkeypatch)
    fast = lx.generate(model, prompt, threshold=-1.0, **kw)
    assert counter.full == 3
    x = torch.cat([prompt, torch.full((2, 12), 60)], 1)
    first_block = model.lm_head(model.forward_hidden(x)[:, 5:9]).argmax(-1)
    assert torch.equal(fast[:, 5:9], first_block)
    assert not (fast == 60).any()
    # an intermediate threshold needs between 3 and 12 forwards
    counter.full = 0
    mid = lx.generate(model, prompt, threshold=0.2, **kw)
    assert 3 <= counter.full <= 12 and not (mid == 60).any()


def patch_lm_head(model, monkeypatch, edit):
    """Make ``model.lm_head(h)`` return ``edit(logits)``, the real head's logits (a fresh
    tensor, [B, W, V]) changed by ``edit``."""
    head = model.model.transformer.ff_out

    class Edited(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = head.weight

        def forward(self, h):
            return edit(head(h).clone())

    monkeypatch.setattr(type(model), "lm_head", property(lambda self: Edited()))


def test_eos_early_stop(monkeypatch):
    model = tiny_llada()
    eos = model.config.eos_token_id

    def always_eos(out):  # a large EOS logit: the model always predicts EOS
        out[..., eos] += 100.0
        return out

    patch_lm_head(model, monkeypatch, always_eos)
    prompt = torch.randint(0, 55, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=12, steps=6, block_length=4)
    counter = Counting(model, monkeypatch)
    full = lx.generate(model, prompt, **kw)
    assert counter.full == 6 and (full[:, 4:] == eos).all()
    counter.full = 0
    early = lx.generate(model, prompt, eos_early_stop=True, **kw)
    assert counter.full == 2  # the first block only
    assert torch.equal(early, full)


def test_eos_early_stop_needs_eos_through_the_block_end(monkeypatch):
    """A row whose answer has an EOS followed by other tokens has not finished."""
    model = tiny_llada()
    eos = model.config.eos_token_id

    def eos_then_a_word(out):  # EOS everywhere except answer position 1 of row 0
        out[..., eos] += 100.0
        if out.shape[1] >= 4:  # the first block's window (positions 4..7)
            out[0, 1, 3] += 300.0
        return out

    patch_lm_head(model, monkeypatch, eos_then_a_word)
    prompt = torch.randint(0, 55, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=12, steps=6, block_length=4)
    counter = Counting(model, monkeypatch)
    out = lx.generate(model, prompt, eos_early_stop=True, **kw)
    assert out[0, 5] == 3 and out[0, 4] == eos
    assert counter.full == 6  # no early stop: row 0 has a token after its first EOS


def test_factor_count_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        w = int(torch.randint(1, 9, (), generator=g))
        conf = torch.rand(3, w, generator=g) ** 0.2
        ncand = torch.randint(0, w + 1, (3,), generator=g)
        conf = torch.where(torch.arange(w) < ncand[:, None], conf, float("-inf"))
        conf = conf.sort(dim=1, descending=True).values
        f = float(torch.rand((), generator=g)) * 2
        got = factor_count(conf, ncand, f)
        for r in range(3):
            n = 0
            for i in range(int(ncand[r])):  # rank i + 1 needs c >= 1 - f / (i + 2)
                if i == 0 or conf[r, i] >= 1 - f / (i + 2):
                    n += 1
                else:
                    break
            assert int(got[r]) == n


def ref_factor_generate(model, prompt, gen_length, block_length, factor, mask_id=60):
    """Fast-dLLM's factor rule written out: one block at a time, each step unmasks the n
    most confident masks of the block for the largest n whose ranks all pass
    c_i >= 1 - factor / (i + 1) (at least one)."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask_id)], 1)
    plen = prompt.shape[1]
    for nb in range(gen_length // block_length):
        s, e = plen + nb * block_length, plen + (nb + 1) * block_length
        while (x[:, s:e] == mask_id).any():
            logits = model.double()(x).logits[:, s:e]
            model.float()
            p = torch.softmax(logits, -1).detach()
            x0 = p.argmax(-1)
            c = p.gather(-1, x0[..., None])[..., 0]
            for r in range(x.shape[0]):
                cand = (x[r, s:e] == mask_id).nonzero()[:, 0].tolist()
                if not cand:
                    continue
                order = sorted(cand, key=lambda j: (-float(c[r, j]), j))
                n = 1
                while n < len(order) and c[r, order[n]] >= 1 - factor / (n + 2):
                    n += 1
                for j in order[:n]:
                    x[r, s + j] = x0[r, j]
    return x


@pytest.mark.parametrize("factor", [0.05, 0.6, 1.5, 1e6])
def test_factor_rule_matches_written_out_rule(factor):
    model = tiny_llada(seed=7)
    with torch.no_grad():  # sharper predictions so that the rule takes several tokens
        model.lm_head.weight.mul_(4.0)
    prompt = torch.randint(0, 55, (2, 5), generator=torch.Generator().manual_seed(1))
    steps = []
    out = lx.generate(
        model,
        prompt,
        gen_length=12,
        steps=12,
        block_length=4,
        factor=factor,
        callback=lambda i, x, c: steps.append(i),
    )
    ref = ref_factor_generate(model, prompt, 12, 4, factor)
    assert torch.equal(out, ref)
    if factor == 1e6:
        assert len(steps) == 3  # every block in one step
    if factor == 0.05:
        plain = lx.generate(model, prompt, gen_length=12, steps=12, block_length=4)
        assert len(steps) == 12 and torch.equal(out, plain)


def test_select_transfer_matches_a_loop():
    """count = max(min(k, #candidates), #above threshold), most confident first, ties to the
    lower position (the lx.remask rules), on rows with repeated confidences."""
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        w = int(torch.randint(1, 10, (), generator=g))
        conf = torch.randint(0, 4, (3, w), generator=g).float() / 4  # many ties
        cand = torch.rand(3, w, generator=g) < 0.7
        conf = torch.where(cand, conf, float("-inf"))
        k = torch.randint(0, w + 2, (3,), generator=g)
        tau = [None, 0.4][int(torch.randint(0, 2, (), generator=g))]
        got = select_transfer(conf, k, threshold=tau)
        for r in range(3):
            idx = [j for j in range(w) if cand[r, j]]
            order = sorted(idx, key=lambda j: (-float(conf[r, j]), j))
            n = min(int(k[r]), len(idx))
            if tau is not None:
                n = max(n, sum(1 for j in idx if conf[r, j] > tau))
            want = torch.zeros(w, dtype=torch.bool)
            want[order[:n]] = True
            assert torch.equal(got[r], want)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_cache_refreshed_every_step_equals_no_cache(cache, cfg, monkeypatch):
    """The cache machinery (full pass filling the cache, reading the block's logits from it)
    is exact when refreshed at every step; the normal schedule reads stale keys (3 layers)."""
    model = tiny_llada(n_layers=3, seed=5)
    prompt, mask = left_padded_batch(model, lens=(6, 3), seed=6)
    kw = dict(gen_length=12, steps=12, block_length=4, cfg_scale=cfg, attention_mask=mask)
    plain = lx.generate(model, prompt, **kw)
    counter = Counting(model, monkeypatch)
    refreshed = lx.generate(model, prompt, cache=cache, cache_refresh=1, **kw)
    assert torch.equal(refreshed, plain)
    assert (counter.full, counter.sliced) == (12, 0)
    counter.full = counter.sliced = 0
    lx.generate(model, prompt, cache=cache, cache_refresh=2, **kw)
    assert (counter.full, counter.sliced) == (6, 6)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_rows_of_a_padded_batch_equal_rows_alone(cache):
    model = tiny_llada(n_layers=2, seed=8)
    lens = (5, 2, 7)
    prompt, mask = left_padded_batch(model, lens=lens, seed=3)
    kw = dict(gen_length=12, steps=12, block_length=4, cache=cache, cfg_scale=0.5)
    out = lx.generate(model, prompt, attention_mask=mask, **kw)
    for r, n in enumerate(lens):
        alone = lx.generate(model, prompt[r : r + 1, 7 - n :], **kw)
        assert torch.equal(out[r : r + 1, 7 - n :], alone)


def test_callback_sees_the_canvas_fill_in():
    model = tiny_llada()
    prompt = torch.randint(0, 55, (2, 5), generator=torch.Generator().manual_seed(4))
    seen = []
    out = lx.generate(
        model,
        prompt,
        gen_length=8,
        steps=8,
        block_length=4,
        callback=lambda i, x, c: seen.append((i, x.clone(), c.clone())),
    )
    assert [s[0] for s in seen] == list(range(8))
    masks = [int((s[1] == 60).sum()) for s in seen]
    assert masks == [14, 12, 10, 8, 6, 4, 2, 0]  # one token per row per step
    assert all(s[2].shape == (2, 4) and s[2].dtype == torch.float32 for s in seen)
    assert torch.equal(seen[-1][1], out)
    # the first step of a block scores every position of the block; the kept one is the best
    first = seen[0][2]
    assert torch.isfinite(first).all()
    kept = (seen[0][1][:, 5:9] != 60).float().argmax(-1)
    assert torch.equal(kept, first.argmax(-1))


class _EagerButFrozen(SamplerGraphs):
    """Runs units eagerly but behaves like recorded graphs for random draws, so the
    selection-after-the-unit path is exercised without a GPU."""

    @property
    def freezes_randomness(self):
        return True


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_graph_units_through_static_buffers_equal_eager(cache):
    model = tiny_llada(seed=9)
    prompt, mask = left_padded_batch(model, lens=(4, 6), seed=5)
    base = dict(gen_length=12, steps=12, block_length=4, cache=cache, attention_mask=mask)
    for runner in (SamplerGraphs(capture=False), _EagerButFrozen(capture=False)):
        for extra in (
            {},
            {"cfg_scale": 1.0},
            {"temperature": 0.8},
            {"remasking": "random"},
            {"threshold": 0.2},
            {"factor": 0.8, "zero_eos_confidence": True},
        ):
            kw = {**base, **extra}
            eager = lx.generate(model, prompt, generator=torch.Generator().manual_seed(1), **kw)
            # twice through the same runner: the static buffers are refilled per call
            for _ in range(2):
                got = lx.generate(
                    model,
                    prompt,
                    generator=torch.Generator().manual_seed(1),
                    cuda_graphs=runner,
                    **kw,
                )
                assert torch.equal(got, eager), extra


def test_validation():
    model = tiny_llada()
    p = torch.randint(0, 55, (1, 3))
    with pytest.raises(ValueError, match="block_length"):
        lx.generate(model, p, gen_length=10, steps=10, block_length=4)
    with pytest.raises(ValueError, match="steps"):
        lx.generate(model, p, gen_length=8, steps=3, block_length=4)
    with pytest.raises(ValueError, match="remasking"):
        lx.generate(model, p, gen_length=4, steps=4, block_length=4, remasking="top")
    with pytest.raises(ValueError, match="cache"):
        lx.generate(model, p, gen_length=4, steps=4, block_length=4, cache="full")
    with pytest.raises(ValueError, match="attention_mask"):
        lx.generate(
            model, p, gen_length=4, steps=4, block_length=4, attention_mask=torch.ones(1, 4)
        )
    with pytest.raises(ValueError, match="gen_length"):
        lx.generate(model, p, gen_length=0, steps=4, block_length=4)
    with pytest.raises(TypeError, match="prompt_ids"):
        lx.generate(model, "hello", gen_length=4, steps=4, block_length=4)
    bad = [
        (dict(prompt_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), ValueError, "no real token"),
        (dict(threshold=0.5, factor=1.0), ValueError, "pick one"),
        (dict(factor=1.0, remasking="entropy"), ValueError, "factor"),
        (dict(factor=0.0), ValueError, "factor"),
        (dict(threshold=float("nan")), ValueError, "threshold"),
        (dict(cache_refresh=2), ValueError, "cache_refresh"),
        (dict(cache="prefix", cache_refresh=0), ValueError, "cache_refresh"),
        (dict(cuda_graphs=True), ValueError, "cuda_graphs"),
        (dict(cuda_graphs="yes"), TypeError, "cuda_graphs"),
        (dict(random_source="numpy"), ValueError, "random_source"),
        (dict(callback=3), TypeError, "callback"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(generator=3), TypeError, "generator"),
        (dict(forbid_eos=True, eos_id=61), ValueError, "eos_id"),
        (dict(zero_eos_confidence=True, eot_id=-1), ValueError, "eot_id"),
    ]
    for extra, exc, msg in bad:
        kw = dict(prompt_ids=p, gen_length=4, steps=4, block_length=4)
        kw.update(extra)
        if torch.cuda.is_available() and extra.get("cuda_graphs") is True:
            continue
        with pytest.raises(exc, match=msg):
            lx.generate(model, **kw)
    # a 1-D prompt and a list are accepted
    a = lx.generate(model, p[0], gen_length=4, steps=4, block_length=4)
    b = lx.generate(model, p[0].tolist(), gen_length=4, steps=4, block_length=4)
    assert a.shape == (1, 7) and torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
def test_cuda_matches_public_sampler_bf16():
    model = tiny_llada(backend="kernels").to("cuda", torch.bfloat16)
    prompt = torch.randint(0, 55, (2, 5), device="cuda")
    for gl, st, bl, cfg in COMBOS[:4]:
        ref = ref_generate(
            model, prompt, steps=st, gen_length=gl, block_length=bl, cfg_scale=cfg, mask_id=60
        )
        out = lx.generate(model, prompt, gen_length=gl, steps=st, block_length=bl, cfg_scale=cfg)
        # bf16 logits may tie; require near-total agreement rather than bit equality
        assert (out == ref).float().mean().item() > 0.9
        assert not (out == 60).any()
    for cache in ("prefix", "dual"):
        out = lx.generate(model, prompt, gen_length=8, steps=8, block_length=4, cache=cache)
        assert not (out == 60).any()


def _copy_into(dst, src):
    from llada_ext.model import KVCache

    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, KVCache):
        for a, b in zip(dst.k + dst.v, src.k + src.v):
            a.copy_(b)
    elif isinstance(dst, (tuple, list)):
        for a, b in zip(dst, src):
            _copy_into(a, b)


class _ReplayEmulation(SamplerGraphs):
    """What a recorded unit does, without a GPU: the first call runs and keeps its outputs;
    every later call ("replay") recomputes into those same output tensors. A unit that read
    a stale or copied buffer instead of the recorded addresses would decode differently."""

    def __init__(self):
        super().__init__(capture=False)
        self.recorded = {}

    @property
    def freezes_randomness(self):
        return True

    def run(self, unit, fn, *, persistent=False):
        if unit not in self.recorded:
            out = fn()
            self.recorded[unit] = (fn, out)
            return out
        fn, out = self.recorded[unit]
        _copy_into(out, fn())
        return out

    def release(self):
        super().release()
        self.recorded = {}


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_replayed_units_decode_what_generate_decodes(cache):
    model = tiny_llada(seed=11, n_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # distinct confidences
    prompt, mask = left_padded_batch(model, lens=(9, 6), seed=2)
    kw = dict(gen_length=24, steps=12, block_length=8, cache=cache, attention_mask=mask)
    runner = _ReplayEmulation()
    for extra in ({}, {"cfg_scale": 0.5}, {"temperature": 0.5}):
        expect = lx.generate(
            model, prompt, generator=torch.Generator().manual_seed(2), **kw, **extra
        )
        for _ in range(2):  # buffers and units reused across calls
            got = lx.generate(
                model,
                prompt,
                generator=torch.Generator().manual_seed(2),
                cuda_graphs=runner,
                **kw,
                **extra,
            )
            assert torch.equal(got, expect), extra
    assert len(runner.recorded) > 0


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_cuda_graphs_equal_eager(cache):
    """Recorded steps replay the same tokens as the eager sampler, across calls and for every
    kind of selection (in the graph when deterministic, after it when random)."""
    model = tiny_llada(backend="kernels", seed=9).to("cuda", torch.bfloat16)
    prompt, mask = left_padded_batch(model, lens=(4, 6), seed=5)
    prompt, mask = prompt.cuda(), mask.cuda()
    base = dict(gen_length=16, steps=16, block_length=4, cache=cache, attention_mask=mask)
    graphs = SamplerGraphs()
    for extra in (
        {},
        {"cfg_scale": 1.0},
        {"temperature": 0.8},
        {"remasking": "random", "random_source": "philox"},
        {"threshold": 0.2},
        {"factor": 0.8, "zero_eos_confidence": True},
    ):
        kw = {**base, **extra}
        eager = lx.generate(model, prompt, generator=torch.Generator("cuda").manual_seed(1), **kw)
        for runner in (True, graphs, graphs):
            got = lx.generate(
                model,
                prompt,
                generator=torch.Generator("cuda").manual_seed(1),
                cuda_graphs=runner,
                **kw,
            )
            assert torch.equal(got, eager), extra
    assert len(graphs.graphs) > 0


def test_left_pad_right_aligns_prompts_for_generate():
    model = tiny_llada()
    prompts = [[5, 6, 7], [8], [9, 10]]
    ids, mask = lx.sampling.left_pad(prompts, pad_id=59)
    assert ids.tolist() == [[5, 6, 7], [59, 59, 8], [59, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    kw = dict(gen_length=4, steps=4, block_length=2)
    out = lx.generate(model, ids, attention_mask=mask, **kw)
    for r, p in enumerate(prompts):
        alone = lx.generate(model, torch.tensor([p]), **kw)
        assert torch.equal(out[r : r + 1, 3 - len(p) :], alone)


# ------------------------------------------------------------------------------------------
# run-folder settings, canvas rendering, length warnings
# ------------------------------------------------------------------------------------------
def test_render_canvas_shows_every_position_with_marks():
    from llada_ext.sampling import render_canvas
    from llada_ext.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    x = torch.tensor([[ord("p"), ord("a"), 257, 258, ord("b"), 259, 257]])
    marks = {257: "<eos>", 259: "<eot>"}
    assert render_canvas(tok, x, 1, 258, "_", marks) == ["a<eos>_b<eot><eos>"]
    assert render_canvas(tok, x, 1, 258) == ["a_b"]  # without marks decoding hides them


def test_generation_settings_of_a_folder_feed_generate(tmp_path):
    from llada_ext.generation_config import write_generation_config

    model = tiny_llada()
    assert lx.generation_settings(tmp_path)["gen_length"] == 64  # no file: LLaDA defaults
    write_generation_config(
        tmp_path, {"gen_length": 6, "steps": 6, "block_length": 3}, model.config
    )
    settings = lx.generation_settings(tmp_path)
    assert settings["mask_id"] == model.config.mask_token_id
    assert settings["eos_id"] == model.config.eos_token_id
    prompt = torch.randint(0, 50, (2, 5))
    out = lx.generate(model, prompt, **settings)
    assert out.shape == (2, 11)
    ref = lx.generate(model, prompt, gen_length=6, steps=6, block_length=3)
    assert torch.equal(out, ref)
    (tmp_path / "generation_config.json").write_text('{"mask_id": "x"}')
    with pytest.raises(ValueError, match="mask_id"):
        lx.generation_settings(tmp_path)


def test_warns_beyond_max_sequence_length(caplog):
    model = tiny_llada()
    model.config.max_sequence_length = 12
    prompt = torch.randint(0, 50, (1, 5))
    with caplog.at_level("WARNING", logger="llada_ext"):
        lx.generate(model, prompt, gen_length=6, steps=6, block_length=6)
    assert not caplog.records  # 11 tokens fit
    with caplog.at_level("WARNING", logger="llada_ext"):
        lx.generate(model, prompt, gen_length=8, steps=8, block_length=8)
        lx.log_likelihood(model, prompt[0], torch.arange(9), mc_num=2, batch_size=2)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "13 tokens" in msgs[0] and "14 tokens" in msgs[1]
    assert all("max_sequence_length of 12" in m for m in msgs)
