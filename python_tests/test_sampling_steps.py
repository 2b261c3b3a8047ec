"""Each step of lx.generate on its own: the schedule, the window start, the cache refresh rule,
the early exits, the window's logits (plain, from the full pass, against the cache), the remask
and one whole step. test_sampling.py checks their combination against the public sampler."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import LogitsOnly, left_padded_batch, tiny_llada

import llada_ext as lx
from llada_ext.sampling import SamplerGraphs
from llada_ext.sampling.options import check_options, check_prompt
from llada_ext.sampling.select import DEMOTED, select_transfer
from llada_ext.sampling.steps import (
    SamplerState,
    answers_end_in_eos,
    block_done,
    get_num_transfer_tokens,
    needs_full_pass,
    window_start,
)


def randint(lo: int, hi: int, g: torch.Generator) -> int:
    """A random int in [lo, hi)."""
    return int(torch.randint(lo, hi, (), generator=g))


def make_state(model, prompt, mask=None, *, gen_length=8, block_length=4, runner=None, **opts):
    """A generation's state right after :meth:`SamplerState.begin`, as lx.generate makes it."""
    options = check_options(model, **opts)
    model_mask = check_prompt(prompt, options.mask_id, mask, gen_length)
    runner = runner if runner is not None else SamplerGraphs(capture=False)
    return SamplerState.begin(model, options, runner, prompt, model_mask, gen_length, block_length)


def scribble(state, plen, g, masked=0.5):
    """Fill the answer part of the canvas with random tokens, about ``masked`` of them masks
    (every answer position stays masked in row 0 of block 0's first half, so the window
    always has candidates)."""
    x = state.x
    vocab = state.model.config.vocab_size
    shape = (x.shape[0], x.shape[1] - plen)
    tokens = torch.randint(0, vocab - 3, shape, generator=g)
    x[:, plen:] = torch.where(torch.rand(shape, generator=g) < masked, state.o.mask_id, tokens)
    x[0, plen : plen + 2] = state.o.mask_id


def model_mask_of(mask, gen_length):
    """The attention mask over prompt and answer, as the reference sampler extends it."""
    if mask is None:
        return None
    return torch.cat([mask, torch.ones(mask.shape[0], gen_length, dtype=mask.dtype)], dim=1)


