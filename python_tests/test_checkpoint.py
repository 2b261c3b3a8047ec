"""Checkpoint I/O of LLaDAModel: the published safetensors layout, sharding, meta loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import llada_config, vary_norm_weights
from safetensors.torch import save_file

import llada_ext.model as model_mod
from llada_ext.model import LLaDAConfig, LLaDAModel

CUDA = torch.cuda.is_available()


def small_config(**kw) -> LLaDAConfig:
    sizes = dict(
        d_model=40,
        n_layers=3,
        n_heads=5,
        n_kv_heads=5,
        mlp_hidden_size=56,
        vocab_size=53,
        max_sequence_length=64,
        rope_theta=10000.0,
        initializer_range=0.3,
    )
    return llada_config(**{**sizes, **kw})


def make_model(dtype=torch.float32, **kw) -> LLaDAModel:
    torch.manual_seed(0)
    model = LLaDAModel(small_config(**kw), backend="torch").to(dtype)
    return vary_norm_weights(model).eval()


def assert_same_weights(a: LLaDAModel, b: LLaDAModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, dtype):
    model = make_model(dtype)
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["checksums.sha256", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "llada" and config["d_model"] == 40
    loaded = LLaDAModel.from_pretrained(tmp_path / "ckpt", backend="torch")
    assert loaded.config == model.config and loaded.dtype == dtype
    assert not loaded.training
    assert_same_weights(model, loaded)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # no temporary folder left


def test_sharded_round_trip(tmp_path):
    model = make_model()
    limit = 40 * 56 * 4 * 3  # about three MLP matrices per shard
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=limit)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert set(index["weight_map"]) == set(model.state_dict())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    for s in shards:
        assert os.path.getsize(tmp_path / "ckpt" / s) <= limit + 4096  # + header
    loaded = LLaDAModel.from_pretrained(tmp_path / "ckpt", backend="torch")
    assert_same_weights(model, loaded)

    # saving again unsharded into the same folder: stale shards go, other files stay
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == [
        "checksums.sha256",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert_same_weights(model, LLaDAModel.from_pretrained(tmp_path / "ckpt"))
    # and sharded again, with another shard count; an unrelated .safetensors file stays
    (tmp_path / "ckpt" / "model_ema.safetensors").write_bytes(b"x")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=limit * 2)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    n = len(files) - 5
    assert files == ["checksums.sha256", "config.json"] + [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ] + ["model.safetensors.index.json", "model_ema.safetensors", "tokenizer.json"]
    assert 1 < n < len(shards)
    assert_same_weights(model, LLaDAModel.from_pretrained(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_dtype_and_device_arguments(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    bf = LLaDAModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert bf.dtype == torch.bfloat16 and bf.device.type == "cpu"
    for k, v in bf.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, model.state_dict()[k].to(torch.bfloat16)), k
    assert LLaDAModel.from_pretrained(tmp_path, backend="kernels").backend == "kernels"
    with pytest.raises(TypeError, match="dtype"):
        LLaDAModel.from_pretrained(tmp_path, dtype=torch.int64)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
def test_load_onto_cuda(tmp_path):
    model = make_model(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = LLaDAModel.from_pretrained(tmp_path, device="cuda")
    assert loaded.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in loaded.parameters())
    assert_same_weights(model, loaded.cpu())


def published_config(d: int, layers: int, heads: int, mlp: int, vocab: int) -> dict:
    """config.json of the published LLaDA-8B layout (every key it has), at these sizes."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "architectures": ["LLaDAModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "block_type": "llama",
        "d_model": d,
        "embedding_size": vocab,
        "eos_token_id": 299,
        "flash_attention": False,
        "include_bias": False,
        "init_device": "meta",
        "init_std": 0.02,
        "layer_norm_type": "rms",
        "mask_token_id": 298,
        "max_sequence_length": 4096,
        "mlp_hidden_size": mlp,
        "mlp_ratio": 4,
        "model_type": "llada",
        "n_heads": heads,
        "n_kv_heads": heads,
        "n_layers": layers,
        "pad_token_id": 299,
        "bos_token_id": 297,
        "precision": "amp_bf16",
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "vocab_size": vocab,
        "weight_tying": False,
    }


