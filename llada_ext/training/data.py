"""Training data: reading text / JSONL / Hugging Face datasets, tokenising, packing; the
deterministic, resumable, rank-sharded order (:class:`DataStream`, from
:mod:`llada_ext.training.order`) is importable from here as well.

Pre-training data is a list of documents; each is tokenised, followed by EOS, concatenated and
cut into fixed-length sequences (the last one padded with EOS). SFT data is a list of
(prompt, response) pairs; each becomes ``prompt + response + EOS...`` padded with EOS to the
fixed length, and its prompt length is kept so the prompt is never masked (Alg. 2).

The order of sequences is a fresh permutation per epoch keyed by ``(seed, epoch)`` and
evaluated position by position (:mod:`llada_ext.training.order`: no per-epoch array); the
stream's whole state is one integer position, so a checkpoint can store it and a resumed run
sees exactly the sequences it would have seen. Any dataset with ``len``, ``seq_len``,
``is_sft`` and ``rows(indices)`` can be streamed: :class:`SequenceDataset` (in memory) and
:class:`~llada_ext.training.shards.ShardDataset` (memory-mapped token shards) give the same
batches for the same data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .order import Batch, DataStream, SequenceSource

__all__ = [
    "Batch",
    "DataError",
    "DataStream",
    "SequenceDataset",
    "SequenceSource",
    "build_pretrain_dataset",
    "build_sft_dataset",
    "expand_paths",
    "load_hf_records",
    "pack_documents",
    "read_records",
    "records_to_pairs",
    "records_to_texts",
]


_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Turn files and folders into a sorted list of data files.

    Parameters
    ----------
    paths : sequence of path-like
        Files (any suffix) or folders (searched recursively for .txt/.md/.jsonl/.json files).

    Returns
    -------
    list of Path
        The data files in a stable order.

    Raises
    ------
    DataError
        If a path does not exist or a folder holds no data file.
    """
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.is_file() and f.suffix in _TEXT_SUFFIXES + _JSONL_SUFFIXES
            )
            if not found:
                raise DataError(f"no .txt/.md/.jsonl/.json files in folder {str(path)!r}")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(f"data file not found: {str(path)!r}")
    return out


def _is_jsonl(path: Path, fmt: str) -> bool:
    if fmt == "jsonl":
        return True
    if fmt == "text":
        return False
    if fmt != "auto":
        raise DataError(f"data format must be 'auto', 'text' or 'jsonl', got {fmt!r}")
    return path.suffix in _JSONL_SUFFIXES


