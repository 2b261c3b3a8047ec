"""Distributed checkpoints of FSDP2 runs (torch.distributed.checkpoint) on CPU processes (Gloo).

Two ranks train 4 steps with FSDP2 at a global batch of 6 sequences, writing a ``.dcp``
checkpoint after steps 2 and 4 (the uninterrupted reference). Resumed from step 2 with 2, 3
and 1 process(es) the runs end with the reference's parameters: bitwise at the same world size,
within float32 rounding at the others (the gradient sums run in another order). A kill -9 in
the middle of a distributed save leaves the previous checkpoint loadable. ``export`` turns
either checkpoint format into a ``from_pretrained`` folder bit for bit. The ``--dry-run``
memory estimate is checked against parameter counts and the tensors autograd really keeps.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TorchThreads, assert_same_tensors
from test_distributed import ROOT, _free_port, rank_env, wait_ranks

from llada_ext.cli import main
from llada_ext.model import LLaDAConfig, LLaDAModel
from llada_ext.training.checkpoint import CheckpointManager
from llada_ext.training.distributed import split_global_batch
from llada_ext.training.memory import activation_bytes_per_token, estimate_training_memory
from llada_ext.training.resume import adopt_global_batch

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with Gloo is not available",
)

GLOBAL_BATCH = 6  # splits over 1, 2 and 3 ranks with micro-batches of 1

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from llada_ext.model import LLaDAConfig, LLaDAModel
    from llada_ext.training import SequenceDataset, TrainConfig, Trainer
    from llada_ext.training.distributed import (cleanup_distributed, full_model_state_dict,
                                                init_distributed)

    def run(out, grad_accum, resume, keep_last, steps=4, save_every=2):
        info = init_distributed("cpu")
        cfg = LLaDAConfig.preset("tiny")
        cfg.d_model, cfg.n_layers, cfg.n_heads = 32, 2, 2
        cfg.n_kv_heads, cfg.mlp_hidden_size = 1, 48
        torch.manual_seed(0)
        model = LLaDAModel(cfg, backend="torch")
        g = torch.Generator().manual_seed(5)
        data = SequenceDataset(torch.randint(0, 256, (23, 11), generator=g))  # 4 x 6 > 23
        tc = TrainConfig(out_dir=out, steps=steps, micro_batch_size=1, grad_accum=grad_accum,
                         lr=3e-3, warmup_steps=1, decay_frac=0.5, save_every=save_every,
                         keep_last=keep_last, progress=False, random_length_prob=0.5,
                         seed=11, fsdp=info.world_size > 1)
        trainer = Trainer(model, data, tc, dist_info=info)
        if resume != "-":
            trainer.resume(resume)
        result = trainer.train()
        params = full_model_state_dict(model, fsdp=tc.fsdp)
        if info.rank == 0:
            torch.save({"params": params, "losses": result.losses, "step": result.step,
                        "interrupted": result.interrupted,
                        "grad_accum": trainer.config.grad_accum,
                        "global_batch": trainer.config.global_batch}, f"{out}/result.pt")
        cleanup_distributed()

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:]))
    """
)


def _launch(out: Path, world: int, *args: str, env: dict | None = None) -> list:
    port = _free_port()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        e = rank_env(rank, world, port, env)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(out), *args],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
            )
        )
    return procs


def _run(out: Path, world: int, grad_accum: int, resume: str = "-", keep_last: int = 0) -> dict:
    """Train (or resume) to step 4 with `world` processes; rank 0's result."""
    procs = _launch(out, world, str(grad_accum), resume, str(keep_last))
    wait_ranks(procs)
    return torch.load(out / "result.pt", weights_only=True)


def _run_here(out: Path, grad_accum: int, resume: str, keep_last: int = 0) -> dict:
    """The same worker, as a single process inside this one (no process group)."""
    ns: dict = {"__name__": "worker"}
    with TorchThreads(1):  # the worker sets one thread; this process gets its count back
        exec(WORKER, ns)
        ns["run"](str(out), grad_accum, resume, keep_last)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """2 ranks, FSDP2, 4 uninterrupted steps; grad_accum 3 gives the recorded global batch."""
    out = tmp_path_factory.mktemp("dcp") / "reference"
    result = _run(out, 2, 3)
    assert result["global_batch"] == GLOBAL_BATCH and len(result["losses"]) == 4
    return out, result


