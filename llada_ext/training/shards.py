"""Pre-tokenized token shards, read through memory maps.

A prepared folder (written by :func:`llada_ext.training.prepare.prepare_shards`, i.e.
``llada-ext prepare``)::

    <folder>/manifest.json       what the folder holds: objective, dtype, counts, shards,
                                 tokenizer, how the data was read
    <folder>/checksums.sha256    SHA-256 of every shard and tokenizer file (sha256sum format)
    <folder>/shard-00000.bin ... the shards
    <folder>/tokenizer.json ...  a copy of the tokenizer's files (``tokenizers`` ones only)

A shard file, all numbers little-endian::

    offset 0        header, 64 bytes: magic b"LLADATOK", u32 format version (1), u32 kind
                    (1 = pre-training token stream, 2 = SFT examples), u32 bytes per token
                    (2 = uint16, 4 = uint32), u32 reserved (0), u64 token count T,
                    u64 document / example count D, zero padding
    offset 64       tokens: T x uint16 or uint32
    next 8-aligned  index: D + 1 x u64, where each document starts in the tokens (0 ... T)
    then            SFT only: D x u32 prompt lengths

Pre-training shards hold the documents laid out as
:func:`~llada_ext.training.data.pack_documents` lays them out (each document's tokens, after
BOS with ``add_bos``, then EOS). All shards together are one token stream that is cut into
rows of the training ``seq_len`` when read, the last row padded with EOS: the sequence
length is chosen at training time and the rows are exactly those of
:func:`~llada_ext.training.data.build_pretrain_dataset`. SFT shards hold each example's
``prompt + response`` tokens and its prompt length; rows are laid out when read as
:func:`~llada_ext.training.data.build_sft_dataset` lays them out (cut to ``seq_len``, padded
with EOS; an example whose prompt leaves no room for an answer token is dropped).
:class:`ShardDataset` therefore gives :class:`~llada_ext.training.data.DataStream` the same
rows, in the same order, as the in-memory dataset of the same text.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..model_files import CHECKSUMS_NAME, file_sha256, verify_checksums
from .data import DataError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Shard",
    "ShardDataset",
    "ShardHeader",
    "ShardWriter",
    "check_tokenizer",
    "choose_dtype",
    "is_prepared_folder",
    "load_manifest",
    "open_shard",
    "tokenizer_info",
]

logger = logging.getLogger(__name__)

MAGIC = b"LLADATOK"
FORMAT_VERSION = 1
HEADER_BYTES = 64
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llada-ext-token-shards"
KINDS = {"pretrain": 1, "sft": 2}
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_HEADER = struct.Struct("<8sIIIIQQ")
_INDEX_DTYPE = np.dtype("<u8")
_PLEN_DTYPE = np.dtype("<u4")


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class ShardHeader:
    """The fixed header of a shard file (see the module docs for the layout)."""

    kind: int
    itemsize: int
    num_tokens: int
    num_documents: int

    def pack(self) -> bytes:
        """The 64 header bytes."""
        raw = _HEADER.pack(
            MAGIC, FORMAT_VERSION, self.kind, self.itemsize, 0, self.num_tokens, self.num_documents
        )
        return raw.ljust(HEADER_BYTES, b"\0")

    @property
    def index_offset(self) -> int:
        """Byte offset of the document index."""
        return _align8(HEADER_BYTES + self.num_tokens * self.itemsize)

    @property
    def file_size(self) -> int:
        """Size in bytes of a complete shard with this header."""
        size = self.index_offset + (self.num_documents + 1) * _INDEX_DTYPE.itemsize
        if self.kind == KINDS["sft"]:
            size += self.num_documents * _PLEN_DTYPE.itemsize
        return size


def choose_dtype(vocab_size: int, requested: str = "auto") -> str:
    """The token dtype of a prepared folder: "uint16" when every id fits, else "uint32".

    Parameters
    ----------
    vocab_size : int
        Number of token ids of the tokenizer.
    requested : {"auto", "uint16", "uint32"}
        "auto" picks the smallest that fits.

    Returns
    -------
    str
        "uint16" or "uint32".

    Raises
    ------
    DataError
        If "uint16" is requested for a vocabulary of more than 65536 ids.
    """
    if requested not in ("auto", "uint16", "uint32"):
        raise DataError(f"token dtype must be 'auto', 'uint16' or 'uint32', got {requested!r}")
    if requested == "uint16" and vocab_size > 1 << 16:
        raise DataError(
            f"the tokenizer has {vocab_size} ids but uint16 holds ids below 65536 only: "
            "use --dtype uint32 (or auto)"
        )
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    return requested


class ShardWriter:
    """Writes one shard file: tokens streamed in, index and header written by :meth:`close`.

    Parameters
    ----------
    path : path-like
        The shard file to create.
    kind : {"pretrain", "sft"}
        What the shard holds.
    dtype : {"uint16", "uint32"}
        Token dtype.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str, dtype: str) -> None:
        self.path = Path(path)
        self.kind = KINDS[kind]
        self.dtype = DTYPES[dtype]
        self.num_tokens = 0
        self._lengths: list[np.ndarray] = []
        self._plens: list[np.ndarray] = []
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(b"\0" * HEADER_BYTES)

    @property
    def num_documents(self) -> int:
        """Documents (or examples) written so far."""
        return sum(len(x) for x in self._lengths)

    def write(
        self, tokens: np.ndarray, lengths: np.ndarray, prompt_lengths: np.ndarray | None = None
    ) -> None:
        """Append documents: their concatenated ``tokens`` and each one's length (and, for
        SFT, prompt length)."""
        if (prompt_lengths is None) != (self.kind == KINDS["pretrain"]):
            raise ValueError("prompt lengths are given for SFT shards, and only for them")
        self._f.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.num_tokens += int(tokens.size)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        if prompt_lengths is not None:
            self._plens.append(np.asarray(prompt_lengths, dtype=np.int64))

    def abort(self) -> None:
        """Close the file without completing it (the caller removes it)."""
        self._f.close()

    def close(self) -> dict[str, Any]:
        """Write the index and header, flush to disk; returns the shard's manifest entry."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        header = ShardHeader(self.kind, self.dtype.itemsize, self.num_tokens, int(lengths.size))
        f = self._f
        f.write(b"\0" * (header.index_offset - f.tell()))
        offsets = np.zeros(lengths.size + 1, dtype=_INDEX_DTYPE)
        np.cumsum(lengths, out=offsets[1:])
        f.write(offsets.tobytes())
        if self.kind == KINDS["sft"]:
            plens = np.concatenate(self._plens) if self._plens else np.zeros(0, np.int64)
            f.write(plens.astype(_PLEN_DTYPE).tobytes())
        f.seek(0)
        f.write(header.pack())
        f.flush()
        os.fsync(f.fileno())
        f.close()
        return {
            "name": self.path.name,
            "num_tokens": header.num_tokens,
            "num_documents": header.num_documents,
        }


@dataclass
class Shard:
    """An opened shard: read-only memory maps of its sections."""

    path: Path
    header: ShardHeader
    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray | None


def _section(raw: np.ndarray, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` at byte ``offset`` of the shard's memory map (a view)."""
    return raw[offset : offset + count * dtype.itemsize].view(dtype)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and check a shard's header and size (the data is not read).

    Raises
    ------
    DataError
        Naming the file: missing, not a shard (magic), unsupported version, corrupted header,
        truncated or too long.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard file not found: {str(path)!r}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(
            f"{str(path)!r} is truncated: {size} bytes, less than the {HEADER_BYTES}-byte header"
        )
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    magic, version, kind, itemsize, reserved, n_tok, n_doc = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{str(path)!r} is not a llada-ext token shard (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{str(path)!r} has shard format version {version}; this version of llada-ext "
            f"reads version {FORMAT_VERSION}: prepare the data again"
        )
    if kind not in KINDS.values() or itemsize not in (2, 4) or reserved != 0:
        raise DataError(
            f"{str(path)!r} has a corrupted header (kind {kind}, {itemsize} bytes per token)"
        )
    header = ShardHeader(kind, itemsize, n_tok, n_doc)
    if size < header.file_size:
        raise DataError(
            f"{str(path)!r} is truncated: {size} bytes, its header describes "
            f"{header.file_size} ({n_tok} tokens, {n_doc} documents)"
        )
    if size > header.file_size:
        raise DataError(
            f"{str(path)!r} is corrupted: {size} bytes, its header describes {header.file_size}"
        )
    return header


