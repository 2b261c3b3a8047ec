"""Distributed checkpoints of FSDP2 runs, written and read with ``torch.distributed.checkpoint``.

Each rank writes its own shards of the model and AdamW state, so no rank ever holds the full
state; loading reshards them to whatever world size (and wrapping: FSDP2, DDP or a single
process) the resumed run has. One checkpoint is the folder
``<out>/checkpoints/step-XXXXXXXX.dcp/``::

    .metadata                    DCP's index of every tensor shard (rank 0)
    __R_0.distcp                 rank R's shards of the model and optimizer state
    rng-rankRRRRR.pt             rank R's RNG states (Python, NumPy, torch, CUDA)
    trainer_state.pt             step, scheduler, data position, run and model settings (rank 0)
    checksums-rankRRRRR.sha256   SHA-256 of every file rank R wrote (each rank's last file)

The folder appears atomically: every rank writes into ``.step-XXXXXXXX.dcp.tmp-<id>`` (the id
chosen by rank 0), and rank 0 renames it to its final name after a barrier that every rank
reaches only once its files are written and fsync'ed. A process killed mid-save leaves only
the temporary folder, which the next run removes; the previous checkpoint stays loadable.

Loading checks the manifests first, split over the ranks (rank r checks the manifests of the
saved ranks r, r + world_size, ...), so a corrupted file is a ``ValueError`` naming it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model_files import checksum_lines, fsync_dir, verify_checksums
from .checkpoint import atomic_save, atomic_write
from .distributed import all_gather_objects, barrier, broadcast_object

__all__ = [
    "DCP_FORMAT",
    "DCP_SUFFIX",
    "is_dcp_checkpoint",
    "load_dcp_model_state",
    "load_dcp_rng",
    "load_dcp_state",
    "read_dcp_checkpoint",
    "save_dcp_checkpoint",
]

#: Version tag of ``trainer_state.pt``.
DCP_FORMAT = "llada_ext.train-dcp/1"
DCP_SUFFIX = ".dcp"
TRAINER_STATE_NAME = "trainer_state.pt"
_METADATA_NAME = ".metadata"
_RNG_NAME = "rng-rank{:05d}.pt"
_MANIFEST_NAME = "checksums-rank{:05d}.sha256"
_MANIFEST_GLOB = "checksums-rank*.sha256"

#: Test hook: ``"STEP:RANK:MARKER"`` makes rank RANK, while saving step STEP, write its pid to
#: the file MARKER and sleep before writing its shard (so a test can kill it mid-save).
TEST_PAUSE_ENV = "LLADA_EXT_TEST_PAUSE_SAVE"

logger = logging.getLogger(__name__)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by :func:`save_dcp_checkpoint`."""
    p = Path(path)
    return p.is_dir() and (p / TRAINER_STATE_NAME).is_file()


def _pause_for_tests(step: int) -> None:
    hook = os.environ.get(TEST_PAUSE_ENV)
    if not hook:
        return
    want_step, want_rank, marker = hook.split(":", 2)
    if int(want_step) == step and int(want_rank) == _rank_world()[0]:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3600)


def _writer(folder: Path, step: int) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    class _Writer(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            _pause_for_tests(step)
            return super().write_data(plan, planner)

    # sync_files: every shard is fsync'ed before the save returns (the rename relies on it)
    return _Writer(folder, sync_files=True)


def save_dcp_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rng_state: dict[str, Any],
) -> Path:
    """Write the checkpoint of ``step`` as a DCP folder (every rank calls this).

    Parameters
    ----------
    directory : path-like
        The run's checkpoints folder (on a file system every rank sees).
    step : int
        Optimizer steps done.
    model, optimizer : nn.Module, torch.optim.Optimizer
        The (FSDP2-sharded) LLaDA model and its optimizer; keys are the published names.
    trainer_state : dict
        Scheduler, data position, settings: plain values, written by rank 0.
    rng_state : dict
        This rank's :func:`~llada_ext.training.checkpoint.capture_rng_state`.

    Returns
    -------
    Path
        The final checkpoint folder (on every rank).
    """
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _rank_world()
    directory = Path(directory)
    final = directory / f"step-{step:08d}{DCP_SUFFIX}"
    token = broadcast_object(secrets.token_hex(6) if rank == 0 else None)
    tmp = directory / f".{final.name}.tmp-{token}"
    msd, osd = get_state_dict(model, optimizer)
    save({"model": msd, "optim": osd}, storage_writer=_writer(tmp, step))
    mine = sorted(p.name for p in tmp.glob(f"__{rank}_*.distcp"))
    atomic_save(rng_state, tmp / _RNG_NAME.format(rank))
    mine.append(_RNG_NAME.format(rank))
    if rank == 0:
        state = {**trainer_state, "format": DCP_FORMAT, "step": int(step), "world_size": world}
        atomic_save(state, tmp / TRAINER_STATE_NAME)
        mine += [_METADATA_NAME, TRAINER_STATE_NAME]
    text = checksum_lines(tmp, mine).encode()
    atomic_write(tmp / _MANIFEST_NAME.format(rank), lambda f: f.write(text))
    barrier()  # every rank's files are written and fsync'ed
    error = None
    if rank == 0:
        try:
            _publish(tmp, final, world)
        except (OSError, RuntimeError) as e:
            error = f"could not publish checkpoint {str(final)!r}: {e}"
    error = broadcast_object(error)  # every rank waits for the rename, and fails with it
    if error is not None:
        raise RuntimeError(error)
    return final