def _is_json_array(path: Path) -> bool:
    """A .json file whose first non-blank character is '[' (one array of records)."""
    if path.suffix != ".json":
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(1 << 16)
            if not block:
                return False
            stripped = block.lstrip()
            if stripped:
                return stripped.startswith("[")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if _is_json_array(path):
        # A .json file holding one array of records is accepted as well.
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: item {i} is not a JSON object")
            yield rec
        return
    # Line by line: memory stays flat for files of any size.
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise DataError(f"{path}:{lineno}: not valid JSON ({why})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            yield rec


def read_records(
    paths: Sequence[str | os.PathLike], *, fmt: str = "auto"
) -> Iterator[dict[str, Any]]:
    """Yield one record (dict) per JSONL line or per text file.

    A text file becomes the single record ``{"text": <file contents>}``.

    Parameters
    ----------
    paths : sequence of path-like
        Files or folders (see :func:`expand_paths`).
    fmt : {"auto", "text", "jsonl"}
        How to read the files; "auto" decides by suffix (.jsonl/.json/.ndjson are JSONL).

    Yields
    ------
    dict
        One record.
    """
    for path in expand_paths(paths):
        if _is_jsonl(path, fmt):
            try:
                yield from _read_jsonl(path)
            except UnicodeDecodeError:
                raise DataError(f"{path}: not UTF-8 text") from None
        else:
            try:
                yield {"text": path.read_text(encoding="utf-8")}
            except UnicodeDecodeError:
                raise DataError(f"{path}: not UTF-8 text") from None


def load_hf_records(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    limit: int | None = None,
    streaming: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield records of a Hugging Face ``datasets`` dataset.

    ``datasets`` is imported only here, so it is an optional dependency.

    Parameters
    ----------
    name : str
        Dataset name on the hub, or a local dataset folder / script.
    config : str, optional
        Dataset configuration name.
    split : str
        Split to read.
    limit : int, optional
        Stop after this many records.
    streaming : bool
        Stream instead of downloading the whole split.

    Yields
    ------
    dict
        One record.

    Raises
    ------
    DataError
        If ``datasets`` is not installed or the dataset cannot be loaded (e.g. no network).
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            "reading a Hugging Face dataset needs the `datasets` package "
            "(pip install datasets), or pass local .txt/.jsonl files instead"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - network errors, unknown names, bad configs
        raise DataError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Check the name and your network connection, or pass "
            "local files."
        ) from None
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        yield dict(rec)


def records_to_texts(
    records: Iterable[dict[str, Any]], *, field: str = "text", start: int = 0
) -> Iterator[str]:
    """Extract the pre-training text of each record.

    Parameters
    ----------
    records : iterable of dict
        Records from :func:`read_records` or :func:`load_hf_records`.
    field : str
        Name of the text field.
    start : int
        Number of the first record in error messages (for a slice of a longer stream).

    Yields
    ------
    str
        Non-empty document texts.
    """
    for i, rec in enumerate(records, start):
        if field not in rec:
            raise DataError(
                f"record {i} has no {field!r} field (fields: {sorted(rec)}); "
                "pre-training JSONL needs one text field per line"
            )
        text = rec[field]
        if not isinstance(text, str):
            raise DataError(f"record {i}: field {field!r} must be a string")
        if text:
            yield text


def records_to_pairs(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    chat_template: bool = False,
    prompt_field: str = "prompt",
    response_field: str = "response",
    start: int = 0,
) -> Iterator[tuple[list[int], list[int]]]:
    """Turn SFT records into (prompt ids, response ids) pairs.

    Accepted records: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role": ...,
    "content": ...}, ...]}`` whose last message is the assistant's answer (earlier turns form
    the prompt through the tokenizer's chat template).

    Parameters
    ----------
    records : iterable of dict
        The records.
    tokenizer : object
        Has ``encode`` and ``apply_chat_template`` (see :mod:`llada_ext.tokenizer`).
    chat_template : bool
        Wrap prompt/response pairs in the chat template as well.
    prompt_field, response_field : str
        Field names of the pair format.
    start : int
        Number of the first record in error messages (for a slice of a longer stream).

    Yields
    ------
    tuple of (list of int, list of int)
        Prompt tokens and response tokens (the response ends with EoT when the chat template
        is used and the tokenizer has one; EOS padding is added later).
    """
    eot = getattr(tokenizer, "eot_token_id", None)
    for i, rec in enumerate(records, start):
        if "messages" in rec:
            msgs = rec["messages"]
            if (
                not isinstance(msgs, list)
                or len(msgs) < 2
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
            ):
                raise DataError(
                    f"record {i}: 'messages' must be a list of at least two "
                    "{'role': ..., 'content': ...} objects"
                )
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"record {i}: the last message must have role 'assistant'")
            prompt = list(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True))
            response = list(tokenizer.encode(msgs[-1]["content"]))
            if eot is not None:
                response.append(int(eot))
        elif prompt_field in rec and response_field in rec:
            p, r = rec[prompt_field], rec[response_field]
            if not isinstance(p, str) or not isinstance(r, str):
                raise DataError(
                    f"record {i}: {prompt_field!r} and {response_field!r} must be strings"
                )
            if chat_template:
                prompt = list(
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": p}], add_generation_prompt=True
                    )
                )
                response = list(tokenizer.encode(r))
                if eot is not None:
                    response.append(int(eot))
            else:
                prompt = list(tokenizer.encode(p))
                response = list(tokenizer.encode(r))
        else:
            raise DataError(
                f"record {i} has fields {sorted(rec)}; SFT data needs "
                f"{prompt_field!r}/{response_field!r} or 'messages'"
            )
        yield prompt, response


