"""Atomic, resumable training checkpoints.

A checkpoint is one ``step-XXXXXXXX.pt`` file in ``<out>/checkpoints/`` holding everything a
run needs to continue bit-for-bit: model, optimizer and scheduler state, the step, the data
stream position and the RNG states (Python, NumPy, torch CPU, CUDA when present) of every rank.
Files are written to a temporary name in the same folder, fsync'ed and renamed with
``os.replace``, so a crash or Ctrl-C mid-write never leaves a truncated checkpoint behind: a
reader sees either the old file or the complete new one.

Only plain containers, numbers, strings and tensors are stored, so the files load with
``torch.load(weights_only=True)``.

Each checkpoint file gets a manifest, ``step-XXXXXXXX.pt.sha256``, written atomically after it:
the SHA-256 of the file. Loading verifies it, so a flipped bit or a file changed on disk is a
``ValueError`` naming the file instead of a run silently resumed from corrupted state.
Temporary files left by a process killed mid-write are removed when the run starts again.

FSDP2 runs write folders instead, ``step-XXXXXXXX.dcp/``, one shard per rank
(:mod:`llada_ext.training.dcp`); :class:`CheckpointManager` lists, prunes and cleans up both
kinds, and :func:`resolve_checkpoint` finds either for ``--resume``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..model_files import checksum_lines, fsync_dir, verify_checksums

__all__ = [
    "CHECKPOINT_FORMAT",
    "TOKENIZER_FILES",
    "CheckpointManager",
    "atomic_save",
    "capture_rng_state",
    "load_checkpoint",
    "resolve_checkpoint",
    "restore_rng_state",
]

#: Version tag written into every checkpoint.
CHECKPOINT_FORMAT = "llada_ext.train/1"

#: The files of a tokenizer folder that a run folder, a model folder or a prepared data
#: folder gets a copy of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_NAME_RE = re.compile(r"^step-(\d{8,})\.(pt|dcp)$")
# What atomic_write leaves behind when killed between creating its temp file and the rename.
_TEMP_RE = re.compile(r"^\.step-\d{8,}\.pt(\.sha256)?\..*\.tmp$")
# The folder of a distributed save that was killed before rank 0 renamed it.
_TEMP_DIR_RE = re.compile(r"^\.step-\d{8,}\.dcp\.tmp-.+$")
MANIFEST_SUFFIX = ".sha256"

logger = logging.getLogger(__name__)


def write_manifest(path: Path) -> None:
    """Record the SHA-256 of `path` in `path` + ".sha256" (atomically, after the file)."""
    text = checksum_lines(path.parent, [path.name]).encode()
    atomic_write(path.with_name(path.name + MANIFEST_SUFFIX), lambda f: f.write(text))


def verify_manifest(path: Path) -> None:
    """Check `path` against its manifest; ValueError naming the file when they differ.

    A checkpoint without a manifest (written by an earlier version) loads with a warning.
    """
    manifest = path.name + MANIFEST_SUFFIX
    verified = verify_checksums(path.parent, manifest)
    if not verified:
        logger.warning("%s has no checksum manifest; it is loaded unverified", path)
    elif path.name not in verified:
        raise ValueError(f"{str(path.parent / manifest)!r} does not list {path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: temp file in the same folder, fsync, ``os.replace``.

    Parameters
    ----------
    path : path-like
        Destination file.
    write : callable
        Called with the open binary temp file; writes the contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename within one file system (atomic on POSIX).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the half-written temp file around.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`).

    Parameters
    ----------
    obj : object
        Anything ``torch.save`` accepts.
    path : path-like
        Destination file.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the RNG states of Python, NumPy, torch CPU and (if present) CUDA.

    Returns
    -------
    dict
        Tensors and plain values only (loadable with ``weights_only=True``).
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`capture_rng_state`.

    Parameters
    ----------
    state : dict
        The snapshot. A CUDA state is restored only when CUDA is available with at least as
        many devices as were saved.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file written by :class:`CheckpointManager`.

    Parameters
    ----------
    path : path-like
        The ``.pt`` file.

    Returns
    -------
    dict
        The checkpoint, tensors on the CPU.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not a checkpoint of this format, or does not match its manifest.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    verify_manifest(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{str(path)!r} is not a readable checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a llada_ext training checkpoint")
    return ckpt


def remove_interrupted_saves(folder: str | os.PathLike) -> None:
    """Delete the temp folders (``.<name>.tmp-*`` beside `folder`) that a kill left while
    ``LLaDAModel.save_pretrained(folder)`` was writing: a finished save renames its own."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    for p in folder.parent.glob(f".{folder.name}.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save", p)


