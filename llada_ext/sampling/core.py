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

Layout: this module holds the driver; the argument checks are in
:mod:`llada_ext.sampling.options`, the steps (schedule, window forwards, remask, cache refresh,
stop tests) in :mod:`llada_ext.sampling.steps`, the PyTorch selection rules in
:mod:`llada_ext.sampling.select` and the CUDA-graph runner in :mod:`llada_ext.sampling.graphs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..model import model_device, warn_if_too_long
from .graphs import SamplerGraphs
from .options import (
    CACHE_MODES,
    MAX_SCHEDULE,
    RANDOM_SOURCES,
    REMASKING,
    as_2d_ids,
    as_runner,
    check_options,
    check_prompt,
    check_schedule,
)
from .steps import (
    SamplerState,
    answers_end_in_eos,
    block_done,
    get_num_transfer_tokens,
    needs_full_pass,
    window_start,
)

__all__ = [
    "CACHE_MODES",
    "MAX_SCHEDULE",
    "RANDOM_SOURCES",
    "REMASKING",
    "check_schedule",
    "generate",
    "get_num_transfer_tokens",
    "left_pad",
]


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
    prompt = as_2d_ids(prompt_ids, "prompt_ids", device)
    plen = prompt.shape[1]
    steps_per_block = check_schedule(gen_length, steps, block_length)
    warn_if_too_long(model, plen + gen_length, "prompt + gen_length")
    opts = check_options(
        model,
        temperature=temperature,
        cfg_scale=cfg_scale,
        remasking=remasking,
        mask_id=mask_id,
        generator=generator,
        eos_id=eos_id,
        eot_id=eot_id,
        forbid_eos=forbid_eos,
        zero_eos_confidence=zero_eos_confidence,
        cache=cache,
        cache_refresh=cache_refresh,
        threshold=threshold,
        factor=factor,
        eos_early_stop=eos_early_stop,
        random_source=random_source,
        callback=callback,
    )
    model_mask = check_prompt(prompt, opts.mask_id, attention_mask, gen_length)
    runner = as_runner(cuda_graphs)
    state = SamplerState.begin(model, opts, runner, prompt, model_mask, gen_length, block_length)
    x = state.x
    num_blocks = gen_length // block_length
    step_index = 0
    for nb in range(num_blocks):
        start = plen + nb * block_length
        end = start + block_length
        schedule = get_num_transfer_tokens(x[:, start:end] == opts.mask_id, steps_per_block)
        lo = window_start(x, plen, start, opts.mask_id)
        for i in range(steps_per_block):
            if opts.early_exit and i > 0 and block_done(x, lo, end, opts.mask_id):
                break  # the threshold / factor rule finished the block early
            conf = state.step(nb, lo, end, schedule[:, i], needs_full_pass(i, cache_refresh))
            if callback is not None:
                callback(step_index, x, conf)
            step_index += 1
        if eos_early_stop and nb + 1 < num_blocks and answers_end_in_eos(x, plen, end, opts.eos_id):
            x[:, end:] = opts.eos_id  # what an SFT model predicts after its answer's EOS
            break
    return x.clone()