def write_published_shards(folder, d: int, layers: int, mlp: int, vocab: int) -> dict:
    """Two bfloat16 safetensors shards + index with the LLaDA-8B weight names; returns the
    weights by name."""
    g = torch.Generator().manual_seed(3)

    def w(*shape):
        if len(shape) == 1:
            return (1 + 0.1 * torch.randn(*shape, generator=g)).to(torch.bfloat16)
        return (0.05 * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    shard1 = {"model.transformer.wte.weight": w(vocab, d)}
    shard2 = {"model.transformer.ln_f.weight": w(d), "model.transformer.ff_out.weight": w(vocab, d)}
    for i in range(layers):
        p = f"model.transformer.blocks.{i}."
        blk = {
            p + "attn_norm.weight": w(d),
            p + "ff_norm.weight": w(d),
            p + "q_proj.weight": w(d, d),
            p + "k_proj.weight": w(d, d),
            p + "v_proj.weight": w(d, d),
            p + "attn_out.weight": w(d, d),
            p + "ff_proj.weight": w(mlp, d),
            p + "up_proj.weight": w(mlp, d),
            p + "ff_out.weight": w(d, mlp),
        }
        (shard1 if i == 0 else shard2).update(blk)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(shard1, str(folder / names[0]), metadata={"format": "pt"})
    save_file(shard2, str(folder / names[1]), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(shard1, names[0]), **dict.fromkeys(shard2, names[1])}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )

    return {**shard1, **shard2}


def test_published_8b_layout_at_reduced_size(tmp_path):
    """config.json + two shards + index written by hand with the LLaDA-8B names/shapes."""
    d, layers, heads, mlp, vocab = 64, 2, 4, 96, 300
    (tmp_path / "config.json").write_text(
        json.dumps(published_config(d, layers, heads, mlp, vocab))
    )
    weights = write_published_shards(tmp_path, d, layers, mlp, vocab)

    model = LLaDAModel.from_pretrained(tmp_path, backend="torch")
    cfg = model.config
    assert (
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.mlp_hidden_size,
        cfg.vocab_size,
        cfg.mask_token_id,
        cfg.eos_token_id,
        cfg.bos_token_id,
    ) == (d, layers, heads, mlp, vocab, 298, 299, 297)
    assert cfg.rope_theta == 500000.0 and cfg.eot_token_id is None
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(sd[k], v), k
    logits = model(torch.randint(0, vocab, (1, 6))).logits
    assert logits.shape == (1, 6, vocab) and torch.isfinite(logits).all()


def test_meta_loading_allocates_no_second_copy(tmp_path, monkeypatch):
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    from safetensors import safe_open as real_safe_open

    loaded_ptrs: list[int] = []

    class Recording:
        def __init__(self, *a, **k):
            self._f = real_safe_open(*a, **k)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            t = self._inner.get_tensor(name)
            loaded_ptrs.append(t.data_ptr())
            return t

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", Recording)

    real_normal = torch.nn.init.normal_

    def no_real_init(*a, **k):
        # modules built on the meta device may "initialise" meta tensors: that costs nothing
        t = a[0] if a else k["tensor"]
        if not t.is_meta:
            raise AssertionError("from_pretrained must not initialise real weights")
        return real_normal(*a, **k)

    monkeypatch.setattr(torch.nn.init, "normal_", no_real_init)
    loaded = LLaDAModel.from_pretrained(tmp_path, backend="torch")
    params = list(loaded.parameters())
    assert not any(p.is_meta for p in params)
    assert not any(b.is_meta for b in loaded.buffers())
    # every parameter is one of the tensors read from the files: nothing was copied
    assert sorted(p.data_ptr() for p in params) == sorted(loaded_ptrs)
    assert len(loaded_ptrs) == len(params)
    assert_same_weights(model, loaded)