def _compare(result: dict, ref: dict, *, bitwise: bool) -> None:
    tolerance = {} if bitwise else {"rtol": 1e-5, "atol": 1e-6}
    assert_same_tensors(result["params"], ref["params"], **tolerance)
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(ref["losses"][2:]), rtol=1e-5, atol=1e-6
    )


def test_dcp_layout_and_manifests(reference):
    out, _ = reference
    ckpts = [p.name for _, p in CheckpointManager(out / "checkpoints").list()]
    assert ckpts == ["step-00000002.dcp", "step-00000004.dcp"]
    files = sorted(p.name for p in (out / "checkpoints" / "step-00000002.dcp").iterdir())
    assert files == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "checksums-rank00000.sha256",
        "checksums-rank00001.sha256",
        "rng-rank00000.pt",
        "rng-rank00001.pt",
        "trainer_state.pt",
    ]
    config = json.loads((out / "train_config.json").read_text())
    assert config["global_batch"] == GLOBAL_BATCH and config["grad_accum"] == 3


@pytest.mark.parametrize(
    ("world", "accum", "bitwise"), [(2, 3, True), (3, 2, False), (1, 6, False)]
)
def test_resume_at_another_world_size(reference, tmp_path, world, accum, bitwise):
    """The checkpoint of step 2 resumed with `world` processes (grad_accum 1 asked, the
    recorded global batch kept) ends at the reference's step-4 parameters."""
    out, ref = reference
    ckpt = str(out / "checkpoints" / "step-00000002.dcp")
    if world == 1:
        result = _run_here(tmp_path / "run", 1, ckpt)
    else:
        result = _run(tmp_path / "run", world, 1, ckpt)
    assert result["global_batch"] == GLOBAL_BATCH and result["grad_accum"] == accum
    _compare(result, ref, bitwise=bitwise)
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (config["global_batch"], config["grad_accum"]) == (GLOBAL_BATCH, accum)


def test_kill_during_a_distributed_save_keeps_the_previous_checkpoint(reference, tmp_path):
    """Rank 1 stops before writing its shard of step 4 while rank 0 has written its own;
    both are killed with SIGKILL. The step-2 checkpoint still loads and the run continues to
    the reference's parameters; the half-written folder is removed, keep_last prunes folders."""
    _, ref = reference
    out, marker = tmp_path / "run", tmp_path / "paused"
    hook = {"LLADA_EXT_TEST_PAUSE_SAVE": f"4:1:{marker}"}
    procs = _launch(out, 2, "3", "-", "1", env=hook)
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 180
    try:
        while not (marker.exists() and list(ckpts.glob(".step-00000004.dcp.tmp-*/__0_0.distcp"))):
            assert time.monotonic() < deadline, "the save did not reach the test hook"
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.2)
    finally:
        for p in procs:
            p.kill()  # SIGKILL
            p.communicate()
    names = sorted(p.name for p in ckpts.iterdir())
    assert names[1:] == ["step-00000002.dcp"] and names[0].startswith(".step-00000004.dcp.tmp-")
    # the periodic save of step 2 stayed sharded: no rank gathered the full weights
    assert not (out / "model.safetensors").exists()
    result = _run_here(out, 1, "auto", keep_last=1)
    _compare(result, ref, bitwise=False)
    # the temp folder is gone; keep_last=1 pruned the step-2 folder after the step-4 file
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step-00000004.pt",
        "step-00000004.pt.sha256",
    ]


def test_ctrl_c_writes_a_distributed_checkpoint(tmp_path):
    """SIGTERM (as Ctrl-C) to both ranks of a long run: they finish the step, write one
    .dcp checkpoint of it together and return; it loads where the run stopped."""
    from llada_ext.training.dcp import read_dcp_checkpoint

    out = tmp_path / "run"
    procs = _launch(out, 2, "3", "-", "0", "100000", "0")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, "the run did not start"
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.1)
        for p in procs:
            p.terminate()
        logs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:]
    result = torch.load(out / "result.pt", weights_only=True)
    assert result["interrupted"] and 2 <= result["step"] < 100000
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-{result['step']:08d}.dcp"]
    meta = read_dcp_checkpoint(out / "checkpoints" / names[0])
    assert meta["step"] == result["step"] and meta["data"]["position"] == 6 * result["step"]


