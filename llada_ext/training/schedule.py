"""Learning-rate schedules for training.

LLaDA was pre-trained with a warmup-stable-decay (WSD) schedule: a linear warmup, a long plateau
at the peak learning rate, and a final decay. The plateau makes it cheap to continue a run (the
decay is only applied at the very end), which is why it is the default here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["make_wsd_scheduler", "wsd_factor"]

_DECAY_SHAPES = ("linear", "cosine", "sqrt")


def wsd_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    min_ratio: float = 0.1,
    shape: str = "linear",
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Parameters
    ----------
    step : int
        Number of optimizer steps already taken (0 for the first step).
    total_steps : int
        Total number of optimizer steps of the run.
    warmup_steps : int
        Steps of linear warmup from ``1 / (warmup_steps + 1)`` up to 1.
    decay_steps : int
        Steps at the end of the run over which the factor falls from 1 to ``min_ratio``.
    min_ratio : float
        Final multiplier reached at the last step.
    shape : {"linear", "cosine", "sqrt"}
        Shape of the decay ("sqrt" is the ``1 - sqrt(progress)`` form often used with WSD).

    Returns
    -------
    float
        The learning-rate multiplier in ``(0, 1]``.
    """
    if shape not in _DECAY_SHAPES:
        raise ValueError(f"shape must be one of {_DECAY_SHAPES}, got {shape!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError("warmup_steps and decay_steps must be >= 0")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        # Start above zero so the very first step already moves the weights.
        return (step + 1) / (warmup_steps + 1)
    decay_start = max(total_steps - decay_steps, warmup_steps)
    if decay_steps == 0 or step < decay_start:
        return 1.0
    span = max(total_steps - decay_start, 1)
    progress = min((step - decay_start + 1) / span, 1.0)
    if shape == "linear":
        frac = 1.0 - progress
    elif shape == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        frac = 1.0 - math.sqrt(progress)
    return min_ratio + (1.0 - min_ratio) * frac


def make_wsd_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    min_ratio: float = 0.1,
    shape: str = "linear",
) -> torch.optim.lr_scheduler.LambdaLR:
    """Wrap :func:`wsd_factor` in a ``LambdaLR`` (its state is saved with checkpoints).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Optimizer whose groups' ``lr`` is the peak learning rate.
    total_steps, warmup_steps, decay_steps, min_ratio, shape
        See :func:`wsd_factor`.

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
        Call ``.step()`` once after every optimizer step.
    """
    # Validate eagerly so a bad configuration fails before training starts.
    wsd_factor(
        0,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        min_ratio=min_ratio,
        shape=shape,
    )
    fn: Callable[[int], float] = _WSD(total_steps, warmup_steps, decay_steps, min_ratio, shape)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class _WSD:
    """Picklable callable form of :func:`wsd_factor` (a lambda would not pickle)."""

    def __init__(
        self, total_steps: int, warmup_steps: int, decay_steps: int, min_ratio: float, shape: str
    ) -> None:
        self.kw = {
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "decay_steps": decay_steps,
            "min_ratio": min_ratio,
            "shape": shape,
        }

    def __call__(self, step: int) -> float:
        return wsd_factor(step, **self.kw)
