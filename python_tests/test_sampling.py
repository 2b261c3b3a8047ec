"""Tests of lx.generate against the public LLaDA sampler (generate.py), written out below:
greedy and both reference remasking strategies token for token, left-padded batches, the EOS
options, temperature sampling, argument validation, and the run-folder settings, canvas
rendering and length warnings around it. The opt-in speed features (caches, threshold, factor,
EOS early stop, CUDA graphs) are in test_sampling_speed.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LogitsOnly, left_padded_batch, tiny_llada

import llada_ext as lx
from llada_ext.sampling import get_num_transfer_tokens

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
