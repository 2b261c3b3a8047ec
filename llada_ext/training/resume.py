"""Resuming a run from either checkpoint format, at the same or another world size.

Two formats exist: one ``step-XXXXXXXX.pt`` file (single process and DDP, written by rank 0)
and one ``step-XXXXXXXX.dcp`` folder (FSDP2, a shard per rank, :mod:`llada_ext.training.dcp`).
Either loads into a run of any kind: a DCP checkpoint is resharded to the new world size (or
gathered into a single process), a file is scattered into FSDP2 shards.

The global batch (sequences per optimizer step) belongs to the run. A resumed run keeps the
checkpoint's global batch and recomputes its gradient accumulation for the new world size and
micro-batch (:func:`~llada_ext.training.distributed.split_global_batch`), so the data position,
counted in sequences, and the masks keyed by it continue exactly where they stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .dcp import load_dcp_rng, load_dcp_state, read_dcp_checkpoint
from .distributed import DistInfo, all_gather_objects, load_full_state_dicts, split_global_batch

__all__ = [
    "adopt_global_batch",
    "check_same_path",
    "load_training_state",
    "restore_schedule",
    "saved_global_batch",
]

logger = logging.getLogger(__name__)


def saved_global_batch(meta: dict[str, Any]) -> int:
    """The global batch of a checkpoint (derived for checkpoints that predate the setting)."""
    tc = meta["train_config"]
    if tc.get("global_batch"):
        return int(tc["global_batch"])
    return int(tc["micro_batch_size"]) * int(tc["grad_accum"]) * int(meta.get("world_size", 1))


def adopt_global_batch(
    config: Any, world_size: int, meta: dict[str, Any], *, given: bool, log: bool = True
) -> None:
    """Set ``config.global_batch`` and ``config.grad_accum`` for a resumed run.

    Parameters
    ----------
    config : TrainConfig
        This run's settings (changed in place).
    world_size : int
        Processes of this run.
    meta : dict
        The checkpoint's trainer state (``train_config``, ``world_size``, ``step``).
    given : bool
        True when this run set ``global_batch`` explicitly: it then wins over the
        checkpoint's (with a warning when they differ).
    log : bool
        Report the change (rank 0 only, so a job logs it once).

    Raises
    ------
    ValueError
        When the global batch cannot be split over ``world_size`` x ``micro_batch_size``.
    """
    saved = saved_global_batch(meta)
    step, saved_world = int(meta["step"]), int(meta.get("world_size", 1))
    if given and config.global_batch != saved:
        if log:
            logger.warning(
                "the global batch changes from %d to %d sequences per step at step %d",
                saved,
                config.global_batch,
                step,
            )
        return
    accum = split_global_batch(saved, config.micro_batch_size, world_size)
    changed = world_size != saved_world or accum != config.grad_accum
    if log and (changed or config.global_batch != saved):
        logger.info(
            "resuming at step %d with %d process(es) x micro-batch %d x %d accumulation "
            "step(s) = global batch %d (saved with %d process(es))",
            step,
            world_size,
            config.micro_batch_size,
            accum,
            saved,
            saved_world,
        )
    config.global_batch, config.grad_accum = saved, accum


def check_same_path(path: Path | None) -> None:
    """Every rank must resume from the same checkpoint; ValueError when they see different
    ones (e.g. an output folder that is not on a shared file system)."""
    seen = set(all_gather_objects(None if path is None else str(path)))
    if len(seen) > 1:
        raise ValueError(
            f"the ranks found different checkpoints to resume from ({sorted(map(str, seen))}); "
            "the output folder must be on a file system that every node sees"
        )


def _check_compatible(path: Path, meta: dict[str, Any], model: nn.Module, objective: str) -> None:
    if meta["model_config"] != model.config.to_dict():
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with a different model configuration"
        )
    saved = meta["train_config"].get("objective")
    if saved != objective:
        raise ValueError(f"checkpoint {str(path)!r} is a {saved!r} run, not {objective!r}")


def load_training_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Any,
    info: DistInfo,
    *,
    global_batch_given: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint of either format into ``model`` and ``optimizer`` (every rank).

    The checkpoint's architecture and objective are checked and the global batch adopted
    (:func:`adopt_global_batch`) before any weight is loaded.

    Parameters
    ----------
    path : Path
        A ``.pt`` checkpoint file or a ``.dcp`` checkpoint folder.
    model, optimizer : nn.Module, torch.optim.Optimizer
        The (possibly FSDP2-sharded) LLaDA model and its optimizer.
    config : TrainConfig
        This run's settings (``global_batch`` and ``grad_accum`` may be changed).
    info : DistInfo
        This process's place in the job.
    global_batch_given : bool
        Whether this run set its global batch explicitly.

    Returns
    -------
    tuple of (dict, dict)
        The trainer state (``step``, ``scheduler``, ``data``, ...) and this rank's RNG states.
    """
    if path.is_dir():
        meta = read_dcp_checkpoint(path)
        _check_compatible(path, meta, model, config.objective)
        adopt_global_batch(
            config, info.world_size, meta, given=global_batch_given, log=info.is_main
        )
        load_dcp_state(path, model, optimizer)
        return meta, load_dcp_rng(path, int(meta["world_size"]))
    meta = load_checkpoint(path)
    _check_compatible(path, meta, model, config.objective)
    adopt_global_batch(config, info.world_size, meta, given=global_batch_given, log=info.is_main)
    load_full_state_dicts(model, optimizer, meta["model"], meta["optimizer"], fsdp=config.fsdp)
    rng = meta["rng"]
    return meta, rng[info.rank] if len(rng) == info.world_size else rng[0]


def restore_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optimizer: torch.optim.Optimizer,
    lr: float,
    last_epoch: int,
) -> None:
    """Continue the schedule at ``last_epoch`` with *this* run's settings.

    The checkpoint's own schedule settings are not restored, so a resumed run may change
    ``--steps`` (e.g. extend a warmup-stable-decay run) or the peak ``--lr``; with the same
    settings the learning rates are exactly those of an uninterrupted run.
    """
    scheduler.last_epoch = last_epoch
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    lrs = []
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(last_epoch)  # the expression LambdaLR itself evaluates
        lrs.append(group["lr"])
    scheduler._last_lr = lrs  # what get_last_lr() reports
