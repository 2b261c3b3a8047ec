"""Tokenize training data once into memory-mapped token shards (``llada-ext prepare``).

Records come from the loaders of :mod:`llada_ext.training.data` (text files, JSONL, a
Hugging Face dataset) and are tokenized exactly as the in-memory path tokenizes them
(:func:`~llada_ext.training.data.records_to_texts` / ``records_to_pairs``), in parallel over
chunks of records. Chunks are cut by record count and written back in order, so the output is
byte-for-byte the same for any number of workers. The folder is written under a temporary
name beside the destination and renamed into place at the end: an interrupted run leaves no
half-written folder, and an existing prepared folder is replaced only with ``overwrite``.
See :mod:`llada_ext.training.shards` for the format.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..model_files import CHECKSUMS_NAME, checksum_lines, fsync_dir
from .checkpoint import TOKENIZER_FILES
from .data import DataError, records_to_pairs, records_to_texts
from .shards import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    ShardWriter,
    choose_dtype,
    is_prepared_folder,
    tokenizer_info,
)

__all__ = ["prepare_shards"]

logger = logging.getLogger(__name__)


class _Encoder:
    """Tokenizes one chunk of records into concatenated tokens + per-document lengths."""

    def __init__(self, tokenizer_folder: str | None, settings: dict[str, Any]) -> None:
        from ..tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_folder)
        self.s = settings

    def __call__(self, task: tuple[int, list[dict[str, Any]]]) -> tuple:
        start, records = task
        s = self.s
        plens = None
        if s["objective"] == "sft":
            pairs = list(
                records_to_pairs(records, self.tok, chat_template=s["chat_template"], start=start)
            )
            docs = [p + r for p, r in pairs]
            plens = np.array([len(p) for p, _ in pairs], dtype=np.int64)
        else:
            eos, bos = int(self.tok.eos_token_id), s["bos_id"]
            head = [bos] if bos is not None else []
            docs = [
                head + list(self.tok.encode(t)) + [eos]
                for t in records_to_texts(records, field=s["text_field"], start=start)
            ]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(docs), np.int64, int(lengths.sum()))
        limit = 1 << (8 * DTYPES[s["dtype"]].itemsize)
        if flat.size and (flat.min() < 0 or flat.max() >= limit):
            bad = int(flat.max()) if flat.max() >= limit else int(flat.min())
            raise DataError(
                f"records {start}-{start + len(records) - 1}: token id {bad} does not fit "
                f"{s['dtype']} (use --dtype uint32)"
            )
        return flat.astype(DTYPES[s["dtype"]]), lengths, plens, len(records)


def _worker_main(conn: Any, tokenizer_folder: str | None, settings: dict[str, Any]) -> None:
    """A tokenizing process: receives chunks, sends back results (or the error) in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    encoder, error = None, None
    try:
        encoder = _Encoder(tokenizer_folder, settings)
    except Exception as e:  # noqa: BLE001 - reported by the parent
        error = e
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        try:
            if encoder is None:
                assert error is not None
                raise error
            conn.send((True, encoder(task)))
        except Exception as e:  # noqa: BLE001 - re-raised in the parent
            conn.send((False, e))


def _chunks(
    records: Iterable[dict[str, Any]], size: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    it = iter(records)
    start = 0
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield start, chunk
        start += len(chunk)


def _encoded(
    tasks: Iterator[tuple[int, list[dict[str, Any]]]],
    workers: int,
    tokenizer_folder: str | None,
    settings: dict[str, Any],
) -> Iterator[tuple]:
    """Results of the chunks, in input order.

    Chunk ``i`` goes to worker ``i % workers``, which holds at most one chunk at a time, so
    memory stays bounded for any input size. Each worker has a pipe of its own (no lock is
    shared between processes), so stopping on an error or Ctrl-C is a plain kill + join.
    """
    if workers <= 1:
        encoder = _Encoder(tokenizer_folder, settings)
        yield from map(encoder, tasks)
        return
    ctx = multiprocessing.get_context()
    conns, procs = [], []
    try:
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child, tokenizer_folder, settings), daemon=True
            )
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        busy: deque = deque()
        for i, task in enumerate(tasks):
            w = i % workers
            if len(busy) == workers:  # worker w still holds chunk i - workers
                busy.popleft()
                yield _result(conns[w], procs[w])
            conns[w].send(task)
            busy.append(w)
        while busy:
            w = busy.popleft()
            yield _result(conns[w], procs[w])
        for c in conns:
            c.send(None)
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for c in conns:
            c.close()