# ------------------------------------------------------------------------------------------
# loop control
# ------------------------------------------------------------------------------------------
def test_schedule_gives_base_plus_one_in_the_first_remainder_steps():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows, width = randint(1, 5, g), randint(1, 17, g)
        steps = randint(1, 2 * width + 1, g)
        block_mask = torch.rand(rows, width, generator=g) < float(torch.rand((), generator=g))
        got = get_num_transfer_tokens(block_mask, steps)
        assert got.dtype == torch.int64 and got.shape == (rows, steps)
        for r in range(rows):
            m = int(block_mask[r].sum())
            want = [m // steps + (1 if i < m % steps else 0) for i in range(steps)]
            assert got[r].tolist() == want
            assert sum(want) == m


def test_window_start_reaches_back_to_the_first_leftover_mask():
    g = torch.Generator().manual_seed(1)
    mask_id = 60
    seen = {"leftover": 0, "none": 0}
    for _ in range(60):
        rows, plen = randint(1, 4, g), randint(1, 6, g)
        block, blocks = randint(1, 5, g), randint(1, 4, g)
        x = torch.randint(0, 50, (rows, plen + block * blocks), generator=g)
        start = plen + randint(0, blocks, g) * block
        x[:, start:] = mask_id  # the block and everything after it: not leftovers
        left = torch.rand(x.shape, generator=g) < 0.15
        left[:, :plen] = False
        left[:, start:] = False
        x[left] = mask_id
        columns = left.any(dim=0).nonzero()[:, 0]
        want = int(columns[0]) if len(columns) else start
        seen["leftover" if len(columns) else "none"] += 1
        assert window_start(x, plen, start, mask_id) == want
    assert min(seen.values()) > 5  # both cases were exercised


def test_needs_full_pass_at_block_start_and_every_refresh_steps():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        steps = randint(1, 20, g)
        refresh = randint(1, 8, g)
        got = [i for i in range(steps) if needs_full_pass(i, refresh)]
        assert got == list(range(0, steps, refresh))
        assert [i for i in range(steps) if needs_full_pass(i, None)] == [0]


def test_block_done_iff_the_window_has_no_mask():
    g = torch.Generator().manual_seed(3)
    mask_id = 60
    outcomes = set()
    for _ in range(60):
        x = torch.randint(0, 50, (randint(1, 4, g), 20), generator=g)
        x[torch.rand(x.shape, generator=g) < 0.04] = mask_id
        lo = randint(0, 19, g)
        end = randint(lo + 1, 21, g)
        want = all(int(x[r, j]) != mask_id for r in range(x.shape[0]) for j in range(lo, end))
        assert block_done(x, lo, end, mask_id) == want
        outcomes.add(want)
    assert outcomes == {True, False}


def ends_in_eos(row: list[int], eos: int) -> bool:
    return eos in row and all(t == eos for t in row[row.index(eos) :])


def test_answers_end_in_eos_needs_eos_through_the_block_end_in_every_row():
    g = torch.Generator().manual_seed(4)
    eos, plen = 59, 3
    outcomes = set()
    for _ in range(200):
        rows, end = randint(1, 4, g), plen + randint(1, 9, g)
        x = torch.randint(0, 59, (rows, end + 4), generator=g)
        for r in range(rows):
            first = randint(plen, end + 1, g)  # EOS from here to the block end (none if == end)
            x[r, first:end] = eos
            if torch.rand((), generator=g) < 0.3:  # sometimes a word after the first EOS
                x[r, randint(first, end + 1, g) :][:1] = randint(0, 59, g)
        x[:, end:] = torch.randint(0, 59, (rows, 4), generator=g)  # after the block: ignored
        want = all(ends_in_eos(x[r, plen:end].tolist(), eos) for r in range(rows))
        assert answers_end_in_eos(x, plen, end, eos) == want
        outcomes.add(want)
    assert outcomes == {True, False}


# ------------------------------------------------------------------------------------------
# the window's logits
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [0.0, 1.5])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_window_is_the_model_on_the_canvas(cfg, padded):
    g = torch.Generator().manual_seed(5 + int(padded))
    model = tiny_llada(seed=randint(0, 100, g))
    prompt, mask = left_padded_batch(model, lens=(4, 6), seed=randint(0, 100, g))
    mask = mask if padded else None
    plen, gen_length, mask_id = prompt.shape[1], 12, model.config.mask_token_id
    full_mask = model_mask_of(mask, gen_length)
    for m in (model, LogitsOnly(model)):  # through forward_hidden + lm_head, and logits only
        state = make_state(m, prompt, mask, gen_length=gen_length, cfg_scale=cfg)
        scribble(state, plen, g)
        x = state.x.clone()
        lo = randint(plen, plen + 8, g)
        end = randint(lo + 1, plen + gen_length + 1, g)
        cond, uncond = state.forward_window(lo, end)
        want = model(x, attention_mask=full_mask).logits[:, lo:end]
        torch.testing.assert_close(cond, want, rtol=1e-5, atol=1e-5)
        if cfg == 0:
            assert uncond is None
            continue
        un_x = x.clone()
        un_x[:, :plen] = mask_id  # the prompt (padding included) is masked
        want_u = model(un_x, attention_mask=full_mask).logits[:, lo:end]
        torch.testing.assert_close(uncond, want_u, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cond, uncond, atol=1e-3)


