"""A model folder from elsewhere is untrusted input (llada_ext/model_files.py).

Shard names must stay inside the folder; config sizes are bounded and checked against the
tensors the safetensors headers declare before anything is built; unreadable weight files are
a ValueError naming the file; a small model's config.json in the form the Hugging Face LLaDA
code writes (``bos_token_id: null``, no EoT id) loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import llada_config
from safetensors.torch import save_file

from llada_ext import LLaDAConfig, LLaDAModel
from llada_ext.model_files import expected_shapes


def small(**kw) -> LLaDAConfig:
    sizes = dict(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_size=48,
        vocab_size=40,
        max_sequence_length=64,
        eot_token_id=None,
    )
    return llada_config(**{**sizes, **kw})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A sharded model folder as it comes from elsewhere (no checksum manifest)."""
    torch.manual_seed(0)
    LLaDAModel(small(), backend="torch").save_pretrained(tmp_path / "m", max_shard_size=8_000)
    (tmp_path / "m" / "checksums.sha256").unlink()
    return tmp_path / "m"


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("preset", ["tiny", "1b"])
def test_expected_shapes_are_the_model_state_dict(preset):
    config = LLaDAConfig.preset(preset)
    with torch.device("meta"):
        model = LLaDAModel(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(config) == got


# ---- path traversal ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parent", "absolute", "etc_passwd", "nested", "symlink"])
def test_shard_names_must_stay_inside_the_folder(folder, tmp_path, kind):
    """An index naming a file outside the folder is refused, naming the entry; the outside
    file (a valid safetensors file of the right tensors) is never loaded."""
    outside = tmp_path / "outside"
    outside.mkdir()
    index = index_of(folder)
    victim = next(iter(index["weight_map"]))
    (outside / "x.safetensors").write_bytes((folder / index["weight_map"][victim]).read_bytes())
    target = {
        "parent": "../outside/x.safetensors",
        "absolute": str(outside / "x.safetensors"),
        "etc_passwd": "../../etc/passwd",
        "nested": "sub/x.safetensors",
        "symlink": "link.safetensors",
    }[kind]
    if kind == "symlink":
        os.symlink(outside / "x.safetensors", folder / "link.safetensors")
    index["weight_map"][victim] = target
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"entry '{victim}'.*(inside|outside) the model folder"):
        LLaDAModel.from_pretrained(folder)


# ---- config sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value", [("n_layers", 10**7), ("d_model", 2**40), ("vocab_size", 10**12)]
)
def test_hostile_config_sizes_are_refused_at_once(folder, field, value):
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"{field}={value} is beyond the supported maximum"):
        LLaDAModel.from_pretrained(folder)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_layers", 3, "n_layers=3, but the weights hold 2 blocks"),
        ("vocab_size", 41, "vocab_size=41, but wte has 40 rows"),
        ("mlp_hidden_size", 64, "mlp_hidden_size=64, but ff_proj has 48 rows"),
        ("n_kv_heads", 4, "n_kv_heads=4 .head_dim 8., but k_proj has 16 rows"),
    ],
)
def test_config_disagreeing_with_the_headers_names_the_field(folder, field, value, message):
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        LLaDAModel.from_pretrained(folder)


# ---- unreadable weights --------------------------------------------------------------------


def _first_shard(folder: Path) -> Path:
    return folder / sorted(set(index_of(folder)["weight_map"].values()))[0]


@pytest.mark.parametrize("damage", ["truncate", "not_safetensors", "header_json", "header_len"])
def test_unreadable_weight_files_name_the_file(folder, damage):
    shard = _first_shard(folder)
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) - 100])
    elif damage == "not_safetensors":
        shard.write_bytes(b"PK\x03\x04 this is a zip file, not tensors" * 10)
    elif damage == "header_json":
        n = int.from_bytes(data[:8], "little")
        shard.write_bytes(data[:8] + b"{" + data[9 : 8 + n].replace(b'"', b"'") + data[8 + n :])
    else:
        shard.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match=f"{shard.name}.*not a readable safetensors file"):
        LLaDAModel.from_pretrained(folder)


def test_a_saved_folder_detects_a_flipped_bit(tmp_path):
    """save_pretrained records the SHA-256 of every weight file; one flipped bit in a shard
    is a ValueError naming that shard, even where the header still parses."""
    torch.manual_seed(0)
    LLaDAModel(small(), backend="torch").save_pretrained(tmp_path / "m", max_shard_size=8_000)
    shard = _first_shard(tmp_path / "m")
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}.*does not match its SHA-256"):
        LLaDAModel.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("existing", [False, True])