def _result(conn: Any, proc: Any) -> tuple:
    try:
        ok, value = conn.recv()
    except EOFError:
        raise DataError(
            f"a tokenizing process ended unexpectedly (exit code {proc.exitcode}); try --workers 1"
        ) from None
    if not ok:
        raise value
    return value


class _ShardSink:
    """Distributes documents over shards of about ``shard_tokens`` tokens (whole documents;
    a longer document gets a shard of its own)."""

    def __init__(self, folder: Path, *, kind: str, dtype: str, shard_tokens: int) -> None:
        self.folder, self.kind, self.dtype, self.limit = folder, kind, dtype, shard_tokens
        self.entries: list[dict[str, Any]] = []
        self.writer: ShardWriter | None = None

    def add(self, flat: np.ndarray, lengths: np.ndarray, plens: np.ndarray | None) -> None:
        ends = np.cumsum(lengths)
        i, n = 0, lengths.size
        while i < n:
            if self.writer is None:
                name = f"shard-{len(self.entries):05d}.bin"
                self.writer = ShardWriter(self.folder / name, kind=self.kind, dtype=self.dtype)
            w = self.writer
            base = int(ends[i - 1]) if i else 0
            room = self.limit - w.num_tokens
            k = int(np.searchsorted(ends[i:] - base, room, side="right"))
            if k == 0 and w.num_documents == 0:
                k = 1
            if k:
                stop = int(ends[i + k - 1])
                w.write(
                    flat[base:stop], lengths[i : i + k], None if plens is None else plens[i : i + k]
                )
                i += k
            if k == 0 or w.num_tokens >= self.limit:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.entries.append(self.writer.close())
            self.writer = None


def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise DataError(f"{str(out)!r} already exists; pass --overwrite to replace it")
    if not is_prepared_folder(out):
        raise DataError(
            f"{str(out)!r} is not a prepared data folder (no {MANIFEST_NAME}); refusing to "
            "replace it: choose another --out"
        )


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_destination(out, overwrite)
    if not out.exists():
        os.rename(tmp, out)
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    fsync_dir(out.parent)


def _progress(enabled: bool) -> Any:
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        disable=not enabled,
        desc="prepare",
        unit=" records",
        file=sys.stderr,
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
    )


def _write_shards(
    records: Iterable[dict[str, Any]],
    tmp: Path,
    settings: dict[str, Any],
    *,
    tokenizer_folder: str | None,
    shard_tokens: int,
    workers: int,
    chunk_size: int,
    progress: bool,
) -> list[dict[str, Any]]:
    sink = _ShardSink(
        tmp, kind=settings["objective"], dtype=settings["dtype"], shard_tokens=shard_tokens
    )
    bar = _progress(progress)
    tokens = 0
    try:
        tasks = _chunks(records, chunk_size)
        # closing(): the workers stop at once when writing fails, not when collected
        with contextlib.closing(_encoded(tasks, workers, tokenizer_folder, settings)) as results:
            for flat, lengths, plens, n in results:
                sink.add(flat, lengths, plens)
                tokens += int(flat.size)
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
                bar.update(n)
        sink.close()
    finally:
        bar.close()
        if sink.writer is not None:  # an error: the temporary folder is removed anyway
            sink.writer.abort()
    return sink.entries


def _check_arguments(objective: str, **sizes: int) -> None:
    """``objective`` is one of the two, every one of ``sizes`` at least 1."""
    if objective not in ("pretrain", "sft"):
        raise DataError(f"objective must be 'pretrain' or 'sft', got {objective!r}")
    for name, value in sizes.items():
        if value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")


