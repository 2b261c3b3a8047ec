"""Argument checks of :func:`llada_ext.generate` and the settings its steps read.

Every check raises before any tensor of the generation is allocated; the messages name the
argument as the caller spelled it. :class:`SamplerOptions` is the checked result: the model's
default token ids filled in, and the derived switches (CFG on, which selection path) in one
place so the step code reads names instead of recomputing conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ..model import config_token_id
from .graphs import SamplerGraphs

__all__ = [
    "CACHE_MODES",
    "MAX_SCHEDULE",
    "RANDOM_SOURCES",
    "REMASKING",
    "SamplerOptions",
    "as_2d_ids",
    "as_runner",
    "check_options",
    "check_prompt",
    "check_schedule",
    "finite_float",
    "positive_int",
]

REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")
RANDOM_SOURCES = ("torch", "philox")

# Largest gen_length and steps a generation accepts: far beyond any use, small enough that an
# absurd value is refused before any tensor of that size is allocated.
MAX_SCHEDULE = 1 << 20


# ------------------------------------------------------------------------------------------
# scalar checks
# ------------------------------------------------------------------------------------------
def integer_ids(t: object, name: str, expected: str) -> Tensor:
    """Token ids as an integer tensor: a list of ints becomes int64; anything that is not an
    integer tensor is a TypeError naming ``name`` and the ``expected`` form."""
    if isinstance(t, (list, tuple)):
        t = torch.tensor(t, dtype=torch.int64)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int64 tensor {expected}, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def as_2d_ids(t: object, name: str, device: torch.device) -> Tensor:
    """Prompt ids as int64 [B, P] on ``device`` (a [P] tensor or a list of ints is one row)."""
    t = integer_ids(t, name, "[B, P] (or a list of ints)")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, P] with B >= 1, got {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} is empty: the prompt needs at least one token")
    return t.to(device=device, dtype=torch.int64)


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an int > 0 (bool refused), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def finite_float(value: object, name: str, *, minimum: float | None = None) -> float:
    """``float(value)`` if it is a finite number (>= ``minimum`` if given), else ValueError."""
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
    gen_length = positive_int(gen_length, "gen_length")
    steps = positive_int(steps, "steps")
    block_length = positive_int(block_length, "block_length")
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


# ------------------------------------------------------------------------------------------
# the step settings
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerOptions:
    """The checked settings a sampling step reads (see :func:`generate` for each one).

    ``eot_id`` is EOS when no end-of-turn id is known, so the EOS rule can always compare
    against both. ``generator`` is left out of :meth:`key`: recorded CUDA graphs do not
    depend on it.
    """

    mask_id: int
    eos_id: int | None
    eot_id: int | None
    has_hidden: bool
    cache: str
    remasking: str
    temperature: float
    cfg_scale: float
    threshold: float | None
    factor: float | None
    forbid_eos: bool
    zero_eos_confidence: bool
    random_source: str
    generator: torch.Generator | None = field(default=None, compare=False)

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 0

    @property
    def torch_random(self) -> bool:
        """``remasking="random"`` drawn with ``torch.rand``, as the reference does."""
        return self.remasking == "random" and self.random_source == "torch"

    @property
    def torch_select(self) -> bool:
        """The selection needs the whole row of confidences first (see ``select.py``)."""
        return self.factor is not None or self.zero_eos_confidence or self.torch_random

    @property
    def random_draws(self) -> bool:
        return self.temperature > 0 or self.remasking == "random"

    @property
    def early_exit(self) -> bool:
        """A parallel decoding rule may finish a block before its last step."""
        return self.threshold is not None or self.factor is not None

    def key(self) -> tuple[tuple[str, Any], ...]:
        """The settings as a hashable tuple, for :meth:`SamplerGraphs.prepare`."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "generator")


def _check_modes(remasking: object, cache: object, random_source: object) -> None:
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if random_source not in RANDOM_SOURCES:
        raise ValueError(f"random_source must be one of {RANDOM_SOURCES}, got {random_source!r}")


def _check_numbers(
    temperature: object, cfg_scale: object, threshold: object, factor: object, remasking: str
) -> tuple[float, float, float | None, float | None]:
    temperature = finite_float(temperature, "temperature", minimum=0.0)
    cfg_scale = finite_float(cfg_scale, "cfg_scale", minimum=0.0)
    if threshold is not None:
        threshold = finite_float(threshold, "threshold")
    if factor is not None:
        factor = finite_float(factor, "factor", minimum=0.0)
        if factor == 0.0:
            raise ValueError("factor must be > 0")
        if threshold is not None:
            raise ValueError("threshold and factor are two parallel decoding rules; pick one")
        if remasking not in ("low_confidence", "margin"):
            raise ValueError(
                f"factor needs a probability-valued confidence (remasking 'low_confidence' or "
                f"'margin'), got remasking={remasking!r}"
            )
    return temperature, cfg_scale, threshold, factor