def test_forward_window_forbids_eos_in_the_conditional_logits_only():
    g = torch.Generator().manual_seed(7)
    model = tiny_llada(seed=randint(0, 100, g))
    eos = model.config.eos_token_id
    prompt, _ = left_padded_batch(model, lens=(5, 5), seed=randint(0, 100, g))
    plain = make_state(model, prompt, cfg_scale=1.0)
    forbid = make_state(model, prompt, cfg_scale=1.0, forbid_eos=True)
    cond, uncond = plain.forward_window(5, 9)
    f_cond, f_uncond = forbid.forward_window(5, 9)
    assert (f_cond[..., eos] == float("-inf")).all()
    assert torch.isfinite(f_uncond).all() and torch.equal(f_uncond, uncond)
    others = torch.arange(cond.shape[-1]) != eos
    assert torch.equal(f_cond[..., others], cond[..., others])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_refresh_cache_makes_cached_logits_exact_until_the_canvas_changes(cache, cfg):
    g = torch.Generator().manual_seed(8)
    model = tiny_llada(n_layers=3, seed=randint(0, 100, g))
    prompt, mask = left_padded_batch(model, lens=(6, 3), seed=randint(0, 100, g))
    plen, mask_id = prompt.shape[1], model.config.mask_token_id
    state = make_state(model, prompt, mask, gen_length=12, cache=cache, cfg_scale=cfg)
    scribble(state, plen, g, masked=0.7)
    start, end = plen + 4, plen + 8

    def agree(a, b):
        return all(
            (u is None and v is None) or torch.allclose(u, v, rtol=1e-5, atol=1e-5)
            for u, v in zip(a, b)
        )

    state.refresh_cache()
    hidden = model.forward_hidden(state.inputs(0, state.x.shape[1]), state.model_mask)
    torch.testing.assert_close(state.runner.state["hidden"], hidden, rtol=1e-5, atol=1e-5)
    assert agree(state.cached_window(start, end), state.forward_window(start, end))
    assert agree(state.forward_cached(start, end), state.forward_window(start, end))
    # decode some of the window's masks: the cached keys of the rest are now stale (3 layers)
    window = state.x[:, start:end]
    words = torch.randint(0, 50, window.shape, generator=g)
    window.copy_(torch.where(window == mask_id, words, window))
    assert not agree(state.forward_cached(start, end), state.forward_window(start, end))
    assert not agree(state.cached_window(start, end), state.forward_window(start, end))
    state.refresh_cache()
    assert agree(state.forward_cached(start, end), state.forward_window(start, end))
    assert agree(state.cached_window(start, end), state.forward_window(start, end))


# ------------------------------------------------------------------------------------------
# the remask
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"remasking": "margin"},
        {"remasking": "entropy", "cfg_scale": 0.5},
        {"temperature": 0.7},
        {"remasking": "random", "random_source": "philox"},
        {"threshold": 0.05},
    ],
)
def test_remask_step_is_lx_remask_on_the_window(opts):
    g = torch.Generator().manual_seed(9)
    model = tiny_llada(seed=randint(0, 100, g))
    prompt, _ = left_padded_batch(model, lens=(4, 4, 4), seed=randint(0, 100, g))
    plen, vocab, mask_id = prompt.shape[1], model.config.vocab_size, model.config.mask_token_id
    state = make_state(model, prompt, gen_length=12, generator=torch.Generator(), **opts)
    scribble(state, plen, g)
    start, end = plen + randint(0, 4, g), plen + randint(6, 13, g)
    cond = 3 * torch.randn(3, end - start, vocab, generator=g)
    uncond = 3 * torch.randn(3, end - start, vocab, generator=g) if "cfg_scale" in opts else None
    k = torch.randint(1, end - start + 1, (3,), generator=g)
    state.nt.copy_(k)
    before = state.x.clone()
    seed = randint(0, 1000, g)
    state.o.generator.manual_seed(seed)
    conf = state.remask(cond, uncond, start, end)
    want_x, _, want_conf = lx.remask(
        cond,
        before,
        k,
        mask_id=mask_id,
        offset=start,
        strategy=opts.get("remasking", "low_confidence"),
        temperature=opts.get("temperature", 0.0),
        threshold=opts.get("threshold"),
        generator=torch.Generator().manual_seed(seed),
        uncond_logits=uncond,
        cfg_scale=opts.get("cfg_scale", 0.0),
        return_details=True,
    )
    assert torch.equal(state.x, want_x) and torch.equal(conf, want_conf)
    # only masks of the window were decoded, at least min(k, #candidates) of them per row
    changed = state.x != before
    assert not changed[:, :start].any() and not changed[:, end:].any()
    assert (before[changed] == mask_id).all()
    candidates = (before[:, start:end] == mask_id).sum(dim=1)
    assert (changed.sum(dim=1) >= torch.minimum(k, candidates)).all()
    assert changed.any()


