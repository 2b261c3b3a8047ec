"""Parallel confidence remasking (lx.remask / lx.remask_).

The reference is the public LLaDA sampler's step (``generate.py``: add_gumbel_noise,
argmax, softmax + gather, -inf outside the masked window, per-row topk, transfer),
reimplemented line by line below, with its random numbers replaced by the library's
counter-based Philox streams, which ``philox_uniform`` reproduces bit for bit in numpy.
Held to it: greedy and Gumbel steps, low-precision logits, the LLaDA vocabulary; held to
float64 references: the margin and entropy strategies, the threshold and CFG. Ties, selection
sizes, the returned details, the in-place variant and the argument checks are in
test_remask_selection.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llada_ext as lx

STRATEGIES = ("low_confidence", "random", "margin", "entropy")

# ---------------------------------------------------------------------------------------
# Philox4x32-10 in numpy (csrc/common/philox.h), bit-exact
# ---------------------------------------------------------------------------------------

STREAM_GUMBEL = 0
STREAM_RANDOM = 1
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on uint64 arrays holding 32-bit words."""
    for _ in range(10):
        p0 = _M0 * c0  # a 32 x 32 -> 64-bit product: exact in uint64
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _LO32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _LO32,
        )
        k0 = (k0 + _W0) & _LO32
        k1 = (k1 + _W1) & _LO32
    return c0, c1, c2, c3


