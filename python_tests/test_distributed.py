"""Data-parallel training with 2 CPU processes (Gloo): every rank ends with the same
parameters, and the all-reduced loss equals the single-process loss on the same global batch.

The ranks run as real subprocesses with the environment ``torchrun`` would give them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same_tensors

import llada_ext  # noqa: F401  (loads the kernels)
from llada_ext.model import LLaDAModel
from llada_ext.training import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with Gloo is not available",
)

ROOT = Path(__file__).resolve().parents[1]

COMMON = textwrap.dedent(
    """
    import torch
    from llada_ext.model import LLaDAConfig, LLaDAModel
    from llada_ext.training import SequenceDataset, TrainConfig

    def micro_config():
        cfg = LLaDAConfig.preset("tiny")
        cfg.d_model, cfg.n_layers, cfg.n_heads = 32, 2, 2
        cfg.n_kv_heads, cfg.mlp_hidden_size = 1, 48
        return cfg

    def dataset():
        g = torch.Generator().manual_seed(5)
        return SequenceDataset(torch.randint(0, 256, (19, 11), generator=g))

    def train_config(out, micro, fsdp, backend):
        return TrainConfig(out_dir=out, steps=3, micro_batch_size=micro, grad_accum=1,
                           lr=3e-3, warmup_steps=1, decay_frac=0.5, save_every=0,
                           progress=False, random_length_prob=0.5, seed=11, fsdp=fsdp)
    """
)

WORKER = COMMON + textwrap.dedent(
    """
    import sys
    torch.set_num_threads(1)
    from llada_ext.training import Trainer
    from llada_ext.training.distributed import (cleanup_distributed, full_state_dicts,
                                                init_distributed)

    out, fsdp, backend = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = LLaDAModel(micro_config(), backend=backend)
    trainer = Trainer(model, dataset(), train_config(out, 2, fsdp, backend), dist_info=info)
    result = trainer.train()
    if fsdp:
        # Unsharded copies on every rank (the trainer's own gather fills rank 0 only).
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        params = {k: v.detach().cpu() for k, v in params.items()}
    else:
        params, _ = full_state_dicts(model, trainer.optimizer, fsdp=False)
    torch.save({"losses": result.losses, "params": params, "world": info.world_size},
               f"{out}/rank{info.rank}.pt")
    cleanup_distributed()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, extra: dict | None = None) -> dict:
    """The environment torchrun gives rank `rank` of `world` processes on this machine."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        **(extra or {}),
    )
    return env


def wait_ranks(procs: list) -> None:
    """Wait for every rank (240 s at most, then kill them all); each must exit 0."""
    logs = []
    for p in procs:
        try:
            log, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed ranks did not finish within 240 s")
        logs.append(log.decode(errors="replace"))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def _run_ranks(out: Path, *, fsdp: bool, backend: str, world: int = 2) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = rank_env(rank, world, port)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(out), "1" if fsdp else "0", backend],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
            )
        )
    wait_ranks(procs)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _single_process(out: Path, backend: str, fsdp: bool) -> tuple[list[float], dict]:
    ns: dict = {}
    exec(COMMON, ns)  # the very same model / data / settings as the workers
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LLaDAModel(ns["micro_config"](), backend=backend)
        cfg: TrainConfig = ns["train_config"](str(out), 4, False, backend)
        result = Trainer(model, ns["dataset"](), cfg, device="cpu").train()
    finally:
        torch.set_num_threads(n)
    return result.losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("fsdp", "backend"), [(False, "kernels"), (True, "torch")], ids=["ddp-kernels", "fsdp-torch"]
)
def test_two_ranks_match_single_process(tmp_path, fsdp, backend) -> None:
    ranks = _run_ranks(tmp_path / "dist", fsdp=fsdp, backend=backend)
    assert all(r["world"] == 2 for r in ranks)
    r0, r1 = ranks
    # Every rank holds the same parameters (bitwise: DDP/FSDP apply the same update).
    assert_same_tensors(r1["params"], r0["params"])
    assert r0["losses"] == r1["losses"]

    losses, params = _single_process(tmp_path / "single", backend, fsdp)
    assert len(losses) == len(r0["losses"]) == 3
    # Same global batch, same masks: the all-reduced loss is the single-process loss (up to
    # float32 summation order), and so are the parameters after 3 steps.
    torch.testing.assert_close(
        torch.tensor(r0["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6
    )
    assert_same_tensors(r0["params"], params, rtol=1e-4, atol=1e-5)
    ckpts = sorted(p.name for p in (tmp_path / "dist" / "checkpoints").iterdir())
    if fsdp:  # one distributed checkpoint folder, a shard per rank (test_distributed_checkpoint)
        assert ckpts == ["step-00000003.dcp"]
    else:  # only rank 0 wrote the checkpoint file
        assert ckpts == ["step-00000003.pt", "step-00000003.pt.sha256"]