def test_torch_selection_with_a_tiny_factor_is_the_kernel_selection():
    """The factor rule takes at least one token; with k >= 1 in every row a factor too small
    to add any token leaves the PyTorch selection path with the kernel's choice."""
    g = torch.Generator().manual_seed(10)
    model = tiny_llada(seed=randint(0, 100, g))
    prompt, _ = left_padded_batch(model, lens=(5, 5, 5, 5), seed=randint(0, 100, g))
    plen, vocab = prompt.shape[1], model.config.vocab_size
    kernel = make_state(model, prompt, gen_length=8)
    torch_path = make_state(model, prompt, gen_length=8, factor=1e-9)
    assert torch_path.o.torch_select and not kernel.o.torch_select
    scribble(kernel, plen, g, masked=0.8)
    torch_path.x.copy_(kernel.x)
    cond = 4 * torch.randn(4, 8, vocab, generator=g)
    k = torch.randint(1, 5, (4,), generator=g)
    kernel.nt.copy_(k)
    torch_path.nt.copy_(k)
    conf_k = kernel.remask(cond, None, plen, plen + 8)
    conf_t = torch_path.remask(cond, None, plen, plen + 8)
    assert torch.equal(torch_path.x, kernel.x)
    torch.testing.assert_close(conf_t, conf_k)


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_zero_eos_confidence_demotes_end_predictions_and_renormalises_the_rest(cfg):
    g = torch.Generator().manual_seed(11)
    model = tiny_llada(seed=randint(0, 100, g))
    eos, eot = model.config.eos_token_id, 7
    prompt, _ = left_padded_batch(model, lens=(4, 4, 4), seed=randint(0, 100, g))
    plen, vocab, mask_id = prompt.shape[1], model.config.vocab_size, model.config.mask_token_id
    state = make_state(
        model, prompt, gen_length=8, zero_eos_confidence=True, eot_id=eot, cfg_scale=cfg
    )
    scribble(state, plen, g, masked=0.8)
    cond = 2 * torch.randn(3, 8, vocab, generator=g)
    ends = torch.rand(3, 8, generator=g) < 0.4  # make EOS or EoT the prediction here
    cond[..., eos] += torch.where(ends, 20.0, 0.0) * (torch.rand(3, 8, generator=g) < 0.5)
    cond[..., eot] += torch.where(ends & (cond[..., eos] < 10), 20.0, 0.0)
    uncond = 2 * torch.randn(3, 8, vocab, generator=g) if cfg else None
    k = torch.randint(0, 9, (3,), generator=g)
    state.nt.copy_(k)
    before = state.x.clone()
    conf = state.remask(cond, uncond, plen, plen + 8)
    logits = cond.double()
    if uncond is not None:
        logits = uncond.double() + (cfg + 1) * (logits - uncond.double())
    p = F.softmax(logits, dim=-1)
    x0 = logits.argmax(dim=-1)
    candidates = before[:, plen:] == mask_id
    is_end = (x0 == eos) | (x0 == eot)
    p_x0 = p.gather(-1, x0[..., None])[..., 0]
    want = p_x0 / (1 - p[..., eos] - p[..., eot])
    want = torch.where(is_end, DEMOTED, want)
    want = torch.where(candidates, want, float("-inf")).float()
    torch.testing.assert_close(conf, want, rtol=1e-4, atol=1e-6)
    assert (candidates & is_end).any() and (candidates & ~is_end).any()
    take = select_transfer(conf, k)
    assert torch.equal(state.x[:, plen:], torch.where(take, x0, before[:, plen:]))


