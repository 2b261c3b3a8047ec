"""A model folder is untrusted input: its index, safetensors headers and config are checked here
before anything is built or loaded.

- Shard names from ``model.safetensors.index.json`` must be plain file names inside the folder
  (no ``..``, no absolute path, no link that leads out).
- Every safetensors header is read and validated without loading any tensor data: a truncated,
  corrupted or non-safetensors file is a ``ValueError`` naming the file.
- The sizes in ``config.json`` must agree with the tensors the headers declare (names, shapes,
  floating dtypes); a mismatch is a ``ValueError`` naming the field and both values, found
  within a second, before a module is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

WEIGHTS_NAME = "model.safetensors"
# sha256sum-style manifest of the weight files save_pretrained wrote (the last file it writes).
CHECKSUMS_NAME = "checksums.sha256"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_ITEM_BYTES = {**_FLOAT_DTYPES, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

_BLOCK_WEIGHTS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


logger = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_lines(folder: Path, names: list[str]) -> str:
    """The manifest text (``sha256sum`` format) of `names`, files of `folder`."""
    return "".join(f"{file_sha256(folder / n)}  {n}\n" for n in names)


def write_checksums(folder: Path, names: list[str]) -> None:
    """Writes the manifest of `names` (files of `folder`) into `folder`."""
    (folder / CHECKSUMS_NAME).write_text(checksum_lines(folder, names))


def verify_checksums(folder: Path, manifest_name: str = CHECKSUMS_NAME) -> list[str]:
    """Checks every file a manifest of the folder lists; ValueError naming the file that differs.

    Returns the names it verified: none when the folder has no such manifest (the published
    checkpoints are not checked).
    """
    manifest = folder / manifest_name
    if not manifest.is_file():
        return []
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        raise ValueError(f"{str(manifest)!r} is not a readable checksum manifest") from None
    names = []
    for line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{str(manifest)!r}: malformed line {line!r}")
        digest, name = parts
        path = _inside(folder, folder.resolve(), manifest_name, name)
        if file_sha256(path) != digest:
            raise ValueError(
                f"{str(path)!r} does not match its SHA-256 in {manifest_name}: the file is "
                "corrupted or was changed after it was written"
            )
        names.append(name)
    if not names:
        raise ValueError(f"{str(manifest)!r} lists no file")
    return names


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every weight of a LLaDA model with this config (published layout).

    The same names and shapes as ``LLaDAModel(config).state_dict()``, computed from the config
    alone, so a checkpoint can be checked against it before any module exists.
    """
    d, v, mlp = config.d_model, config.vocab_size, config.mlp_hidden_size
    kv = config.n_kv_heads * config.head_dim
    block = {
        "attn_norm": (d,),
        "q_proj": (d, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "attn_out": (d, d),
        "ff_norm": (d,),
        "ff_proj": (mlp, d),
        "up_proj": (mlp, d),
        "ff_out": (d, mlp),
    }
    shapes = {"model.transformer.wte.weight": (v, d)}
    for i in range(config.n_layers):
        for name, shape in block.items():
            shapes[f"model.transformer.blocks.{i}.{name}.weight"] = shape
    shapes["model.transformer.ln_f.weight"] = (d,)
    shapes["model.transformer.ff_out.weight"] = (v, d)
    return shapes


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, each checked to lie inside it."""
    index_path = folder / WEIGHTS_INDEX_NAME
    single = folder / WEIGHTS_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(
                f"{str(index_path)!r} is not a valid safetensors index "
                "(expected a JSON object with a 'weight_map' dict)"
            ) from e
        root = folder.resolve()
        files = []
        for name, fname in weight_map.items():
            path = _inside(folder, root, name, fname)
            if path not in files:
                files.append(path)
        return files
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {str(folder)!r}")


def _inside(folder: Path, root: Path, name: object, fname: object) -> Path:
    """The shard `fname` of index entry `name`, refused unless it is a file in the folder."""
    entry = f"{WEIGHTS_INDEX_NAME} entry {name!r} -> {fname!r}"
    if not isinstance(fname, str) or not fname or os.path.isabs(fname):
        raise ValueError(f"{entry}: a shard must be a file name inside the model folder")
    parts = Path(fname).parts
    if ".." in parts or len(parts) != 1:
        raise ValueError(f"{entry}: a shard must be a file name inside the model folder")
    path = folder / fname
    if path.resolve().parent != root:
        raise ValueError(f"{entry}: the shard leads outside the model folder")
    if not path.is_file():
        raise FileNotFoundError(f"shard {fname!r} named in {WEIGHTS_INDEX_NAME} is missing")
    return path


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header, validated against the file.

    Raises
    ------
    ValueError
        Naming the file, when it is not a complete, well-formed safetensors file.
    """
    size = path.stat().st_size
    bad = f"{str(path)!r} is not a readable safetensors file"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{bad}: {size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{bad}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{bad}: corrupted header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: the header is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _check_entry(bad, name, info, data_bytes)
    return out


def _check_entry(bad: str, name: str, info: object, data_bytes: int) -> tuple[str, tuple]:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        ok = (
            dtype in _ITEM_BYTES
            and isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            and isinstance(begin, int)
            and isinstance(end, int)
        )
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{bad}: malformed header entry for {name!r}")
    nbytes = math.prod(shape) * _ITEM_BYTES[dtype]
    if not (0 <= begin <= end <= data_bytes) or end - begin != nbytes:
        raise ValueError(
            f"{bad}: tensor {name!r} needs bytes [{begin}, {end}) of a data section of "
            f"{data_bytes} bytes (truncated or corrupted)"
        )
    return dtype, tuple(shape)


def check_against_config(
    headers: dict[Path, dict[str, tuple[str, tuple[int, ...]]]], config: Any, folder: Path
) -> None:
    """Every tensor the headers declare against the config: the size fields first (so that a
    wrong config.json names the field), then every name, shape and dtype."""
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path, entries in headers.items():
        for name, (dtype, shape) in entries.items():
            if name in found:
                raise ValueError(f"weight {name!r} appears in more than one shard")
            found[name] = (path, dtype, shape)
    _check_size_fields(found, config)
    expected = expected_shapes(config)
    for name, (path, dtype, shape) in found.items():
        if name not in expected:
            raise ValueError(
                f"unexpected weight {name!r} in {path.name}; this does not look like a LLaDA "
                "checkpoint"
            )
        if shape != expected[name]:
            raise ValueError(
                f"weight {name!r} in {path.name} has shape {shape}, config.json implies "
                f"{expected[name]}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight {name!r} in {path.name} has dtype {dtype}, not a float")
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {str(folder)!r} lacks weights {missing[:5]}{more}")


def _check_size_fields(found: dict, config: Any) -> None:
    """config.json's sizes against what the weights say, naming the field and both values."""
    blocks = {
        int(parts[3])
        for parts in (n.split(".") for n in found)
        if len(parts) > 3 and parts[2] == "blocks" and parts[3].isdigit()
    }
    if blocks and config.n_layers != len(blocks):
        raise ValueError(
            f"config.json n_layers={config.n_layers}, but the weights hold {len(blocks)} blocks"
        )
    wte = found.get("model.transformer.wte.weight")
    if wte is not None and len(wte[2]) == 2:
        rows, cols = wte[2]
        if config.vocab_size != rows:
            raise ValueError(f"config.json vocab_size={config.vocab_size}, but wte has {rows} rows")
        if config.d_model != cols:
            raise ValueError(f"config.json d_model={config.d_model}, but wte has {cols} columns")
    ff = found.get("model.transformer.blocks.0.ff_proj.weight")
    if ff is not None and len(ff[2]) == 2 and config.mlp_hidden_size != ff[2][0]:
        raise ValueError(
            f"config.json mlp_hidden_size={config.mlp_hidden_size}, but ff_proj has {ff[2][0]} rows"
        )
    k = found.get("model.transformer.blocks.0.k_proj.weight")
    if k is not None and len(k[2]) == 2 and config.n_kv_heads * config.head_dim != k[2][0]:
        raise ValueError(
            f"config.json n_kv_heads={config.n_kv_heads} (head_dim {config.head_dim}), but "
            f"k_proj has {k[2][0]} rows"
        )
