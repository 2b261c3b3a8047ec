"""Export a training checkpoint as a model folder in the published layout (``llada-ext export``).

The checkpoint may be a single file (single process, DDP) or a distributed ``.dcp`` folder
(FSDP2, any number of shards): its model weights are consolidated in one process on the CPU and
written with :meth:`LLaDAModel.save_pretrained` (``config.json`` plus ``model.safetensors``, or
shards with ``model.safetensors.index.json`` above the shard size). The run folder's tokenizer
files and ``generation_config.json`` are copied along, so the folder is ready for ``sample``,
``loglik`` and ``LLaDAModel.from_pretrained``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from ..generation_config import GENERATION_CONFIG_NAME
from ..model import DEFAULT_MAX_SHARD_BYTES, LLaDAConfig, LLaDAModel
from .checkpoint import TOKENIZER_FILES, load_checkpoint, resolve_checkpoint
from .dcp import load_dcp_model_state, read_dcp_checkpoint

__all__ = ["export_checkpoint", "load_checkpoint_weights"]

_RUN_FILES = (*TOKENIZER_FILES, GENERATION_CONFIG_NAME)

logger = logging.getLogger(__name__)


def load_checkpoint_weights(path: str | os.PathLike) -> tuple[LLaDAConfig, dict[str, torch.Tensor]]:
    """The architecture and full model weights of a training checkpoint (either format).

    Parameters
    ----------
    path : path-like
        A ``step-XXXXXXXX.pt`` file or ``step-XXXXXXXX.dcp`` folder (checked against its
        checksum manifests).

    Returns
    -------
    tuple of (LLaDAConfig, dict)
        The config and the weights (published names, CPU tensors in the training dtype).
    """
    path = Path(path)
    if path.is_dir():
        meta = read_dcp_checkpoint(path)
        weights = load_dcp_model_state(path)
    else:
        meta = load_checkpoint(path)
        weights = meta["model"]
    return LLaDAConfig.from_dict(meta["model_config"]), weights


def _run_folder(checkpoint: Path) -> Path | None:
    """The run folder of ``<run>/checkpoints/step-...``, None for a checkpoint elsewhere."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else None


def export_checkpoint(
    source: str | os.PathLike,
    to: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the model of a training checkpoint as a ``from_pretrained`` folder.

    Parameters
    ----------
    source : path-like
        A run folder or its ``checkpoints`` folder (the newest checkpoint is taken), a
        checkpoint file or a ``.dcp`` checkpoint folder.
    to : path-like
        Destination folder (created; weight files of an earlier model there are replaced).
    dtype : torch.dtype, optional
        Cast the weights (e.g. ``torch.bfloat16`` for release); default: as trained.
    max_shard_size : int
        Largest safetensors shard in bytes (see :meth:`LLaDAModel.save_pretrained`).

    Returns
    -------
    Path
        The checkpoint that was exported.

    Raises
    ------
    FileNotFoundError
        If ``source`` holds no checkpoint.
    ValueError
        If the checkpoint is corrupted or not a training checkpoint, or ``dtype`` is not a
        floating dtype.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = resolve_checkpoint(source)
    config, weights = load_checkpoint_weights(path)
    with torch.device("meta"):
        model = LLaDAModel(config, backend="torch")
    model.load_state_dict(weights, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    to = Path(to)
    model.save_pretrained(to, max_shard_size=max_shard_size)
    run = _run_folder(path)
    if run is not None:
        for name in _RUN_FILES:
            src = run / name
            if src.is_file() and src.resolve() != (to / name).resolve():
                shutil.copyfile(src, to / name)
    logger.debug("exported %s to %s", path, to)
    return path