def philox_uniform(seed: int, stream: int, index) -> np.ndarray:
    """float64 uniforms in (0, 1) of the given indices of a stream: counter index >> 1,
    half index & 1, 53 bits from two words, (bits + 0.5) * 2**-53, clamped below 1."""
    index = np.asarray(index, dtype=np.uint64)
    ctr = index >> np.uint64(1)
    shape = index.shape
    seed = int(seed) & ((1 << 64) - 1)
    r0, r1, r2, r3 = philox4x32_10(
        ctr & _LO32,
        ctr >> np.uint64(32),
        np.full(shape, stream, dtype=np.uint64),
        np.zeros(shape, dtype=np.uint64),
        np.full(shape, seed & 0xFFFFFFFF, dtype=np.uint64),
        np.full(shape, seed >> 32, dtype=np.uint64),
    )
    odd = (index & np.uint64(1)).astype(bool)
    a = np.where(odd, r2, r0)
    b = np.where(odd, r3, r1)
    bits = ((a >> np.uint64(5)) << np.uint64(26)) | (b >> np.uint64(6))
    u = (bits.astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    return np.minimum(u, np.nextafter(1.0, 0.0))


def seed_of(generator_seed: int) -> int:
    """The Philox seed lx.remask draws from ``torch.Generator().manual_seed(generator_seed)``."""
    g = torch.Generator().manual_seed(generator_seed)
    return int(torch.randint(0, 2**62, (1,), generator=g).item())


def gumbel_noise(seed: int, B: int, W: int, V: int) -> torch.Tensor:
    """float64 [B, W, V] Gumbel noise -log(-log(u)), u of index (b * W + j) * V + v."""
    u = philox_uniform(seed, STREAM_GUMBEL, np.arange(B * W * V, dtype=np.uint64))
    return torch.from_numpy(-np.log(-np.log(u))).reshape(B, W, V)


def random_confidence(seed: int, B: int, W: int) -> torch.Tensor:
    """float32 [B, W] uniforms of the "random" strategy (index b * W + j)."""
    u = philox_uniform(seed, STREAM_RANDOM, np.arange(B * W, dtype=np.uint64))
    return torch.from_numpy(u).reshape(B, W).float()


def test_python_philox_matches_known_answer():
    """Random123's published known-answer vectors for Philox4x32-10."""
    z = np.zeros(1, dtype=np.uint64)
    out = philox4x32_10(z, z, z, z, z, z)
    assert [int(o[0]) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = np.full(1, 0xFFFFFFFF, dtype=np.uint64)
    out = philox4x32_10(f, f, f, f, f, f)
    assert [int(o[0]) for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


# ---------------------------------------------------------------------------------------
# the LLaDA sampler step, line by line (generate.py), on full-length logits
# ---------------------------------------------------------------------------------------


def add_gumbel_noise(logits: torch.Tensor, temperature: float, noise: torch.Tensor):
    """generate.py's add_gumbel_noise with its torch.rand_like uniforms passed in."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def llada_step(
    logits_full,
    x,
    mask_id,
    block_start,
    block_end,
    num_transfer,
    remasking,
    x0_p_random=None,
    logits_with_noise=None,
):
    """One step of generate.py's inner loop. logits_full [B, L, V]; the window is
    [block_start, block_end). generate.py marks x0_p = -inf from block_end on; positions
    before the block are never masked there, here they may be, so they get -inf too."""
    mask_index = x == mask_id
    if logits_with_noise is None:
        logits_with_noise = logits_full
    x0 = torch.argmax(logits_with_noise, dim=-1)  # b, l
    if remasking == "low_confidence":
        p = F.softmax(logits_full, dim=-1)
        x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    elif remasking == "random":
        x0_p = x0_p_random
    else:
        raise NotImplementedError(remasking)
    x0_p[:, block_end:] = -np.inf
    x0_p[:, :block_start] = -np.inf
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    # As in generate.py, k never exceeds the block's masked tokens (topk's pick among -inf
    # entries is unspecified), so the test data must respect that.
    assert all(
        int(num_transfer[j]) <= int((confidence[j] > -np.inf).sum())
        for j in range(confidence.shape[0])
    )
    transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer_index[j, select_index] = True
    x = x.clone()
    x[transfer_index] = x0[transfer_index]
    return x, x0, confidence


def embed_window(logits_win: torch.Tensor, L: int, offset: int) -> torch.Tensor:
    """[B, L, V] logits holding logits_win at [offset, offset + W) and noise elsewhere."""
    B, W, V = logits_win.shape
    full = torch.randn(B, L, V, dtype=logits_win.dtype) * 5
    full[:, offset : offset + W] = logits_win
    return full


def llada_window_step(logits_win, x, mask_id, offset, num_transfer, remasking, **kwargs):
    """llada_step with logits_win [B, W, V] as the predictions for the window
    [offset, offset + W) of x (noise elsewhere); returns the new x and, of the window only,
    x0 and the confidence, the shapes lx.remask returns."""
    W = logits_win.shape[1]
    full = embed_window(logits_win, x.shape[1], offset)
    x_new, x0, conf = llada_step(
        full, x, mask_id, offset, offset + W, num_transfer, remasking, **kwargs
    )
    return x_new, x0[:, offset : offset + W], conf[:, offset : offset + W]


def remask_on(device, logits, x, num_transfer, mask_id, offset=0, **kwargs):
    """lx.remask with return_details on `device` (every tensor argument moved there), the
    results back on the CPU; it also checks that the x passed in is left untouched."""

    def to(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    x_before = x.clone()
    x_dev = x.to(device)
    kwargs = {key: to(value) for key, value in kwargs.items()}
    kwargs.update(mask_id=mask_id, offset=offset, return_details=True)
    out = lx.remask(to(logits), x_dev, to(num_transfer), **kwargs)
    assert torch.equal(x_dev.cpu(), x_before)  # input untouched
    return tuple(t.cpu() for t in out)


def make_x(B, L, mask_id, V, mask_frac, generator=None):
    """int64 [B, L]: random tokens (never mask_id) with about mask_frac of them masked."""
    x = torch.randint(0, V - 1, (B, L))
    x = torch.where(x >= mask_id, x + 1, x)
    x[torch.rand(B, L) < mask_frac] = mask_id
    return x


def ranked_select(x, x0, conf, cand, offset, k, threshold=None):
    """x with each row's selection applied: candidates ranked by conf (higher first, then
    lower position); the top min(k_b, #cand) and, with a threshold, all with conf > threshold."""
    out = x.clone()
    B, W = conf.shape
    for b in range(B):
        js = [j for j in range(W) if cand[b, j]]
        js.sort(key=lambda j: (-float(conf[b, j]), j))
        n = max(0, min(int(k[b]), len(js)))
        if threshold is not None:
            n = max(n, sum(1 for j in js if float(conf[b, j]) > threshold))
        for j in js[:n]:
            out[b, offset + j] = x0[b, j]
    return out


# ---------------------------------------------------------------------------------------
# exact agreement with the LLaDA step
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("B,L,W,offset,V", [(3, 40, 16, 9, 301), (2, 24, 24, 0, 1000)])
def test_matches_llada_step_temperature0(device, remasking, B, L, W, offset, V):
    mask_id = V - 3
    logits = torch.randn(B, W, V) * 2
    x = make_x(B, L, mask_id, V, 0.6)
    x[0, offset : offset + W] = mask_id  # a fully masked row beside partly masked ones
    num_transfer = torch.tensor([5, 2, 7][:B])
    seed_gen = 77
    seed = seed_of(seed_gen)
    rand = torch.rand(B, L)  # positions outside the window: -inf anyway
    rand[:, offset : offset + W] = random_confidence(seed, B, W)
    ref_x, ref_x0, ref_conf = llada_window_step(
        logits, x, mask_id, offset, num_transfer, remasking, x0_p_random=rand
    )
    gen = torch.Generator().manual_seed(seed_gen)
    out, x0, conf = remask_on(
        device, logits, x, num_transfer, mask_id, offset, strategy=remasking, generator=gen
    )
    assert torch.equal(out, ref_x)
    assert torch.equal(x0, ref_x0)
    torch.testing.assert_close(conf, ref_conf.float(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_gumbel_path_is_exact(device, temperature, remasking):
    B, L, W, offset, V = 2, 30, 20, 6, 257
    mask_id = 5
    logits = torch.randn(B, W, V) * 3
    x = make_x(B, L, mask_id, V, 0.7)
    num_transfer = torch.tensor([4, 9])
    seed = seed_of(2024)
    t32 = float(np.float32(temperature))  # the kernel's temperature is float32
    G = gumbel_noise(seed, B, W, V)
    keys = logits.double() / t32 + G
    # generate.py's form exp(l) / (-log u)^T ranks tokens the same way.
    u = np.exp(-np.exp(-G.numpy()))
    noisy = add_gumbel_noise(logits, t32, torch.from_numpy(u))
    assert torch.equal(noisy.argmax(-1), keys.argmax(-1))

    full_keys = torch.full((B, L, V), -np.inf, dtype=torch.float64)
    full_keys[:, offset : offset + W] = keys
    rand = torch.zeros(B, L)
    rand[:, offset : offset + W] = random_confidence(seed, B, W)
    ref_x, ref_x0, _ = llada_window_step(
        logits,
        x,
        mask_id,
        offset,
        num_transfer,
        remasking,
        x0_p_random=rand,
        logits_with_noise=full_keys,
    )
    sampling = dict(strategy=remasking, temperature=temperature)
    gen = torch.Generator().manual_seed(2024)
    out, x0, conf = remask_on(
        device, logits, x, num_transfer, mask_id, offset, generator=gen, **sampling
    )
    assert torch.equal(x0, ref_x0)
    assert torch.equal(out, ref_x)
    if remasking == "low_confidence":  # untempered softmax at the sampled token
        cand = x[:, offset : offset + W] == mask_id
        p = torch.softmax(logits.double(), -1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(conf[cand].double(), p[cand], rtol=2e-6, atol=1e-9)


def test_gumbel_depends_on_the_generator(device):
    logits = torch.randn(1, 64, 50).to(device)
    x = torch.full((1, 64), 7).to(device)
    runs = [
        lx.remask(
            logits,
            x,
            3,
            mask_id=7,
            temperature=1.0,
            return_details=True,
            generator=torch.Generator().manual_seed(s),
        )[1].cpu()
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_low_precision_logits(device, dtype, temperature):
    B, L, W, offset, V = 2, 20, 12, 4, 3001
    mask_id = 0
    logits = (torch.randn(B, W, V) * 3).to(dtype)
    x = make_x(B, L, mask_id, V, 0.8)
    num_transfer = torch.tensor([3, 5])
    up = logits.double()  # exact upcast of the stored values
    if temperature > 0:
        keys = up / temperature + gumbel_noise(seed_of(3), B, W, V)
    else:
        keys = up
    gen = torch.Generator().manual_seed(3)
    out, x0, conf = remask_on(
        device, logits, x, num_transfer, mask_id, offset, temperature=temperature, generator=gen
    )
    cand = x[:, offset : offset + W] == mask_id
    ref_x0 = torch.where(cand, keys.argmax(-1), x[:, offset : offset + W])
    assert torch.equal(x0, ref_x0)
    p = torch.softmax(up, -1).gather(-1, ref_x0.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(conf[cand].double(), p[cand], rtol=2e-6, atol=1e-9)
    assert torch.equal(out, ranked_select(x, ref_x0, conf, cand, offset, num_transfer))


def test_llada_vocabulary(device):
    """V = 126464 on a few positions, float32 and bfloat16."""
    B, L, W, V = 2, 6, 4, 126464
    mask_id = 126336
    logits = torch.randn(B, W, V) * 4
    x = torch.full((B, L), mask_id)
    x[1, 3] = 11
    k = torch.tensor([2, 1])
    ref_x, ref_x0, _ = llada_window_step(logits, x, mask_id, 1, k, "low_confidence")
    out, x0, conf = remask_on(device, logits, x, k, mask_id, 1)
    assert torch.equal(out, ref_x) and torch.equal(x0, ref_x0)
    # Against float64: over this many terms a float32 softmax (torch's too) drifts ~1e-5.
    cand = x[:, 1 : 1 + W] == mask_id
    p64 = torch.softmax(logits.double(), -1).amax(-1)
    torch.testing.assert_close(conf[cand].double(), p64[cand], rtol=2e-6, atol=0)
    lb = logits.bfloat16()
    x0b = remask_on(device, lb, x, 2, mask_id, 1)[1]
    assert torch.equal(x0b[cand], lb.float().argmax(-1)[cand])


# ---------------------------------------------------------------------------------------
# margin, entropy, threshold, CFG
# ---------------------------------------------------------------------------------------


def ref_confidence(logits: torch.Tensor, strategy: str) -> torch.Tensor:
    """float64 [B, W] confidence of every position for "margin" and "entropy"."""
    p = torch.softmax(logits.double(), dim=-1)
    if strategy == "margin":
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return torch.special.xlogy(p, p).sum(-1)  # minus the entropy


@pytest.mark.parametrize("strategy", ["margin", "entropy"])
def test_margin_and_entropy(device, strategy):
    B, L, W, offset, V = 3, 50, 33, 11, 4099
    mask_id = 17
    logits = torch.randn(B, W, V) * torch.rand(B, W, 1) * 6
    logits[0, 0, :] = float("-inf")  # a sharply peaked row with banned tokens
    logits[0, 0, 5] = 2.0
    logits[0, 0, 9] = 1.0
    x = make_x(B, L, mask_id, V, 0.5)
    x[0, offset] = mask_id
    num_transfer = torch.tensor([6, 0, 40])
    out, x0, conf = remask_on(device, logits, x, num_transfer, mask_id, offset, strategy=strategy)
    win = x[:, offset : offset + W]
    cand = win == mask_id
    ref_x0 = torch.where(cand, logits.argmax(-1), win)
    assert torch.equal(x0, ref_x0)
    ref = ref_confidence(logits, strategy)
    torch.testing.assert_close(conf[cand].double(), ref[cand], rtol=1e-5, atol=2e-6)
    assert bool((conf[~cand] == float("-inf")).all())
    assert torch.equal(out, ranked_select(x, ref_x0, ref, cand, offset, num_transfer))


@pytest.mark.parametrize("strategy", ["low_confidence", "margin"])
def test_threshold(device, strategy):
    B, L, W, offset, V = 4, 40, 32, 3, 500
    mask_id = 499
    logits = torch.randn(B, W, V) * torch.rand(B, W, 1) * 8
    logits[..., mask_id] = float("-inf")  # every transfer then changes x
    x = make_x(B, L, mask_id, V, 0.7)
    num_transfer = torch.tensor([1, 3, 0, 30])
    _, _, conf0 = lx.remask(
        logits, x, 0, mask_id=mask_id, offset=offset, strategy=strategy, return_details=True
    )
    cand = x[:, offset : offset + W] == mask_id
    tau = float(conf0[cand].median())  # some rows gain tokens from it, some from k
    out, x0, conf = remask_on(
        device, logits, x, num_transfer, mask_id, offset, strategy=strategy, threshold=tau
    )
    assert torch.equal(out, ranked_select(x, x0, conf, cand, offset, num_transfer, threshold=tau))
    changed = out != x
    n_above = ((conf > tau) & cand).sum(1)
    expected = torch.maximum(n_above, torch.minimum(num_transfer, cand.sum(1)))
    assert torch.equal(changed.sum(1), expected)
    assert bool((n_above > num_transfer).any()) and bool((n_above < num_transfer).any())


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5, 3.0])
def test_cfg_combine(device, cfg_scale):
    B, L, W, offset, V = 2, 20, 10, 10, 777
    mask_id = 1
    cond = torch.randn(B, W, V) * 2
    uncond = torch.randn(B, W, V) * 2
    x = make_x(B, L, mask_id, V, 0.9)
    num_transfer = torch.tensor([2, 3])
    # generate.py: logits = un_logits + (cfg_scale + 1) * (logits - un_logits), in float32
    combined = uncond + (cfg_scale + 1) * (cond - uncond)
    ref_x, ref_x0, ref_conf = llada_window_step(
        combined, x, mask_id, offset, num_transfer, "low_confidence"
    )
    cfg = dict(uncond_logits=uncond, cfg_scale=cfg_scale)
    out, x0, conf = remask_on(device, cond, x, num_transfer, mask_id, offset, **cfg)
    assert torch.equal(out, ref_x) and torch.equal(x0, ref_x0)
    torch.testing.assert_close(conf, ref_conf.float(), rtol=2e-6, atol=0)
    # The Gumbel path sees the same combined logits.
    gen = torch.Generator().manual_seed(5)
    g_out = remask_on(
        device, cond, x, num_transfer, mask_id, offset, temperature=1.0, generator=gen, **cfg
    )[1]
    keys = combined.double() + gumbel_noise(seed_of(5), B, W, V)
    cand = x[:, offset : offset + W] == mask_id
    assert torch.equal(g_out[cand], keys.argmax(-1)[cand])


def test_cfg_combine_rounds_every_operation(device):
    """u + w * (c - u) with w * d rounded before the add (as PyTorch computes it), not fused.

    Token 0 holds c = u = r, the separately rounded combination of token A's (c, u), so the
    two tie and the lower id wins; a fused multiply-add would round token A above r."""
    rng = np.random.default_rng(0)
    cfg = np.float32(1.5)
    w = np.float32(cfg + np.float32(1))
    pairs = []
    while len(pairs) < 6:
        c, u = (rng.standard_normal(2) * 4).astype(np.float32)
        d = np.float32(c - u)
        rounded = np.float32(u + np.float32(w * d))
        fused = np.float32(np.float64(u) + np.float64(w) * np.float64(d))  # w * d exact
        if fused > rounded:
            pairs.append((c, u, rounded))
    W, V = len(pairs), 37
    cond = torch.full((1, W, V), -100.0)
    uncond = torch.full((1, W, V), -100.0)
    for j, (c, u, r) in enumerate(pairs):
        a = 11 if j % 2 else 35  # inside the vector body and in the scalar tail
        cond[0, j, 0] = uncond[0, j, 0] = float(r)
        cond[0, j, a], uncond[0, j, a] = float(c), float(u)
    x = torch.zeros(1, W, dtype=torch.int64) + 5
    _, x0, conf = lx.remask(
        cond.to(device),
        x.to(device),
        0,
        mask_id=5,
        uncond_logits=uncond.to(device),
        cfg_scale=float(cfg),
        return_details=True,
    )
    assert bool((x0.cpu() == 0).all())
    torch.testing.assert_close(conf.cpu(), torch.full((1, W), 0.5), rtol=1e-6, atol=0)