def open_shard(path: str | os.PathLike) -> Shard:
    """Open a shard: check its header, size and index, and memory-map its sections.

    Parameters
    ----------
    path : path-like
        The shard file.

    Returns
    -------
    Shard

    Raises
    ------
    DataError
        Naming the file, for any inconsistency (see :func:`read_header`) or a corrupted index.
    """
    path = Path(path)
    h = read_header(path)
    dtype = DTYPES["uint16" if h.itemsize == 2 else "uint32"]
    # One read-only map of the whole file (one open file per shard), viewed as its sections.
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tokens = _section(raw, dtype, HEADER_BYTES, h.num_tokens)
    offsets = _section(raw, _INDEX_DTYPE, h.index_offset, h.num_documents + 1)
    plens = None
    if h.kind == KINDS["sft"]:
        plen_at = h.index_offset + (h.num_documents + 1) * _INDEX_DTYPE.itemsize
        plens = _section(raw, _PLEN_DTYPE, plen_at, h.num_documents)
    ok = int(offsets[0]) == 0 and int(offsets[-1]) == h.num_tokens
    ok = ok and bool(np.all(offsets[1:] >= offsets[:-1]))
    if ok and plens is not None:
        ok = bool(np.all(plens.astype(np.int64) <= np.diff(offsets.astype(np.int64))))
    if not ok:
        raise DataError(f"{str(path)!r} has a corrupted document index")
    return Shard(path, h, tokens, offsets, plens)