def _temporary_folder(out: Path) -> Path:
    """A new, empty folder beside ``out`` to write into before it is renamed to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def prepare_shards(
    records: Iterable[dict[str, Any]],
    out: str | os.PathLike,
    *,
    objective: str = "pretrain",
    tokenizer_folder: str | os.PathLike | None = None,
    text_field: str = "text",
    add_bos: bool = False,
    chat_template: bool = False,
    dtype: str = "auto",
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    chunk_size: int = 256,
    overwrite: bool = False,
    progress: bool = False,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize records into a prepared folder of token shards.

    Parameters
    ----------
    records : iterable of dict
        From :func:`~llada_ext.training.data.read_records` and/or ``load_hf_records``.
    out : path-like
        The folder to write (must not exist, be empty, or be a prepared folder with
        ``overwrite``).
    objective : {"pretrain", "sft"}
        Documents (``text_field``) or prompt/response examples.
    tokenizer_folder : path-like, optional
        Folder with ``tokenizer.json``; None is the byte tokenizer of the tiny preset.
    text_field, add_bos : str, bool
        Pre-training: JSONL field of the text; prepend BOS to every document.
    chat_template : bool
        SFT: wrap prompt/response pairs in the chat template.
    dtype : {"auto", "uint16", "uint32"}
        Token dtype ("auto": uint16 when the vocabulary fits).
    shard_tokens : int
        Tokens per shard (whole documents: a shard may hold one document more).
    workers : int
        Tokenizing processes (1: in this process). The output does not depend on it.
    chunk_size : int
        Records per task given to a worker.
    overwrite : bool
        Replace an existing prepared folder.
    progress : bool
        Show a progress bar on standard error.
    source : dict, optional
        How the records were read, recorded in the manifest.

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    DataError
        Bad settings, an existing destination, a record the loaders refuse, empty data.
    """
    from ..tokenizer import load_tokenizer

    _check_arguments(objective, shard_tokens=shard_tokens, workers=workers, chunk_size=chunk_size)
    out = Path(out)
    _check_destination(out, overwrite)
    tok_dir = str(tokenizer_folder) if tokenizer_folder is not None else None
    tokenizer = load_tokenizer(tok_dir)
    settings = {
        "objective": objective,
        "dtype": choose_dtype(int(tokenizer.vocab_size), dtype),
        "text_field": text_field,
        "bos_id": int(tokenizer.bos_token_id) if add_bos else None,
        "chat_template": bool(chat_template),
    }
    tmp = _temporary_folder(out)
    try:
        entries = _write_shards(
            records,
            tmp,
            settings,
            tokenizer_folder=tok_dir,
            shard_tokens=shard_tokens,
            workers=workers,
            chunk_size=chunk_size,
            progress=progress,
        )
        manifest = _finish_folder(tmp, entries, settings, tokenizer, tok_dir, add_bos, source)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug(
        "prepared %d %s and %d tokens in %d shard(s) (%s) in %s",
        manifest["num_documents"],
        "examples" if objective == "sft" else "documents",
        manifest["num_tokens"],
        len(entries),
        settings["dtype"],
        out,
    )
    return manifest


def _finish_folder(
    tmp: Path,
    entries: list[dict[str, Any]],
    settings: dict[str, Any],
    tokenizer: Any,
    tok_dir: str | None,
    add_bos: bool,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    """Tokenizer copy, checksums and manifest (written last) of a folder whose shards exist."""
    from .. import __version__

    if not entries:
        what = "SFT examples" if settings["objective"] == "sft" else "documents"
        raise DataError(f"no {what}: the data is empty")
    copied = []
    info = tokenizer_info(tokenizer, tok_dir)
    if info["type"] == "tokenizers" and tok_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tok_dir) / name).is_file():
                shutil.copyfile(Path(tok_dir) / name, tmp / name)
                copied.append(name)
    info["files"] = copied
    names = [e["name"] for e in entries] + copied
    (tmp / CHECKSUMS_NAME).write_text(checksum_lines(tmp, names))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "objective": settings["objective"],
        "dtype": settings["dtype"],
        "num_tokens": sum(e["num_tokens"] for e in entries),
        "num_documents": sum(e["num_documents"] for e in entries),
        "seq_len": None,  # rows are cut / padded to the training seq_len when read
        "eos_token_id": int(tokenizer.eos_token_id),
        "add_bos": bool(add_bos),
        "text_field": settings["text_field"] if settings["objective"] == "pretrain" else None,
        "chat_template": settings["chat_template"] if settings["objective"] == "sft" else None,
        "tokenizer": info,
        "shards": entries,
        "checksums": CHECKSUMS_NAME,
        "source": source or {},
        "created_by": f"llada-ext {__version__}",
    }
    with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    return manifest
