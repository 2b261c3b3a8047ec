"""Model folders on disk: reading one (untrusted input) and writing one (atomically).

A model folder is untrusted input: its index, safetensors headers and config are checked here
before anything is built or loaded.

- Shard names from ``model.safetensors.index.json`` must be plain file names inside the folder
  (no ``..``, no absolute path, no link that leads out).
- Every safetensors header is read and validated without loading any tensor data: a truncated,
  corrupted or non-safetensors file is a ``ValueError`` naming the file.
- The sizes in ``config.json`` must agree with the tensors the headers declare (names, shapes,
  floating dtypes); a mismatch is a ``ValueError`` naming the field and both values, found
  within a second, before a module is built.

Writing (:func:`write_model_folder`) goes through a temporary folder next to the destination,
so a reader never sees a half-written model, and ends with a checksum manifest of the weight
files that :func:`verify_checksums` checks on the next load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import LLaDAConfig

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# sha256sum-style manifest of the weight files save_pretrained wrote (the last file it writes).
CHECKSUMS_NAME = "checksums.sha256"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# The weight files a save writes; an earlier save's that the new one does not use are removed.
_WEIGHT_FILE = re.compile(r"model\.safetensors|model-\d{5}-of-\d{5}\.safetensors")

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


# ---- reading a folder ------------------------------------------------------------------------


def read_folder_config(folder: Path) -> LLaDAConfig:
    """The model config of a folder, from its ``config.json``.

    Parameters
    ----------
    folder : Path
        A model folder.

    Returns
    -------
    LLaDAConfig

    Raises
    ------
    FileNotFoundError
        The folder or its ``config.json`` does not exist.
    ValueError
        ``config.json`` is not valid JSON, or describes a model this library does not build.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: not a LLaDA checkpoint")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {e}") from e
    return LLaDAConfig.from_dict(data)


def checked_weight_files(folder: Path, config: LLaDAConfig) -> list[Path]:
    """The safetensors files of a folder, after every check that reads no tensor data.

    Shard names (:func:`shard_files`), the checksum manifest when there is one
    (:func:`verify_checksums`), every header (:func:`read_header`) and ``config`` against the
    headers (:func:`check_against_config`), so a bad folder is refused before a module is
    built or a byte of tensor data is read.

    Parameters
    ----------
    folder : Path
        A model folder.
    config : LLaDAConfig
        Its config (:func:`read_folder_config`).

    Returns
    -------
    list of Path
        The weight files, in index order.
    """
    files = shard_files(folder)
    verify_checksums(folder)
    check_against_config({f: read_header(f) for f in files}, config, folder)
    return files


def read_weights(
    files: list[Path], device: torch.device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files, read one at a time straight onto ``device``.

    Parameters
    ----------
    files : list of Path
        Checked weight files (:func:`checked_weight_files`).
    device : torch.device
        Where the tensors are created.
    dtype : torch.dtype, optional
        Floating dtype of the result; default the embedding's (a checkpoint that mixes
        dtypes is cast to it).

    Returns
    -------
    dict
        Weight name -> tensor, one copy of the weights in all.

    Raises
    ------
    ValueError
        Naming the file, when safetensors cannot read it.
    """
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    for shard in files:
        try:
            # safetensors wants "cuda:N" spelled out; torch.device gives that via str()
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)  # one at a time: no second model copy
                    state[name] = tensor
        except (OSError, RuntimeError, SafetensorError) as e:
            raise ValueError(f"{str(shard)!r} could not be read: {e}") from e
    target = state["model.transformer.wte.weight"].dtype
    for name, tensor in state.items():
        if tensor.dtype != target:
            state[name] = tensor.to(target)
    return state


# ---- writing a folder ------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the folder that holds the entry (POSIX only).

    Best effort: some filesystems cannot open or fsync a folder; the rename itself has
    already happened, so that is not an error.
    """
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - depends on the filesystem
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - depends on the filesystem
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a finished file's contents to disk before a rename publishes it."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_model_folder(
    folder: Path,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write ``config.json`` and the weights in the published layout, atomically.

    Everything is first written to a temporary folder next to ``folder``. A new ``folder`` is
    then created by one rename; into an existing folder each file is moved with an atomic
    ``os.replace`` and weight files of an earlier save that the new one does not use are
    removed (other files, e.g. ``tokenizer.json``, are kept).

    Parameters
    ----------
    folder : Path
        Destination; its parent must exist.
    state : dict
        Weight name -> contiguous tensor (not on the meta device).
    config : dict
        The ``config.json`` contents.
    max_shard_size : int
        Largest shard in bytes. Above it the weights are split into
        ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``;
        a single tensor larger than the limit gets a shard of its own.

    Raises
    ------
    FileExistsError
        ``folder`` exists and is not a folder.
    """
    shards = _plan_shards(state, max_shard_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        written = _write_files(tmp, state, shards, config)
        _move_into(tmp, folder, written)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plan_shards(state: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Weight names grouped into shards of at most ``max_shard_size`` bytes, in order."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + _nbytes(t) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(t)
    return shards


def _write_files(
    tmp: Path, state: dict[str, torch.Tensor], shards: list[list[str]], config: dict[str, Any]
) -> list[str]:
    """Write config, weight files, index (when sharded) and manifest into ``tmp``; return
    their names in that order."""
    from safetensors.torch import save_file

    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    n = len(shards)
    names = (
        [WEIGHTS_NAME]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    for fname, keys in zip(names, shards):
        save_file({k: state[k] for k in keys}, str(tmp / fname), metadata={"format": "pt"})
    written = [CONFIG_NAME, *names]
    if n > 1:
        weight_map = {k: fname for fname, keys in zip(names, shards) for k in keys}
        total = sum(_nbytes(t) for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(WEIGHTS_INDEX_NAME)
    # The weight files only: config.json and the index are text people edit.
    write_checksums(tmp, names)
    written.append(CHECKSUMS_NAME)
    for name in written:  # contents on disk before any rename publishes them
        fsync_file(tmp / name)
    return written


def _move_into(tmp: Path, folder: Path, written: list[str]) -> None:
    """Move the files of a finished save from ``tmp`` into ``folder``."""
    if not folder.exists():
        fsync_dir(tmp)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
        return
    if not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} exists and is not a folder")
    stale_index = folder / WEIGHTS_INDEX_NAME
    if WEIGHTS_INDEX_NAME not in written and stale_index.exists():
        # an old index would otherwise win over the new model.safetensors
        stale_index.unlink()
    # The old manifest goes first and the new one comes last: a kill in between leaves no
    # manifest (the folder loads unverified), never a wrong one.
    (folder / CHECKSUMS_NAME).unlink(missing_ok=True)
    # shards before the index that names them, so an index never points at nothing
    order = {WEIGHTS_INDEX_NAME: 1, CHECKSUMS_NAME: 2}
    for name in sorted(written, key=lambda n: order.get(n, 0)):
        os.replace(tmp / name, folder / name)
    for stale in folder.iterdir():
        if _WEIGHT_FILE.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    fsync_dir(folder)