def is_prepared_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a prepared-data manifest."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def _manifest_error(path: Path, what: str) -> DataError:
    return DataError(f"{str(path)!r}: {what}; prepare the data again with `llada-ext prepare`")


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check the manifest of a prepared folder.

    Raises
    ------
    DataError
        If the folder or its manifest is missing, or the manifest is malformed.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise DataError(f"prepared data folder not found: {str(folder)!r}")
    if not path.is_file():
        raise DataError(
            f"{str(folder)!r} has no {MANIFEST_NAME}: not a folder written by `llada-ext prepare`"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _manifest_error(path, f"not readable JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise _manifest_error(path, f"not a {MANIFEST_FORMAT} manifest")
    if m.get("version") != FORMAT_VERSION:
        raise _manifest_error(path, f"format version {m.get('version')!r} is not supported")
    if m.get("objective") not in KINDS or m.get("dtype") not in DTYPES:
        raise _manifest_error(path, "bad 'objective' or 'dtype'")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _manifest_error(path, "no shards listed")
    for s in shards:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise _manifest_error(path, f"bad shard entry {s!r}")
        if not all(isinstance(s.get(k), int) for k in ("num_tokens", "num_documents")):
            raise _manifest_error(path, f"bad counts in shard entry {s!r}")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab_size"), int):
        raise _manifest_error(path, "no tokenizer description")
    if not isinstance(m.get("eos_token_id"), int):
        raise _manifest_error(path, "no 'eos_token_id'")
    return m


def _verify_folder(folder: Path, manifest: dict[str, Any]) -> None:
    """SHA-256 of every file the checksum manifest lists; every shard must be listed."""
    if not (folder / CHECKSUMS_NAME).is_file():
        raise DataError(f"{str(folder)!r} has no {CHECKSUMS_NAME}: the shards cannot be checked")
    try:
        names = set(verify_checksums(folder))
    except ValueError as e:
        raise DataError(str(e)) from None
    missing = [s["name"] for s in manifest["shards"] if s["name"] not in names]
    if missing:
        raise DataError(f"{str(folder / CHECKSUMS_NAME)!r} does not list {missing[0]!r}")


def tokenizer_info(tokenizer: Any, folder: str | os.PathLike | None) -> dict[str, Any]:
    """What a manifest records of a tokenizer (type, vocabulary size, special ids, and the
    SHA-256 of ``tokenizer.json`` for a ``tokenizers`` one)."""
    from ..tokenizer import ByteTokenizer

    byte = isinstance(tokenizer, ByteTokenizer)
    info: dict[str, Any] = {"type": "byte" if byte else "tokenizers"}
    info["vocab_size"] = int(tokenizer.vocab_size)
    for name in ("bos_token_id", "eos_token_id", "eot_token_id", "mask_token_id"):
        value = getattr(tokenizer, name, None)
        info[name] = None if value is None else int(value)
    json_path = Path(folder) / "tokenizer.json" if folder is not None else None
    info["tokenizer_json_sha256"] = (
        file_sha256(json_path) if not byte and json_path is not None else None
    )
    return info


def check_tokenizer(
    manifest: dict[str, Any], tokenizer: Any, folder: str | os.PathLike | None
) -> None:
    """Raise ``DataError`` unless ``tokenizer`` is the one the folder was prepared with."""
    have = tokenizer_info(tokenizer, folder)
    want = manifest["tokenizer"]
    diff = [k for k in have if k in want and have[k] != want[k]]
    if diff:
        k = diff[0]
        raise DataError(
            f"the tokenizer ({folder or 'byte-level'}) is not the one the data was prepared "
            f"with: {k} is {have[k]!r}, the data has {want[k]!r}; pass the same --tokenizer "
            "or prepare the data again"
        )


class ShardDataset:
    """Training rows read from a prepared folder through memory maps.

    Presents the interface of :class:`~llada_ext.training.data.SequenceDataset` that
    :class:`~llada_ext.training.data.DataStream` and the trainer use (``len``, ``seq_len``,
    ``is_sft``, ``rows``) with the same rows as the in-memory dataset of the same data. Memory
    use does not grow with the data, except one int64 per kept example for SFT data of which
    some examples are dropped at this ``seq_len``; each shard keeps one file open (its map).

    Parameters
    ----------
    folder : path-like
        The prepared folder.
    seq_len : int
        Tokens per row.
    objective : {"pretrain", "sft"}, optional
        Refuse a folder prepared for the other objective.
    verify : bool
        Check the SHA-256 of every shard (headers, sizes and indexes are always checked).

    Attributes
    ----------
    manifest : dict
        The folder's manifest.
    dropped : int
        SFT examples left out because their prompt is not shorter than ``seq_len``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        seq_len: int,
        objective: str | None = None,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        if seq_len < 1:
            raise DataError(f"sequence length must be >= 1, got {seq_len}")
        self.manifest = m = load_manifest(self.folder)
        if objective is not None and m["objective"] != objective:
            raise DataError(
                f"{str(self.folder)!r} holds {m['objective']} data, not {objective} data "
                f"(use `llada-ext {'sft' if m['objective'] == 'sft' else 'train'}`, or prepare "
                "the data for this objective)"
            )
        self.shards = [self._open(s) for s in m["shards"]]
        if verify:
            _verify_folder(self.folder, m)
        self.eos_id = int(m["eos_token_id"])
        self._seq_len = int(seq_len)
        self.dropped = 0
        self._kept: np.ndarray | None = None
        if m["objective"] == "sft":
            counts = [s.header.num_documents for s in self.shards]
            self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._select_examples()
            self._len = int(self._starts[-1]) if self._kept is None else int(self._kept.size)
        else:
            counts = [s.header.num_tokens for s in self.shards]
            self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            total = int(self._starts[-1])
            if total == 0:
                raise DataError(f"{str(self.folder)!r} holds no tokens")
            self._len = -(-total // self._seq_len)

    def _open(self, entry: dict[str, Any]) -> Shard:
        shard = open_shard(self.folder / entry["name"])
        h = shard.header
        want = (KINDS[self.manifest["objective"]], DTYPES[self.manifest["dtype"]].itemsize)
        counts = (entry["num_tokens"], entry["num_documents"])
        if (h.kind, h.itemsize) != want or (h.num_tokens, h.num_documents) != counts:
            raise DataError(f"{str(shard.path)!r} does not match the folder's {MANIFEST_NAME}")
        return shard

    def _select_examples(self) -> None:
        kept = []
        for start, shard in zip(self._starts[:-1], self.shards):
            assert shard.prompt_lengths is not None
            keep = shard.prompt_lengths.astype(np.int64) < self._seq_len
            self.dropped += int(keep.size - keep.sum())
            kept.append(np.flatnonzero(keep) + start)
        if self.dropped:
            self._kept = np.concatenate(kept)
        if self.dropped == int(self._starts[-1]):
            raise DataError(
                f"no usable SFT examples ({self.dropped} dropped because the prompt is not "
                f"shorter than the sequence length {self._seq_len})"
            )

    def __len__(self) -> int:
        return self._len

    @property
    def seq_len(self) -> int:
        """Length ``L`` of every row."""
        return self._seq_len

    @property
    def is_sft(self) -> bool:
        """True when the rows carry prompt lengths."""
        return self.manifest["objective"] == "sft"

    def _stream(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` with the pre-training token stream from ``start`` (EOS past its end)."""
        stop = min(start + out.size, int(self._starts[-1]))
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            base = int(self._starts[s])
            toks = self.shards[s].tokens
            a, b = pos - base, min(stop - base, toks.size)
            out[pos - start : pos - start + b - a] = toks[a:b]
            pos += b - a
            s += 1

    def _example(self, j: int, out: np.ndarray) -> int:
        """Fill ``out`` with SFT example ``j`` (cut to the row); returns its prompt length."""
        s = int(np.searchsorted(self._starts, j, side="right")) - 1
        shard = self.shards[s]
        k = j - int(self._starts[s])
        a, b = int(shard.offsets[k]), int(shard.offsets[k + 1])
        b = min(b, a + out.size)
        out[: b - a] = shard.tokens[a:b]
        assert shard.prompt_lengths is not None
        return int(shard.prompt_lengths[k])

    def rows(self, indices: Any) -> tuple[Tensor, Tensor | None]:
        """Rows ``indices``: int64 ``[b, L]`` tokens and, for SFT, int64 ``[b]`` prompt
        lengths (None for pre-training data)."""
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < self._len:
                raise IndexError(f"row {i} is out of range [0, {self._len})")
        out = np.full((len(idx), self._seq_len), self.eos_id, dtype=np.int64)
        if not self.is_sft:
            for r, i in enumerate(idx):
                self._stream(i * self._seq_len, out[r])
            return torch.from_numpy(out), None
        plens = np.zeros(len(idx), dtype=np.int64)
        for r, i in enumerate(idx):
            j = i if self._kept is None else int(self._kept[i])
            plens[r] = self._example(j, out[r])
        return torch.from_numpy(out), torch.from_numpy(plens)
