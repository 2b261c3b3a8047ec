"""LLaDA's reverse process (Alg. 4 of the paper): block-wise parallel decoding by remasking.

:func:`generate` with its defaults is the public LLaDA ``generate.py`` sampler: the answer
starts fully masked; it is decoded in blocks of ``block_length`` from left to right with
``steps // num_blocks`` steps per block; at every step the model predicts all masked tokens
and the ``k`` most confident ones of the current block are kept, where the per-row schedule
``k`` spreads the block's masks evenly over its steps (``base = m // steps``, the first
``m % steps`` steps take one more). Classifier-free guidance runs a second, unconditional
pass with the prompt masked and combines ``l = u + (cfg + 1) * (c - u)``. The step itself is
:func:`llada_ext.remask`, fed with the logits of the current block only (the LM head runs on
the block's hidden states, not on the whole sequence).

Opt-in speed features (all off by default):

- ``cache="prefix"`` / ``"dual"``: block-level key/value caching in the style of Fast-dLLM.
  At the first step of every block the whole sequence runs once and every layer's keys and
  values are kept. The following steps of the block recompute only
  ``x[:, block_start:]`` (prefix cache: the prompt and the finished blocks are read from the
  cache) or only the block itself (dual cache: the still-masked suffix is read from the cache
  too). *Approximation*: attention is non-causal, so the cached keys/values of position j
  depend on every token of the sequence; those of the cached part are not updated when tokens
  of the current block are decoded during the block's later steps. They are exact again at the
  next block boundary. With a single layer (keys/values depend on the token and its position
  only) both caches are exact, which the tests use.
- ``threshold=tau``: confidence-threshold parallel decoding (Fast-dLLM): each step also
  unmasks every candidate whose confidence exceeds ``tau`` (still at least the scheduled
  ``k``), and a block ends as soon as it has no mask left, saving the remaining steps.
  Use ``steps = gen_length`` (k = 1) for the usual "one or more tokens per step" behaviour.
- ``eos_early_stop=True``: after a block is finished, if the last token of that block is EOS
  in every row, the remaining blocks are filled with EOS and the loop stops. This is what an
  SFT-trained LLaDA (whose answers are padded with EOS) predicts there; it is an
  approximation of running the remaining blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["generate", "get_num_transfer_tokens"]

REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")
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
    return t.to(device=device, dtype=torch.int64)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
    cache: str = "none",
    threshold: float | None = None,
    eos_early_stop: bool = False,
    eos_id: int | None = None,
) -> Tensor:
    """Sample answers with LLaDA's block-wise remasking reverse process.

    Parameters
    ----------
    model : LLaDAModel
        The mask predictor. Any module with ``model(ids, attention_mask=...).logits`` and a
        ``.device`` also works when ``cache="none"``.
    prompt_ids : Tensor
        int64 [B, P] (or [P]) prompts; left-pad batches of different lengths and pass
        ``attention_mask``.
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
        [B, P], 1 for real prompt tokens, 0 for (left) padding.
    generator : torch.Generator, optional
        Randomness for ``temperature > 0`` and ``remasking="random"``; same seed, same output.
    cache : {"none", "prefix", "dual"}
        Block key/value caching (approximate, see the module notes).
    threshold : float, optional
        Confidence threshold for parallel decoding (see the module notes).
    eos_early_stop : bool
        Stop once every row's last finished block ends in EOS; the rest is filled with EOS.
    eos_id : int, optional
        EOS id for ``eos_early_stop``; default ``model.config.eos_token_id``.

    Returns
    -------
    Tensor
        int64 [B, P + gen_length]: the prompt followed by the answer (truncation at EOS is
        left to decoding).
    """
    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    prompt = _as_2d_ids(prompt_ids, "prompt_ids", device)
    batch, plen = prompt.shape
    gen_length = _positive_int(gen_length, "gen_length")
    steps = _positive_int(steps, "steps")
    block_length = _positive_int(block_length, "block_length")
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
    steps_per_block = steps // num_blocks
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature >= 0
        or temperature == float("inf")
    ):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if (
        isinstance(cfg_scale, bool)
        or not isinstance(cfg_scale, (int, float))
        or not cfg_scale >= 0
        or cfg_scale == float("inf")
    ):
        raise ValueError(f"cfg_scale must be a finite float >= 0, got {cfg_scale!r}")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or threshold != threshold
    ):
        raise ValueError(f"threshold must be a float or None, got {threshold!r}")
    has_hidden = hasattr(model, "forward_hidden") and hasattr(model, "lm_head")
    if cache != "none" and not has_hidden:
        raise ValueError("cache='prefix'/'dual' needs an LLaDAModel (forward_hidden + lm_head)")
    config = getattr(model, "config", None)
    if mask_id is None:
        if config is None or getattr(config, "mask_token_id", None) is None:
            raise ValueError("mask_id is required for a model without config.mask_token_id")
        mask_id = int(config.mask_token_id)
    if eos_early_stop and eos_id is None:
        if config is None or getattr(config, "eos_token_id", None) is None:
            raise ValueError("eos_id is required for eos_early_stop without config.eos_token_id")
        eos_id = int(config.eos_token_id)
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
        attention_mask = torch.cat(
            [
                attention_mask,
                torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device),
            ],
            dim=-1,
        )

    from llada_ext.ops import remask

    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.int64, device=device)
    x[:, :plen] = prompt
    # as in the reference: everything that is not a mask at the start counts as prompt, and
    # the unconditional pass masks all of it
    prompt_index = x != mask_id
    use_cfg = cfg_scale > 0
    model_mask = attention_mask
    if use_cfg and attention_mask is not None:
        model_mask = torch.cat([attention_mask, attention_mask], dim=0)
    # Masks inside the prompt are candidates in the reference sampler (its confidence is only
    # cut after the block). Keep that: widen the window to the start of the sequence then.
    # The cached modes never recompute the prompt, so they leave prompt masks alone.
    prompt_has_mask = cache == "none" and bool((prompt == mask_id).any())

    def block_logits(
        inp: Tensor, start: int, end: int, win: int, kv: object | None, step: int
    ) -> Tensor:
        """Logits [rows, end - win, V] for positions [win, end) of ``inp``."""
        if not has_hidden:
            return model(inp, attention_mask=model_mask).logits[:, win:end]
        if cache == "none":
            hidden = model.forward_hidden(inp, model_mask)[:, win:end]
        elif step == 0:
            hidden = model.forward_hidden(inp, model_mask, kv_cache=kv)[:, win:end]
        elif cache == "prefix":
            hidden = model.forward_hidden(
                inp[:, start:], model_mask, kv_cache=kv, cache_start=start
            )[:, : end - start]
        else:
            hidden = model.forward_hidden(
                inp[:, start:end], model_mask, kv_cache=kv, cache_start=start
            )
        return model.lm_head(hidden)

    for nb in range(num_blocks):
        start = plen + nb * block_length
        end = start + block_length
        win = 0 if prompt_has_mask else start
        num_transfer = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        kv = None
        if cache != "none":
            from llada_ext.model import KVCache

            kv = KVCache()
        for i in range(steps_per_block):
            if threshold is not None and i > 0 and not bool((x[:, start:end] == mask_id).any()):
                break  # the threshold finished the block early
            inp = x
            if use_cfg:
                inp = torch.cat([x, torch.where(prompt_index, mask_id, x)], dim=0)
            logits = block_logits(inp, start, end, win, kv, i)
            if logits.dtype not in _REMASK_DTYPES:
                logits = logits.float()
            uncond = None
            if use_cfg:
                logits, uncond = logits[:batch], logits[batch:]
            x = remask(
                logits,
                x,
                num_transfer[:, i],
                mask_id=mask_id,
                offset=win,
                strategy=remasking,
                temperature=float(temperature),
                threshold=threshold,
                generator=generator,
                uncond_logits=uncond,
                cfg_scale=float(cfg_scale),
            )
        if eos_early_stop and nb + 1 < num_blocks and bool((x[:, end - 1] == eos_id).all()):
            x[:, end:] = eos_id
            break
    return x