def pack_documents(
    docs: Iterable[Sequence[int]], *, seq_len: int, eos_id: int, bos_id: int | None = None
) -> np.ndarray:
    """Concatenate token lists (each followed by EOS) and cut into fixed-length rows.

    Parameters
    ----------
    docs : iterable of sequence of int
        Tokenised documents.
    seq_len : int
        Length of every packed sequence.
    eos_id : int
        Separator appended after each document; also pads the last row.
    bos_id : int, optional
        If given, prepended to each document.

    Returns
    -------
    numpy.ndarray
        int64 ``[N, seq_len]``.
    """
    if seq_len < 1:
        raise DataError(f"sequence length must be >= 1, got {seq_len}")
    parts: list[np.ndarray] = []
    for d in docs:
        toks = list(d)
        if bos_id is not None:
            toks = [bos_id] + toks
        toks.append(eos_id)
        parts.append(np.asarray(toks, dtype=np.int64))
    if not parts:
        raise DataError("no documents: the data is empty")
    flat = np.concatenate(parts)
    n = -(-flat.size // seq_len)
    out = np.full(n * seq_len, eos_id, dtype=np.int64)
    out[: flat.size] = flat
    return out.reshape(n, seq_len)


@dataclass
class SequenceDataset:
    """Fixed-length training sequences held in memory.

    Attributes
    ----------
    tokens : Tensor
        int64 ``[N, L]``.
    prompt_lengths : Tensor or None
        int64 ``[N]`` for SFT data, None for pre-training data.
    """

    tokens: Tensor
    prompt_lengths: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape[0] < 1:
            raise DataError("the dataset is empty")
        if self.prompt_lengths is not None and self.prompt_lengths.shape != (self.tokens.shape[0],):
            raise ValueError("prompt_lengths must have one entry per sequence")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """Length ``L`` of every sequence."""
        return int(self.tokens.shape[1])

    @property
    def is_sft(self) -> bool:
        """True when the sequences carry prompt lengths."""
        return self.prompt_lengths is not None

    def rows(self, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """Sequences ``indices``: int64 ``[b, L]`` tokens and int64 ``[b]`` prompt lengths
        (None for pre-training data)."""
        idx = list(indices)
        pl = self.prompt_lengths[idx] if self.prompt_lengths is not None else None
        return self.tokens[idx], pl


def build_pretrain_dataset(
    texts: Iterable[str],
    tokenizer: Any,
    *,
    seq_len: int,
    add_bos: bool = False,
) -> SequenceDataset:
    """Tokenise documents and pack them into ``[N, seq_len]`` sequences.

    Parameters
    ----------
    texts : iterable of str
        Documents.
    tokenizer : object
        Has ``encode`` and ``eos_token_id`` (and ``bos_token_id`` when ``add_bos``).
    seq_len : int
        Sequence length.
    add_bos : bool
        Prepend BOS to every document.

    Returns
    -------
    SequenceDataset
    """
    bos = tokenizer.bos_token_id if add_bos else None
    arr = pack_documents(
        (tokenizer.encode(t) for t in texts),
        seq_len=seq_len,
        eos_id=int(tokenizer.eos_token_id),
        bos_id=bos,
    )
    return SequenceDataset(torch.from_numpy(arr))


def build_sft_dataset(
    pairs: Iterable[tuple[Sequence[int], Sequence[int]]],
    *,
    seq_len: int,
    eos_id: int,
) -> tuple[SequenceDataset, int]:
    """Lay out SFT pairs as ``prompt + response + EOS padding`` of length ``seq_len``.

    Pairs whose response does not fit are cut (the answer then has no EOS); pairs whose prompt
    leaves no room for at least one answer token are dropped.

    Parameters
    ----------
    pairs : iterable of (sequence of int, sequence of int)
        Prompt and response tokens.
    seq_len : int
        Total length of every row.
    eos_id : int
        The padding token (trained on, as in the paper).

    Returns
    -------
    tuple of (SequenceDataset, int)
        The dataset and the number of dropped pairs.
    """
    rows: list[np.ndarray] = []
    plens: list[int] = []
    dropped = 0
    for prompt, response in pairs:
        if len(prompt) >= seq_len:
            dropped += 1
            continue
        row = np.full(seq_len, eos_id, dtype=np.int64)
        seq = list(prompt) + list(response)
        seq = seq[:seq_len]
        row[: len(seq)] = seq
        rows.append(row)
        plens.append(len(prompt))
    if not rows:
        raise DataError(
            f"no usable SFT examples ({dropped} dropped because the prompt is not shorter "
            f"than the sequence length {seq_len})"
        )
    ds = SequenceDataset(torch.from_numpy(np.stack(rows)), torch.tensor(plens, dtype=torch.long))
    return ds, dropped