def _publish(tmp: Path, final: Path, world: int) -> None:
    """Rank 0: rename the finished temporary folder to its final name, durably."""
    missing = [r for r in range(world) if not (tmp / _MANIFEST_NAME.format(r)).is_file()]
    if missing:  # cannot happen after the barrier on a shared file system
        raise RuntimeError(
            f"ranks {missing} wrote no manifest into {str(tmp)!r}: is the checkpoint folder on "
            "a file system that every rank sees?"
        )
    fsync_dir(tmp)
    old = None
    if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
        old = final.with_name(f".{final.name}.tmp-old-{secrets.token_hex(4)}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_dcp_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify a DCP checkpoint's files and return its trainer state (every rank calls this).

    Parameters
    ----------
    path : path-like
        The ``step-XXXXXXXX.dcp`` folder.

    Returns
    -------
    dict
        ``step``, ``world_size``, ``scheduler``, ``data``, ``train_config``, ``model_config``.

    Raises
    ------
    ValueError
        If a file does not match its SHA-256, a rank's manifest is missing, or the folder is
        not a checkpoint of this format.
    """
    path = Path(path)
    rank, world = _rank_world()
    manifests = sorted(p.name for p in path.glob(_MANIFEST_GLOB))
    error = None
    for name in manifests[rank::world]:
        try:
            verify_checksums(path, name)
        except ValueError as e:
            error = str(e)
            break
    errors = [e for e in all_gather_objects(error) if e is not None]
    if errors:
        raise ValueError(errors[0])
    try:
        state = torch.load(path / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{str(path)!r} is not a readable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != DCP_FORMAT:
        raise ValueError(f"{str(path)!r} is not a llada_ext distributed training checkpoint")
    saved = int(state["world_size"])
    expected = [_MANIFEST_NAME.format(r) for r in range(saved)]
    if manifests != expected:
        raise ValueError(
            f"{str(path)!r} is incomplete: it was written by {saved} ranks but holds the "
            f"manifests {manifests}"
        )
    return state


def _load(state: dict[str, Any], reader: Any, *, single: bool = False) -> None:
    """``dcp.load`` in place; in one process without its warning that it is one process."""
    from torch.distributed.checkpoint import load

    no_dist = single or _rank_world() == (0, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        load(state, storage_reader=reader, no_dist=no_dist)


def load_dcp_state(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load model and optimizer state from a DCP folder, resharded to this run.

    Every rank calls this. The model may be FSDP2-sharded over any number of ranks,
    replicated (DDP) or unwrapped in a single process.

    Parameters
    ----------
    path : path-like
        The ``step-XXXXXXXX.dcp`` folder (verified by :func:`read_dcp_checkpoint`).
    model, optimizer : nn.Module, torch.optim.Optimizer
        The LLaDA model and its optimizer, with the checkpoint's architecture.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    _load(state, FileSystemReader(str(path)))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def load_dcp_rng(path: str | os.PathLike, saved_world_size: int) -> dict[str, Any]:
    """This rank's RNG states: its own at the saved world size, else rank 0's."""
    rank, world = _rank_world()
    source = rank if world == saved_world_size else 0
    return torch.load(Path(path) / _RNG_NAME.format(source), map_location="cpu", weights_only=True)


def load_dcp_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model weights of a DCP checkpoint, on the CPU, in one process.

    Parameters
    ----------
    path : path-like
        The ``step-XXXXXXXX.dcp`` folder.

    Returns
    -------
    dict
        Published weight name -> tensor, in the dtype it was trained in.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    entries = reader.read_metadata().state_dict_metadata
    weights = {}
    for key, meta in entries.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            weights[key[len("model.") :]] = torch.empty(
                tuple(meta.size), dtype=meta.properties.dtype
            )
    if not weights:
        raise ValueError(f"{str(path)!r} holds no model weights")
    state = {"model": weights}
    _load(state, reader, single=True)
    return state["model"]