def test_saved_files_reach_the_disk_before_a_rename_publishes_them(tmp_path, monkeypatch, existing):
    """Every file of a save is fsynced before the rename (new folder) or the os.replace
    (existing folder) that makes it visible, and the folder holding the new entries after."""
    import llada_ext.model_files as mf

    events: list[tuple[str, str]] = []

    def recorded(kind, real, label):
        def call(*args):
            events.append((kind, label(args[0])))
            return real(*args)

        return call

    name = lambda p: Path(p).name  # noqa: E731
    monkeypatch.setattr(mf, "fsync_file", recorded("file", mf.fsync_file, name))
    monkeypatch.setattr(mf, "fsync_dir", recorded("dir", mf.fsync_dir, str))
    monkeypatch.setattr(mf.os, "rename", recorded("rename", os.rename, name))
    monkeypatch.setattr(mf.os, "replace", recorded("replace", os.replace, name))
    torch.manual_seed(0)
    model = LLaDAModel(small(), backend="torch")
    out = tmp_path / "m"
    if existing:
        out.mkdir()
    model.save_pretrained(out, max_shard_size=8_000)
    synced = {name for kind, name in events if kind == "file"}
    on_disk = {p.name for p in out.iterdir()}
    assert synced == on_disk and "config.json" in synced and len(synced) > 3
    first_publish = next(i for i, (kind, _) in enumerate(events) if kind in ("rename", "replace"))
    assert all(kind != "file" for kind, _ in events[first_publish:])
    assert events[-1] == ("dir", str(out if existing else out.parent))
    reloaded = LLaDAModel.from_pretrained(out, backend="torch")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reloaded.state_dict().values())
    )


def test_non_float_weights_are_refused(tmp_path):
    config = small(n_layers=1)
    state = {k: torch.zeros(s) for k, s in expected_shapes(config).items()}
    state["model.transformer.ln_f.weight"] = torch.zeros(32, dtype=torch.int64)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="ln_f.weight.*dtype I64, not a float"):
        LLaDAModel.from_pretrained(tmp_path)


def test_cli_gives_one_error_line(folder):
    _first_shard(folder).write_bytes(b"\x00" * 5)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada_ext.cli",
            "sample",
            "--model",
            str(folder),
            "--prompt",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "not a readable safetensors file" in lines[0]


# ---- a small model's config.json as the Hugging Face LLaDA code writes it ------------------


def hf_style_config(config: LLaDAConfig) -> dict:
    """config.json in the form configuration_llada.LLaDAConfig (a PretrainedConfig) writes:
    the ModelConfig fields, bos_token_id null, no eot_token_id, n_kv_heads null for MHA,
    and an embedding_size padded past the vocabulary."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "block_type": "llama",
        "bos_token_id": None,
        "d_model": config.d_model,
        "embedding_size": config.vocab_size,
        "eos_token_id": config.eos_token_id,
        "include_bias": False,
        "init_std": 0.02,
        "mask_token_id": config.mask_token_id,
        "max_sequence_length": config.max_sequence_length,
        "mlp_hidden_size": config.mlp_hidden_size,
        "model_type": "llada",
        "n_heads": config.n_heads,
        "n_kv_heads": None,
        "n_layers": config.n_layers,
        "pad_token_id": config.pad_token_id,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_theta": config.rope_theta,
        "use_cache": False,
        "vocab_size": config.vocab_size - 3,
        "weight_tying": False,
    }


def test_hugging_face_style_small_config_loads(tmp_path):
    config = small(n_kv_heads=4, bos_token_id=None)
    torch.manual_seed(1)
    model = LLaDAModel(config, backend="torch")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf_style_config(config)))
    loaded = LLaDAModel.from_pretrained(tmp_path / "m", backend="torch")
    cfg = loaded.config
    assert cfg.bos_token_id is None and cfg.eot_token_id is None
    assert (cfg.vocab_size, cfg.n_kv_heads, cfg.mask_token_id) == (40, 4, 39)
    ids = torch.randint(0, 40, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


def test_missing_special_ids_never_take_an_8b_id_outside_the_vocabulary():
    cfg = LLaDAConfig.from_dict(
        {"d_model": 32, "n_layers": 1, "n_heads": 4, "mlp_hidden_size": 48, "vocab_size": 40}
    )
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.eot_token_id) == (
        None,
        None,
        None,
        None,
    )
    assert cfg.pad_token_id is None and cfg.n_kv_heads == 4
    big = LLaDAConfig.from_dict({})  # the LLaDA-8B defaults fit its own vocabulary
    assert (big.mask_token_id, big.bos_token_id, big.eot_token_id) == (126336, 126080, 126348)
