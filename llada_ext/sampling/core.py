"""LLaDA's reverse process (Alg. 4 of the paper): block-wise parallel decoding by remasking.

:func:`generate` with its defaults is the public LLaDA ``generate.py`` sampler: the answer
starts fully masked; it is decoded in blocks of ``block_length`` from left to right with
``steps // num_blocks`` steps per block; at every step the model predicts all masked tokens
of the current block and the ``k`` most confident ones are kept, where the per-row schedule
``k`` spreads the block's masks evenly over its steps (``base = m // steps``, the first
``m % steps`` steps take one more). Classifier-free guidance runs a second, unconditional
pass with the prompt masked and combines ``l = u + (cfg + 1) * (c - u)``. The step itself is
one :func:`llada_ext.remask_` call, fed with the logits of the current block only (the LM
head runs on the block's hidden states, not on the whole sequence).

Exact options (the output stays what the reference would give with the same change):

- ``forbid_eos``: the EOS logit is set to -inf before the prediction (the reference's
  ``logits_eos_inf``), so no position predicts EOS.
- ``zero_eos_confidence``: candidates whose prediction is EOS or end-of-turn rank below every
  other candidate (they are unmasked only when the schedule needs them, lower positions
  first); with ``"low_confidence"`` the other candidates' confidence is their probability
  among the tokens other than EOS and EoT. At temperature 0 this selects what the
  reference's ``confidence_eos_eot_inf`` selects, except in one case: when a step must unmask
  more EOS/EoT candidates than it keeps, the reference picks among them (all at confidence 0)
  in ``torch.topk``'s order for equal values, which is not specified; here the lower positions
  go first. The selected non-EOS tokens and their order are the same. At temperature > 0 the
  reference's switch edits the noisy copy of the logits for EOS, so EOS predictions keep
  their confidence there, which this option fixes.
- ``random_source="torch"`` (default) draws the confidences of ``remasking="random"`` with
  ``torch.rand`` over the whole sequence, as the reference does, so a seeded run gives the
  reference's tokens; ``"philox"`` uses the kernel's device-independent Philox stream instead.
- ``callback(step, x, confidence)`` after every step, to watch the canvas fill in.

Opt-in speed features (approximate unless stated; all off by default):

- ``cache="prefix"`` / ``"dual"``: block-level key/value caching in the style of Fast-dLLM.
  At the first step of every block (and every ``cache_refresh`` steps, if given) the whole
  sequence runs once and every layer's keys (after RoPE) and values are kept. The other steps
  recompute only ``x[:, block_start:]`` (prefix cache: the prompt and the finished blocks are
  read from the cache) or only the block itself (dual cache: the still-masked suffix is read
  from the cache too), with the block's queries attending to the whole cached sequence through
  :func:`llada_ext.attention`. *Approximation*: attention is non-causal, so the cached
  keys/values of position j depend on every token of the sequence; those of the cached part are
  not updated when tokens of the current block are decoded during the block's later steps.
  ``cache_refresh=1`` refreshes at every step, which is exact (and as slow as no cache).
- ``threshold=tau``: confidence-threshold parallel decoding (Fast-dLLM): each step also
  unmasks every candidate whose confidence exceeds ``tau`` (still at least the scheduled
  ``k``), and a block ends as soon as it has no mask left, saving the remaining steps.
  ``factor=f``: Fast-dLLM's factor rule instead: the ``n`` most confident candidates are
  unmasked for the largest ``n`` with ``c_i >= 1 - f / (i + 1)`` for all ranks ``i <= n``.
  Use ``steps = gen_length`` (k = 1) for the usual "one or more tokens per step" behaviour.
- ``cuda_graphs=True``: every step is replayed from CUDA graphs (see
  :mod:`llada_ext.sampling.graphs`); same tokens as the eager sampler.
- ``eos_early_stop=True``: after a block is finished, if in every row the answer so far holds
  an EOS followed only by EOS up to the end of the block, the remaining blocks are filled with
  EOS and the loop stops. This is what an SFT-trained LLaDA (whose answers are padded with
  EOS) predicts there; it is an approximation of running the remaining blocks.

A prediction may be the mask token itself; that position then stays masked. As in the
reference, such a leftover stays a candidate in the following blocks: their window (logits,
remask, cache recomputation) then starts at the first leftover instead of the block start.

The step itself never waits on the host (no ``.item()``, no data-dependent shapes), so it can
be captured in a CUDA graph. Only loop control reads device values: the leftover check (once
per block), the early block exit of ``threshold`` / ``factor`` (once per step) and
``eos_early_stop`` (once per block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..model import config_token_id, model_device, warn_if_too_long
from .graphs import SamplerGraphs
from .select import DEMOTED, select_transfer

__all__ = ["check_schedule", "generate", "get_num_transfer_tokens", "left_pad"]

REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")
RANDOM_SOURCES = ("torch", "philox")
_REMASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def get_num_transfer_tokens(block_mask: Tensor, steps: int) -> Tensor:
    """Per-row number of tokens to unmask at each step of a block.

    Parameters
    ----------
    block_mask : Tensor
        bool [B, W], True where the block is masked.
    steps : int
        Steps for this block.

    Returns
    -------
    Tensor
        int64 [B, steps]: ``m // steps`` everywhere plus one in the first ``m % steps``
        steps, where ``m`` is the row's number of masks (the public LLaDA schedule).
    """
    mask_num = block_mask.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    step_idx = torch.arange(steps, device=block_mask.device)[None, :]
    return (base + (step_idx < remainder).to(base.dtype)).to(torch.int64)


# ------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------
def _as_2d_ids(t: object, name: str, device: torch.device) -> Tensor:
    if isinstance(t, (list, tuple)):
        t = torch.tensor(t, dtype=torch.int64)
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{name} must be an int64 tensor [B, P] (or a list of ints), got {type(t).__name__}"
        )
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, P] with B >= 1, got {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} is empty: the prompt needs at least one token")
    return t.to(device=device, dtype=torch.int64)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _finite_float(value: object, name: str, *, minimum: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        value = float(value)
        ok = value == value and abs(value) != float("inf")
        if ok and minimum is not None:
            ok = value >= minimum
    if not ok:
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite float{bound}, got {value!r}")
    return value


# Largest gen_length and steps a generation accepts: far beyond any use, small enough that an
# absurd value is refused before any tensor of that size is allocated.
MAX_SCHEDULE = 1 << 20


def check_schedule(gen_length: object, steps: object, block_length: object) -> int:
    """Check the block layout of a generation; return the steps per block.

    Parameters
    ----------
    gen_length, steps, block_length : int
        As for :func:`generate`: positive, ``block_length`` divides ``gen_length`` and the
        number of blocks divides ``steps``.

    Returns
    -------
    int
        ``steps // (gen_length // block_length)``.
    """
    gen_length = _positive_int(gen_length, "gen_length")
    steps = _positive_int(steps, "steps")
    block_length = _positive_int(block_length, "block_length")
    for value, name in ((gen_length, "gen_length"), (steps, "steps")):
        if value > MAX_SCHEDULE:
            raise ValueError(f"{name} ({value}) is beyond the supported maximum {MAX_SCHEDULE}")
    if gen_length % block_length != 0:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks "
            f"gen_length // block_length = {num_blocks}"
        )
    return steps // num_blocks


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Batch prompts of different lengths the way :func:`generate` expects them.

    Parameters
    ----------
    prompts : sequence of sequences of int
        Token ids, one prompt per row.
    pad_id : int
        Id written into the padding (never attended; EOS is the usual choice).

    Returns
    -------
    ids : Tensor
        int64 [B, P], each prompt right-aligned, ``P`` the longest prompt.
    attention_mask : Tensor
        int64 [B, P], 1 on real tokens, 0 on padding.
    """
    width = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.int64)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------