# ------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------
class _FrozenEager(SamplerGraphs):
    """Runs units eagerly but, like recorded graphs, makes random selections run after them."""

    @property
    def freezes_randomness(self):
        return True


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("frozen", [False, True])
def test_step_is_the_window_forward_then_the_remask(cache, frozen):
    g = torch.Generator().manual_seed(12)
    model = tiny_llada(n_layers=3, seed=randint(0, 100, g))
    prompt, mask = left_padded_batch(model, lens=(6, 4), seed=randint(0, 100, g))
    plen = prompt.shape[1]
    kw = dict(gen_length=12, cache=cache, cfg_scale=0.5, temperature=0.6)
    runner = _FrozenEager(capture=False) if frozen else SamplerGraphs(capture=False)
    state = make_state(model, prompt, mask, runner=runner, generator=torch.Generator(), **kw)
    manual = make_state(model, prompt, mask, generator=torch.Generator(), **kw)
    assert state.select_in_unit is not frozen
    scribble(state, plen, g, masked=0.8)
    manual.x.copy_(state.x)
    start, end = plen + 4, plen + 8
    for i, full in enumerate((True, False, False)):
        k = torch.randint(1, 3, (2,), generator=g)
        seed = randint(0, 1000, g)
        state.o.generator.manual_seed(seed)
        manual.o.generator.manual_seed(seed)
        conf = state.step(1, start, end, k, full)
        manual.nt.copy_(k)
        if cache == "none":
            logits = manual.forward_window(start, end)
        elif full:
            manual.refresh_cache()
            logits = manual.cached_window(start, end)
        else:
            logits = manual.forward_cached(start, end)
        want_conf = manual.remask(*logits, start, end)
        assert torch.equal(state.x, manual.x), i
        assert torch.equal(conf, want_conf), i
    assert (state.x[:, start:end] != model.config.mask_token_id).any()


# ------------------------------------------------------------------------------------------
# options and prompt checks
# ------------------------------------------------------------------------------------------
def test_options_fill_in_model_ids_and_derive_the_switches():
    model = tiny_llada(seed=13)
    c = model.config
    base = check_options(model)
    assert (base.mask_id, base.eos_id, base.eot_id) == (c.mask_token_id, None, None)
    assert not (base.use_cfg or base.torch_select or base.random_draws or base.early_exit)
    eos = check_options(model, zero_eos_confidence=True)
    assert (eos.eos_id, eos.eot_id) == (c.eos_token_id, c.eos_token_id)  # no EoT: EOS twice
    assert eos.torch_select
    assert check_options(model, remasking="random").torch_select
    philox = check_options(model, remasking="random", random_source="philox")
    assert philox.random_draws and not philox.torch_select
    assert check_options(model, threshold=0.3).early_exit
    assert not check_options(model, threshold=0.3).torch_select
    factor = check_options(model, factor=0.5)
    assert factor.early_exit and factor.torch_select
    assert check_options(model, cfg_scale=0.1).use_cfg
    # the generator is not part of the graph key; every setting is
    a = check_options(model, generator=torch.Generator().manual_seed(1))
    assert a.key() == base.key() and a == base
    assert check_options(model, temperature=0.5).key() != base.key()


def test_check_options_has_the_names_and_defaults_of_generate():
    """lx.generate forwards its sampling options by name: the two signatures must agree."""
    opts = inspect.signature(check_options).parameters
    gen = inspect.signature(lx.generate).parameters
    shared = [name for name in opts if name != "model"]
    assert len(shared) == 16
    for name in shared:
        assert gen[name].default == opts[name].default, name


def test_check_prompt_extends_the_mask_and_refuses_masks_in_the_prompt():
    g = torch.Generator().manual_seed(14)
    model = tiny_llada(seed=14)
    prompt, mask = left_padded_batch(model, lens=(3, 5, 1), seed=randint(0, 100, g))
    gen_length = randint(1, 9, g)
    assert check_prompt(prompt, 60, None, gen_length) is None
    out = check_prompt(prompt, 60, mask.to(torch.int32), gen_length)
    assert out.dtype == torch.int32 and out.shape == (3, 5 + gen_length)
    assert torch.equal(out[:, :5], mask.to(torch.int32)) and (out[:, 5:] == 1).all()
    row = randint(0, 3, g)
    prompt[row, -1] = 60
    with pytest.raises(ValueError, match=rf"prompt_ids contains mask_id 60 \(rows \[{row}\]\)"):
        check_prompt(prompt, 60, mask, gen_length)
