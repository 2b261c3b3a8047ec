"""The opt-in speed features of lx.generate: the prefix and dual KV caches and their refresh
rule, the confidence threshold, the factor rule and ``select_transfer``, the EOS early stop, the
per-step callback, and the CUDA graph units (run through static buffers and replayed without a
GPU; recorded on one). Each is held to the plain sampler or to its rule written out here;
test_sampling.py holds the plain sampler to the public LLaDA one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_llada

import llada_ext as lx
from llada_ext.sampling import SamplerGraphs, factor_count, select_transfer

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------
# opt-in speed features
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