# the sampler
# ------------------------------------------------------------------------------------------
class _Decoder:
    """One generation's state and its step units (eager or through :class:`SamplerGraphs`)."""

    def __init__(self, model: torch.nn.Module, opts: dict[str, Any], runner: SamplerGraphs):
        self.model = model
        self.o = opts
        self.runner = runner
        s = runner.static
        self.x, self.nt, self.zero = s["x"], s["nt"], s["zero"]
        self.prompt_index = s.get("prompt_index")
        self.model_mask = s.get("model_mask")
        self.batch = self.x.shape[0]

    # -- model parts -------------------------------------------------------------------------
    def _inp(self, lo: int, hi: int) -> Tensor:
        xs = self.x[:, lo:hi]
        if self.o["use_cfg"]:
            un = torch.where(self.prompt_index[:, lo:hi], self.o["mask_id"], xs)
            return torch.cat([xs, un], dim=0)
        return xs

    def _head(self, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        return self._split(self.model.lm_head(hidden))

    def _split(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        if logits.dtype not in _REMASK_DTYPES:
            logits = logits.float()
        cond, uncond = logits, None
        if self.o["use_cfg"]:
            cond, uncond = logits[: self.batch], logits[self.batch :]
        if self.o["forbid_eos"]:
            # on the conditional logits only: u + (cfg + 1)(-inf - u) = -inf, while -inf on
            # both halves would give NaN
            cond[..., self.o["eos_id"]] = float("-inf")
        return cond, uncond

    # -- selection ---------------------------------------------------------------------------
    def _select(self, cond: Tensor, uncond: Tensor | None, start: int, end: int) -> Tensor:
        """Unmask this step's tokens in ``self.x``; return the confidence [B, W]."""
        from llada_ext.ops import remask_

        o = self.o
        common = dict(
            mask_id=o["mask_id"],
            offset=start,
            temperature=o["temperature"],
            generator=o["generator"],
            uncond_logits=uncond,
            cfg_scale=o["cfg_scale"],
            return_details=True,
        )
        if not o["torch_select"]:
            _, _, conf = remask_(
                cond, self.x, self.nt, strategy=o["remasking"], threshold=o["threshold"], **common
            )
            return conf
        torch_random = o["remasking"] == "random" and o["random_source"] == "torch"
        strategy = "low_confidence" if torch_random else o["remasking"]
        # k = 0: predictions and confidences only, x is left as it is
        _, x0, conf = remask_(cond, self.x, self.zero, strategy=strategy, **common)
        window = self.x[:, start:end]
        candidates = window == o["mask_id"]
        if torch_random:
            gen = o["generator"]
            shape = (self.batch, self.x.shape[1])
            if gen is None:
                draw = torch.rand(shape, device=self.x.device)
            else:
                draw = torch.rand(shape, generator=gen, device=gen.device).to(self.x.device)
            conf = torch.where(candidates, draw[:, start:end], float("-inf"))
        if o["zero_eos_confidence"]:
            ends = (x0 == o["eos_id"]) | (x0 == o["eot_id"])
            if strategy == "low_confidence" and not torch_random:
                conf = self._without_end_tokens(cond, uncond, x0, conf)
            conf = torch.where(candidates & ends, DEMOTED, conf)
        take = select_transfer(conf, self.nt, threshold=o["threshold"], factor=o["factor"])
        window.copy_(torch.where(take, x0, window))
        return conf

    def _without_end_tokens(
        self, cond: Tensor, uncond: Tensor | None, x0: Tensor, conf: Tensor
    ) -> Tensor:
        """``softmax(l)[x0]`` renormalised over the vocabulary without EOS and EoT.

        With ``p = conf = softmax(l)[x0]``, ``p_e = p * exp(l_e - l_x0)`` for an end token e,
        so only three logit columns per position are read, not the vocabulary.
        """
        o = self.o
        ends = sorted({o["eos_id"], o["eot_id"]})
        cols = torch.cat(
            [x0[..., None], torch.tensor(ends, device=x0.device).expand(*x0.shape, len(ends))],
            dim=-1,
        )
        picked = cond.gather(-1, cols).float()
        if uncond is not None:
            u = uncond.gather(-1, cols).float()
            picked = u + (o["cfg_scale"] + 1.0) * (picked - u)
        rel = torch.exp(picked[..., 1:] - picked[..., :1]).sum(dim=-1)
        rest = (1.0 - conf * rel).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(conf > float("-inf"), conf / rest, conf)

    # -- units -------------------------------------------------------------------------------
    def _finish(self, logits: tuple[Tensor, Tensor | None], start: int, end: int) -> Any:
        if self.o["select_in_unit"]:
            return self._select(logits[0], logits[1], start, end)
        return logits

    def step(self, nb: int, start: int, end: int, full: bool) -> Tensor:
        """One sampling step of block ``nb`` over the window ``[start, end)`` (the block, or
        from an earlier still-masked position to the block end); returns the confidence
        [B, end - start]."""
        o, m, run = self.o, self.model, self.runner.run
        total = self.x.shape[1]
        if o["cache"] == "none":

            def unit() -> Any:
                if o["has_hidden"]:
                    hidden = m.forward_hidden(self._inp(0, total), self.model_mask)
                    logits = self._head(hidden[:, start:end])
                else:
                    out = m(self._inp(0, total), attention_mask=self.model_mask).logits
                    logits = self._split(out[:, start:end])
                return self._finish(logits, start, end)

            out = run(("step", nb, start), unit)
        elif full:
            from llada_ext.model import KVCache

            def full_pass() -> tuple[Tensor, Any]:
                kv = KVCache()
                return m.forward_hidden(self._inp(0, total), self.model_mask, kv_cache=kv), kv

            state = self.runner.state
            state["hidden"], state["kv"] = run(("full",), full_pass, persistent=True)
            out = run(
                ("head", nb, start),
                lambda: self._finish(self._head(state["hidden"][:, start:end]), start, end),
            )
        else:
            state = self.runner.state
            hi = total if o["cache"] == "prefix" else end

            def slice_pass() -> Any:
                hidden = m.forward_hidden(
                    self._inp(start, hi), self.model_mask, kv_cache=state["kv"], cache_start=start
                )
                return self._finish(self._head(hidden[:, : end - start]), start, end)

            out = run(("slice", nb, start), slice_pass)
        if o["select_in_unit"]:
            return out
        return self._select(out[0], out[1], start, end)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    *,
    gen_length: int,
    steps: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    eot_id: int | None = None,
    forbid_eos: bool = False,
    zero_eos_confidence: bool = False,
    cache: str = "none",
    cache_refresh: int | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    eos_early_stop: bool = False,
    cuda_graphs: bool | SamplerGraphs = False,
    random_source: str = "torch",
    callback: Callable[[int, Tensor, Tensor], Any] | None = None,
) -> Tensor:
    """Sample answers with LLaDA's block-wise remasking reverse process.

    Parameters
    ----------
    model : LLaDAModel
        The mask predictor. Any module with ``model(ids, attention_mask=...).logits`` and a
        ``.device`` also works when ``cache="none"``.
    prompt_ids : Tensor
        int64 [B, P] (or [P], or a list of ints) prompts, P >= 1, without ``mask_id``;
        left-pad batches of different lengths and pass ``attention_mask``.
    gen_length : int
        Answer length (the answer starts as ``gen_length`` masks).
    steps : int
        Total sampling steps, a multiple of ``gen_length // block_length``.
    block_length : int
        Semi-autoregressive block size; must divide ``gen_length``.
    temperature : float
        0: greedy predictions; > 0: Gumbel-max sampling of ``softmax(l / temperature)``.
    cfg_scale : float
        Classifier-free guidance scale (0 = off): ``l = u + (cfg + 1) * (c - u)`` with the
        unconditional pass seeing the prompt masked.
    remasking : {"low_confidence", "random", "margin", "entropy"}
        Which tokens stay unmasked each step (see :func:`llada_ext.remask`).
    mask_id : int, optional
        Mask token id; default ``model.config.mask_token_id``.
    attention_mask : Tensor, optional
        [B, P], 1 for real prompt tokens, 0 for (left) padding. Every row needs a real token.
    generator : torch.Generator, optional
        Randomness for ``temperature > 0`` and ``remasking="random"``; same seed, same output.
    eos_id, eot_id : int, optional
        EOS and end-of-turn ids for the EOS options; default from ``model.config``.
    forbid_eos : bool
        Never predict EOS (its logit is set to -inf).
    zero_eos_confidence : bool
        Candidates predicted as EOS or end-of-turn are unmasked last (ties among them: lower
        positions first; see the module notes for how this relates to the reference).
    cache : {"none", "prefix", "dual"}
        Block key/value caching (approximate, see the module notes).
    cache_refresh : int, optional
        With a cache: also run the full pass every ``cache_refresh`` steps inside a block
        (1 = every step, exact). Default: at the block start only.
    threshold : float, optional
        Confidence-threshold parallel decoding (see the module notes).
    factor : float, optional
        Factor-rule parallel decoding (see the module notes); > 0, not with ``threshold``;
        needs a probability-valued confidence ("low_confidence" or "margin").
    eos_early_stop : bool
        Stop once every row's answer ends in EOS through the end of a finished block; the rest
        is filled with EOS.
    cuda_graphs : bool or SamplerGraphs
        Replay the steps from CUDA graphs (model on CUDA). Pass a :class:`SamplerGraphs` to
        keep the recorded graphs for later calls of the same shapes.
    random_source : {"torch", "philox"}
        Source of the random confidences of ``remasking="random"`` (see the module notes).
    callback : callable, optional
        ``callback(step, x, confidence)`` after every step: the 0-based step index, the live
        canvas int64 [B, P + gen_length] (read it, do not keep or modify it) and the
        confidences of the step's window float32 [B, W] (-inf at non-candidates); the window
        is the block (W = block_length) unless an earlier position is still masked (see the
        module notes).

    Returns
    -------
    Tensor
        int64 [B, P + gen_length]: the prompt followed by the answer (cut it at EOS with
        :func:`llada_ext.sampling.decode_answers`).
    """
    device = model_device(model)
    prompt = _as_2d_ids(prompt_ids, "prompt_ids", device)
    batch, plen = prompt.shape
    steps_per_block = check_schedule(gen_length, steps, block_length)
    warn_if_too_long(model, plen + gen_length, "prompt + gen_length")
    num_blocks = gen_length // block_length
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if random_source not in RANDOM_SOURCES:
        raise ValueError(f"random_source must be one of {RANDOM_SOURCES}, got {random_source!r}")
    temperature = _finite_float(temperature, "temperature", minimum=0.0)
    cfg_scale = _finite_float(cfg_scale, "cfg_scale", minimum=0.0)
    if threshold is not None:
        threshold = _finite_float(threshold, "threshold")
    if factor is not None:
        factor = _finite_float(factor, "factor", minimum=0.0)
        if factor == 0.0:
            raise ValueError("factor must be > 0")
        if threshold is not None:
            raise ValueError("threshold and factor are two parallel decoding rules; pick one")
        if remasking not in ("low_confidence", "margin"):
            raise ValueError(
                f"factor needs a probability-valued confidence (remasking 'low_confidence' or "
                f"'margin'), got remasking={remasking!r}"
            )
    if cache_refresh is not None:
        cache_refresh = _positive_int(cache_refresh, "cache_refresh")
        if cache == "none":
            raise ValueError("cache_refresh needs cache='prefix' or 'dual'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    has_hidden = hasattr(model, "forward_hidden") and hasattr(model, "lm_head")
    if cache != "none" and not has_hidden:
        raise ValueError("cache='prefix'/'dual' needs an LLaDAModel (forward_hidden + lm_head)")
    config = getattr(model, "config", None)
    mask_id = config_token_id(config, "mask_token_id", mask_id, "mask_id", "a model")
    if forbid_eos or zero_eos_confidence or eos_early_stop:
        eos_id = config_token_id(config, "eos_token_id", eos_id, "eos_id", "the EOS options")
    if zero_eos_confidence and eot_id is None:
        eot_id = getattr(config, "eot_token_id", None) if config is not None else None
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    for name, value in (("mask_id", mask_id), ("eos_id", eos_id), ("eot_id", eot_id)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0 or (vocab is not None and value >= vocab):
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value}")
    in_prompt = prompt == mask_id
    if bool(in_prompt.any()):
        rows = sorted({int(r) for r in in_prompt.nonzero()[:, 0].tolist()})
        raise ValueError(
            f"prompt_ids contains mask_id {mask_id} (rows {rows}); the prompt must be given "
            f"tokens only (pad with another id, e.g. EOS, and set attention_mask)"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError("attention_mask must be a tensor [B, P]")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != (batch, plen):
            raise ValueError(
                f"attention_mask must have shape {(batch, plen)}, got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(device)
        empty = ~(attention_mask != 0).any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"attention_mask rows {empty.nonzero()[:, 0].tolist()} have no real token "
                f"(empty prompts)"
            )
        attention_mask = torch.cat(
            [
                attention_mask,
                torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device),
            ],
            dim=-1,
        )

    if isinstance(cuda_graphs, SamplerGraphs):
        runner = cuda_graphs
    elif isinstance(cuda_graphs, bool):
        runner = SamplerGraphs(capture=cuda_graphs)  # prepare() refuses capture off CUDA
    else:
        raise TypeError(
            f"cuda_graphs must be a bool or a SamplerGraphs, got {type(cuda_graphs).__name__}"
        )

    use_cfg = cfg_scale > 0
    random_draws = temperature > 0 or remasking == "random"
    opts: dict[str, Any] = dict(
        mask_id=mask_id,
        eos_id=eos_id,
        eot_id=eot_id if eot_id is not None else eos_id,
        use_cfg=use_cfg,
        has_hidden=has_hidden,
        cache=cache,
        remasking=remasking,
        temperature=temperature,
        cfg_scale=cfg_scale,
        threshold=threshold,
        factor=factor,
        forbid_eos=forbid_eos,
        zero_eos_confidence=zero_eos_confidence,
        random_source=random_source,
        generator=generator,
        torch_select=(
            factor is not None
            or zero_eos_confidence
            or (remasking == "random" and random_source == "torch")
        ),
        # a recorded unit would freeze the Philox seed / the torch.rand draw: with random
        # draws the selection runs after the unit, eagerly
        select_in_unit=not (runner.freezes_randomness and random_draws),
    )
    total = plen + gen_length
    rows = 2 * batch if use_cfg else batch
    shapes = {
        "x": ((batch, total), torch.int64),
        "nt": ((batch,), torch.int64),
        "zero": ((batch,), torch.int64),
    }
    if use_cfg:
        shapes["prompt_index"] = ((batch, total), torch.bool)
    if attention_mask is not None:
        shapes["model_mask"] = ((rows, total), attention_mask.dtype)
    key = (
        batch,
        plen,
        gen_length,
        block_length,
        tuple((k, v) for k, v in sorted(opts.items()) if k != "generator"),
        tuple(shapes.items()),
        id(model),
    )
    runner.prepare(key, shapes, device)
    static = runner.static
    x = static["x"]
    x.fill_(mask_id)
    x[:, :plen] = prompt
    static["zero"].zero_()
    if use_cfg:
        # as in the reference: everything that is not a mask at the start counts as prompt,
        # padding included, and the unconditional pass masks all of it
        static["prompt_index"].copy_(x != mask_id)
    if attention_mask is not None:
        mm = torch.cat([attention_mask, attention_mask]) if use_cfg else attention_mask
        static["model_mask"].copy_(mm)
    decoder = _Decoder(model, opts, runner)
    early_exit = threshold is not None or factor is not None

    step_index = 0
    for nb in range(num_blocks):
        start = plen + nb * block_length
        end = start + block_length
        schedule = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        # A position whose prediction was the mask token itself stays masked. The reference
        # keeps every mask left of the block end a candidate, so such a leftover of an earlier
        # block joins the window of the later blocks (the schedule still counts the block's
        # masks only). Almost never the case for a trained model: checked once per block.
        lo = start
        if nb > 0:
            left = (x[:, plen:start] == mask_id).any(dim=0)
            if bool(left.any()):
                lo = plen + int(left.int().argmax())
        for i in range(steps_per_block):
            if early_exit and i > 0 and not bool((x[:, lo:end] == mask_id).any()):
                break  # the threshold / factor rule finished the block early
            static["nt"].copy_(schedule[:, i])
            full = i == 0 or (cache_refresh is not None and i % cache_refresh == 0)
            conf = decoder.step(nb, lo, end, full)
            if callback is not None:
                callback(step_index, x, conf)
            step_index += 1
        if eos_early_stop and nb + 1 < num_blocks:
            answer = x[:, plen:end]
            is_eos = answer == eos_id
            has_eos = is_eos.any(dim=1)
            first = torch.where(has_eos, is_eos.int().argmax(dim=1), answer.shape[1])
            # EOS from the first EOS through the end of the block, in every row
            if bool((has_eos & (is_eos.sum(dim=1) == answer.shape[1] - first)).all()):
                x[:, end:] = eos_id
                break
    return x.clone()