def _token_ids(
    config: object,
    mask_id: int | None,
    eos_id: int | None,
    eot_id: int | None,
    *,
    need_eos: bool,
    need_eot: bool,
) -> tuple[int, int | None, int | None]:
    """The mask, EOS and EoT ids, the model config's where not given, each checked."""
    mask_id = config_token_id(config, "mask_token_id", mask_id, "mask_id", "a model")
    if need_eos:
        eos_id = config_token_id(config, "eos_token_id", eos_id, "eos_id", "the EOS options")
    if need_eot and eot_id is None:
        eot_id = getattr(config, "eot_token_id", None) if config is not None else None
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    for name, value in (("mask_id", mask_id), ("eos_id", eos_id), ("eot_id", eot_id)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0 or (vocab is not None and value >= vocab):
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value}")
    return mask_id, eos_id, eot_id


def check_options(
    model: torch.nn.Module,
    *,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
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
    random_source: str = "torch",
    callback: object = None,
) -> SamplerOptions:
    """Check the sampling options of :func:`generate` (same names and defaults).

    Parameters
    ----------
    model : torch.nn.Module
        The mask predictor: its ``config`` gives the default token ids and the vocabulary
        size they are checked against; ``forward_hidden`` + ``lm_head`` allow a cache.
    temperature, cfg_scale, remasking, ... : see :func:`generate`
        Checked in the order :func:`generate` documents them, raising ValueError or TypeError
        with the argument's name.

    Returns
    -------
    SamplerOptions
        The step settings. ``cache_refresh``, ``eos_early_stop`` and ``callback`` steer the
        loop only: they are checked here, not stored.
    """
    _check_modes(remasking, cache, random_source)
    temperature, cfg_scale, threshold, factor = _check_numbers(
        temperature, cfg_scale, threshold, factor, remasking
    )
    if cache_refresh is not None:
        positive_int(cache_refresh, "cache_refresh")
        if cache == "none":
            raise ValueError("cache_refresh needs cache='prefix' or 'dual'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    has_hidden = hasattr(model, "forward_hidden") and hasattr(model, "lm_head")
    if cache != "none" and not has_hidden:
        raise ValueError("cache='prefix'/'dual' needs an LLaDAModel (forward_hidden + lm_head)")
    mask_id, eos_id, eot_id = _token_ids(
        getattr(model, "config", None),
        mask_id,
        eos_id,
        eot_id,
        need_eos=forbid_eos or zero_eos_confidence or eos_early_stop,
        need_eot=zero_eos_confidence,
    )
    return SamplerOptions(
        mask_id=mask_id,
        eos_id=eos_id,
        eot_id=eot_id if eot_id is not None else eos_id,
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
    )


def check_prompt(
    prompt: Tensor, mask_id: int, attention_mask: Tensor | None, gen_length: int
) -> Tensor | None:
    """Refuse a prompt holding ``mask_id``; extend ``attention_mask`` over the answer.

    Parameters
    ----------
    prompt : Tensor
        int64 [B, P].
    mask_id : int
        The mask token id.
    attention_mask : Tensor, optional
        [B, P] (or [P]), 1 on real tokens, 0 on padding; every row needs a real token.
    gen_length : int
        Answer length.

    Returns
    -------
    Tensor or None
        ``attention_mask`` on the prompt's device, its dtype, shape [B, P + gen_length] with
        ones over the answer; None when ``attention_mask`` is None.
    """
    batch, plen = prompt.shape
    in_prompt = prompt == mask_id
    if bool(in_prompt.any()):
        rows = sorted({int(r) for r in in_prompt.nonzero()[:, 0].tolist()})
        raise ValueError(
            f"prompt_ids contains mask_id {mask_id} (rows {rows}); the prompt must be given "
            f"tokens only (pad with another id, e.g. EOS, and set attention_mask)"
        )
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError("attention_mask must be a tensor [B, P]")
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != (batch, plen):
        raise ValueError(
            f"attention_mask must have shape {(batch, plen)}, got {tuple(attention_mask.shape)}"
        )
    attention_mask = attention_mask.to(prompt.device)
    empty = ~(attention_mask != 0).any(dim=1)
    if bool(empty.any()):
        raise ValueError(
            f"attention_mask rows {empty.nonzero()[:, 0].tolist()} have no real token "
            f"(empty prompts)"
        )
    answer = torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=prompt.device)
    return torch.cat([attention_mask, answer], dim=-1)


def as_runner(cuda_graphs: object) -> SamplerGraphs:
    """The :class:`SamplerGraphs` that runs the steps: the one given, or a fresh one."""
    if isinstance(cuda_graphs, SamplerGraphs):
        return cuda_graphs
    if isinstance(cuda_graphs, bool):
        return SamplerGraphs(capture=cuda_graphs)  # prepare() refuses capture off CUDA
    raise TypeError(
        f"cuda_graphs must be a bool or a SamplerGraphs, got {type(cuda_graphs).__name__}"
    )