def _write_ckpt(tmp_path, sharded: bool):
    make_model().save_pretrained(tmp_path / "c", max_shard_size=20_000 if sharded else 1 << 30)
    return tmp_path / "c"


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLaDAModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLaDAModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        LLaDAModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(small_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LLaDAModel.from_pretrained(tmp_path)


def test_bad_weights(tmp_path):
    ckpt = _write_ckpt(tmp_path, sharded=True)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.rename(ckpt / first, ckpt / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="shard"):
        LLaDAModel.from_pretrained(ckpt)
    os.rename(ckpt / "moved.safetensors", ckpt / first)
    index_path.write_text(json.dumps({"weights": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        LLaDAModel.from_pretrained(ckpt)

    ckpt = _write_ckpt(tmp_path / "b", sharded=False)
    (ckpt / "checksums.sha256").unlink()  # weights from elsewhere: no manifest
    sd = {k: v.clone() for k, v in make_model().state_dict().items()}
    wrong = dict(sd)
    wrong["model.transformer.wte.weight"] = torch.zeros(7, 40)
    save_file(wrong, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"vocab_size=\d+, but wte has 7 rows"):
        LLaDAModel.from_pretrained(ckpt)
    missing = dict(sd)
    del missing["model.transformer.blocks.1.up_proj.weight"]
    save_file(missing, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks weights"):
        LLaDAModel.from_pretrained(ckpt)
    extra = dict(sd)
    extra["lm_head.bias"] = torch.zeros(3)
    save_file(extra, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected weight"):
        LLaDAModel.from_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["d_model"] = 41
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="d_model"):
        LLaDAModel.from_pretrained(ckpt)


def test_save_validation(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "x", max_shard_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file"]
    assert model_mod.DEFAULT_MAX_SHARD_BYTES == 5 * 1024**3


# ---- training checkpoints: checksums and interrupted writes ---------------------------------


def _training_checkpoint(tmp_path):
    from llada_ext.training.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=0)
    state = {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "note": "x"}
    return mgr, mgr.save(7, state)


@pytest.mark.parametrize("position", [0.1, 0.5, 0.9])
def test_a_flipped_bit_is_detected_on_load(tmp_path, position):
    """One bit flipped anywhere in a checkpoint: loading names the file, never returns
    silently changed contents."""
    from llada_ext.training.checkpoint import load_checkpoint

    _, path = _training_checkpoint(tmp_path)
    assert load_checkpoint(path)["note"] == "x"
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path.name}.*does not match its SHA-256"):
        load_checkpoint(path)


def test_a_checkpoint_without_manifest_loads_with_a_warning(tmp_path, caplog):
    from llada_ext.training.checkpoint import load_checkpoint

    _, path = _training_checkpoint(tmp_path)
    path.with_name(path.name + ".sha256").unlink()
    assert load_checkpoint(path)["note"] == "x"
    assert any("no checksum manifest" in r.getMessage() for r in caplog.records)


def test_temp_files_of_an_interrupted_write_are_removed(tmp_path):
    """What a kill mid-write leaves (.step-*.pt.*.tmp) is removed when the run starts again;
    complete checkpoints and unrelated files stay."""
    from llada_ext.training.checkpoint import CheckpointManager

    mgr, path = _training_checkpoint(tmp_path)
    stale = [
        mgr.directory / ".step-00000008.pt.abc123.tmp",
        mgr.directory / ".step-00000008.pt.sha256.x9.tmp",
    ]
    for p in stale:
        p.write_bytes(b"\0" * 100)
    keep = mgr.directory / "notes.txt"
    keep.write_text("mine")
    CheckpointManager(mgr.directory)
    assert not any(p.exists() for p in stale)
    assert path.exists() and keep.exists()


def test_interrupted_model_saves_are_removed_when_the_run_starts(tmp_path):
    from llada_ext.training.checkpoint import remove_interrupted_saves

    run = tmp_path / "run"
    run.mkdir()
    stale = tmp_path / ".run.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    other = tmp_path / ".other.tmp-1"
    other.mkdir()
    remove_interrupted_saves(run)
    assert not stale.exists() and other.exists() and run.exists()