def test_a_corrupted_shard_is_named(reference, tmp_path):
    out, _ = reference
    ckpt = tmp_path / "step-00000002.dcp"
    shutil.copytree(out / "checkpoints" / "step-00000002.dcp", ckpt)
    shard = ckpt / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="__1_0.distcp.*does not match its SHA-256"):
        _run_here(tmp_path / "run", 1, str(ckpt))
    (ckpt / "checksums-rank00001.sha256").unlink()
    with pytest.raises(ValueError, match="incomplete: it was written by 2 ranks"):
        _run_here(tmp_path / "run", 1, str(ckpt))


def test_export_round_trips_bit_exactly(reference, tmp_path, capsys):
    """DCP (2 shards) and single-file checkpoints -> export -> from_pretrained: the weights of
    the checkpoint, bit for bit, sharded with an index when over --max-shard-size."""
    out, ref = reference
    dest = tmp_path / "model"
    assert main(["export", str(out), "--to", str(dest), "--max-shard-size", "0.0001"]) == 0
    assert "step-00000004.dcp" in capsys.readouterr().out
    names = sorted(p.name for p in dest.iterdir())
    assert "model.safetensors.index.json" in names and "generation_config.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    model = LLaDAModel.from_pretrained(dest, backend="torch")
    assert_same_tensors(model.state_dict(), ref["params"])

    single = tmp_path / "single"
    _run_here(single, 6, str(out / "checkpoints" / "step-00000002.dcp"))
    pt = single / "checkpoints" / "step-00000004.pt"
    assert main(["export", str(pt), "--to", str(tmp_path / "m2"), "--dtype", "bfloat16"]) == 0
    state = torch.load(pt, weights_only=True)["model"]
    model = LLaDAModel.from_pretrained(tmp_path / "m2", backend="torch")
    assert model.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].to(torch.bfloat16)), k
    capsys.readouterr()
    assert main(["export", str(tmp_path / "none"), "--to", str(tmp_path / "m3")]) == 1
    assert capsys.readouterr().err.startswith("error: no checkpoint found")


# ---- the global batch -------------------------------------------------------------------------


def test_split_global_batch_names_the_sizes_that_work():
    assert split_global_batch(12, 2, 3) == 2
    assert split_global_batch(12, 1, 1) == 12
    with pytest.raises(ValueError) as e:
        split_global_batch(12, 2, 4)
    msg = str(e.value)
    assert "global_batch 12" in msg and "multiple of world_size * micro_batch_size = 8" in msg
    assert "Sizes that work: micro_batch_size (--batch-size) 1 or 3 with 4 processes" in msg
    assert "1, 2, 3 or 6 processes with micro_batch_size 2" in msg
    with pytest.raises(ValueError, match="12 is not a multiple of 5"):
        split_global_batch(12, 1, 5)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        split_global_batch(12, 0, 1)


def test_adopt_global_batch_on_resume(caplog):
    from llada_ext.training import TrainConfig

    meta = {
        "step": 10,
        "world_size": 2,
        "train_config": {"micro_batch_size": 2, "grad_accum": 3, "global_batch": 12},
    }
    c = TrainConfig(micro_batch_size=1, grad_accum=1, global_batch=4)
    adopt_global_batch(c, 4, meta, given=False)
    assert (c.global_batch, c.grad_accum) == (12, 3)
    c = TrainConfig(micro_batch_size=2, global_batch=8)
    adopt_global_batch(c, 4, meta, given=True)  # an explicit new batch wins, with a warning
    assert c.global_batch == 8 and "changes from 12 to 8" in caplog.text
    old = {**meta, "train_config": {"micro_batch_size": 2, "grad_accum": 3}}  # no record
    c = TrainConfig(micro_batch_size=4)
    with pytest.raises(ValueError, match="with 5 processes"):
        adopt_global_batch(c, 5, old, given=False)