class CheckpointManager:
    """Writes ``step-XXXXXXXX.pt`` files into one folder and keeps the newest ``keep_last``.

    The distributed ``step-XXXXXXXX.dcp`` folders of FSDP2 runs (written by
    :func:`~llada_ext.training.dcp.save_dcp_checkpoint`) are listed, pruned and cleaned up
    alongside.

    Parameters
    ----------
    directory : path-like
        Folder of the checkpoint files (created on first save).
    keep_last : int
        Number of checkpoints to keep (older ones are deleted after a successful save);
        0 or less keeps all.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = int(keep_last)
        self.remove_stale_temp_files()

    def remove_stale_temp_files(self) -> None:
        """Delete the temp files of writes that a kill interrupted (they are never complete:
        a finished write renames its temp file)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if _TEMP_RE.match(p.name) and p.is_file():
                try:
                    p.unlink()
                    logger.info("removed %s, left by an interrupted write", p)
                except OSError:
                    pass
            elif _TEMP_DIR_RE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                logger.info("removed %s, left by an interrupted distributed save", p)

    def path_for(self, step: int) -> Path:
        """File name of the checkpoint of ``step``."""
        return self.directory / f"step-{step:08d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        """Existing checkpoints (files and DCP folders) as ``(step, path)``, oldest first.

        Two checkpoints of the same step (a run restarted with another wrapping) are ordered
        by modification time.
        """
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME_RE.match(p.name)
            # a .dcp folder exists under its final name only once complete (see dcp.py)
            if m and (p.is_file() if m.group(2) == "pt" else p.is_dir()):
                found.append((int(m.group(1)), p.stat().st_mtime_ns, p))
        return [(step, p) for step, _, p in sorted(found)]

    def latest(self) -> Path | None:
        """Path of the newest checkpoint, or None."""
        found = self.list()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` atomically, then prune old ones.

        Parameters
        ----------
        step : int
            Optimizer steps done.
        state : dict
            Checkpoint contents (``format`` and ``step`` are added).

        Returns
        -------
        Path
            The written file.
        """
        path = self.path_for(step)
        atomic_save({**state, "format": CHECKPOINT_FORMAT, "step": int(step)}, path)
        write_manifest(path)
        self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` checkpoints."""
        if self.keep_last <= 0:
            return
        for _, p in self.list()[: -self.keep_last]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                continue
            for f in (p, p.with_name(p.name + MANIFEST_SUFFIX)):
                try:
                    f.unlink()
                except FileNotFoundError:
                    pass


def resolve_checkpoint(resume: str | os.PathLike) -> Path:
    """The checkpoint ``resume`` names: a checkpoint file, a DCP checkpoint folder, a
    checkpoints folder or a run folder (the newest checkpoint in them).

    Raises
    ------
    FileNotFoundError
        If the path holds no checkpoint.
    """
    p = Path(resume)
    if p.is_file() or (p.is_dir() and _NAME_RE.match(p.name)):
        return p
    for folder in (p / "checkpoints", p):
        if folder.is_dir():
            latest = CheckpointManager(folder).latest()
            if latest is not None:
                return latest
    raise FileNotFoundError(f"no checkpoint found at {str(p)!r}")