def test_optimizer_state_loads_whatever_its_keys():
    """Single-file checkpoints key the optimizer state by index (single process, DDP) or by
    name (FSDP2's full state dict); either loads into either kind of run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from llada_ext.training.distributed import _rekey_optimizer_state
    from llada_ext.training.trainer import param_groups

    config = LLaDAConfig.preset("tiny")
    config.d_model, config.n_layers, config.n_heads, config.n_kv_heads = 32, 2, 2, 1
    model = LLaDAModel(config, backend="torch")
    opt = torch.optim.AdamW(param_groups(model, 0.1))
    model(torch.randint(0, 250, (1, 8))).logits.sum().backward()
    opt.step()
    by_index = opt.state_dict()
    _, by_name = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    for saved in (by_index, by_name):
        named = _rekey_optimizer_state(model, opt, saved, by_name=True)
        assert named["state"].keys() == by_name["state"].keys()
        indexed = _rekey_optimizer_state(model, opt, saved, by_name=False)
        assert indexed["param_groups"] == by_index["param_groups"]
        for k, v in by_index["state"].items():
            for name, t in v.items():
                assert torch.equal(indexed["state"][k][name], t)
    bad = {**by_index, "param_groups": by_index["param_groups"][:1]}
    with pytest.raises(ValueError, match="does not match the model's parameter groups"):
        _rekey_optimizer_state(model, opt, bad, by_name=True)


def test_cli_batch_options(tmp_path, capsys):
    argv = ["train", "--data", str(ROOT / "README.md"), "--out", str(tmp_path / "r")]
    assert main([*argv, "--global-batch", "4", "--grad-accum", "2"]) == 1
    assert "pass only one" in capsys.readouterr().err
    assert main([*argv, "--global-batch", "0"]) == 1
    assert "--global-batch must be >= 1" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--world-size", "5", "--global-batch", "12"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: global_batch 12") and err.count("\n") == 1


# ---- the --dry-run memory estimate --------------------------------------------------------------


def test_dry_run_8b_arithmetic(capsys):
    config = LLaDAConfig.preset("8b")
    with torch.device("meta"):
        model = LLaDAModel(config, backend="torch")
    n = model.num_parameters()
    d, v, m, layers = config.d_model, config.vocab_size, config.mlp_hidden_size, config.n_layers
    assert n == 2 * v * d + d + layers * (4 * d * d + 3 * d * m + 2 * d) == 8_015_581_184
    for world in (1, 8, 64):
        est = estimate_training_memory(config, world_size=world, micro_batch_size=2, seq_len=512)
        assert est.num_parameters == n and est.local_parameters * world == n  # all rows divide
        assert est.parameters == est.gradients == 4 * n // world
        assert est.optimizer == 8 * n // world
        assert (est.buffers > 0) == (world > 1)
    # an odd world size: rank 0 holds ceil(rows / world) rows of every parameter
    est = estimate_training_memory(config, world_size=3, micro_batch_size=1, seq_len=8)
    rows = sum(math.ceil(p.shape[0] / 3) * p[0].numel() for p in model.parameters())
    assert est.local_parameters == rows and est.parameters == 4 * rows
    block, kept, outside = activation_bytes_per_token(config, bf16=True)
    tokens = 2 * 4096
    est = estimate_training_memory(config, world_size=8, micro_batch_size=2, seq_len=4096)
    assert est.activations == tokens * (layers * block + outside)
    assert est.activations_checkpointed == tokens * (layers * kept + block + outside)
    assert kept == 2 * d and est.activations_checkpointed < est.activations / 10

    assert main(["train", "--preset", "8b", "--dry-run", "--world-size", "8", "--fsdp"]) == 0
    text = capsys.readouterr().out
    assert "8.016B parameters, FSDP2 over 8 GPUs, bf16 mixed precision" in text
    assert f"{4 * n / 8 / 2**30:.2f} GiB" in text  # parameters and gradients
    assert f"{8 * n / 8 / 2**30:.2f} GiB" in text  # AdamW state
    assert "activations with --gradient-checkpointing" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_what_autograd_keeps(dtype):
    """The tensors saved for backward (counted by storage, parameters excluded) in a forward
    pass of the kernels' fused attention and loss, against the estimate (within 2%)."""
    from llada_ext.training.losses import MaskedLMObjective

    config = LLaDAConfig.preset("tiny")
    config.d_model, config.n_layers, config.n_heads = 128, 4, 4
    config.n_kv_heads, config.mlp_hidden_size = 2, 320
    bf16 = dtype == torch.bfloat16
    block, kept, outside = activation_bytes_per_token(config, bf16=bf16)
    for checkpointing in (False, True):
        model = LLaDAModel(config, backend="kernels").to(dtype).train()
        model.gradient_checkpointing = checkpointing
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t, seen=seen, params=params):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 250, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            MaskedLMObjective(model)(ids, ids, torch.rand(2, 64))
        per_layer = kept if checkpointing else block
        expected = 128 * (config.n_layers * per_layer + outside)
        assert abs(sum(seen.values()) - expected) < 0.02 * expected, (checkpointing, seen)
