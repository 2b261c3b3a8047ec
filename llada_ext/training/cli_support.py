"""Command-line pieces for training past one machine: ``--global-batch``, ``--dry-run``,
``--world-size`` of ``train`` / ``sft``, and the ``export`` sub-command.

Kept apart from :mod:`llada_ext.cli` so that the parser there only wires them in. Bad input is
a ``ValueError`` naming the option; the CLI prints it as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "add_export_parser",
    "add_scale_args",
    "check_batch_args",
    "cmd_export",
    "dry_run",
]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_scale_args(p: argparse.ArgumentParser, optimisation: Any) -> None:
    """``--global-batch`` (in the optimisation group), ``--dry-run`` and ``--world-size``."""
    optimisation.add_argument(
        "--global-batch",
        type=int,
        default=None,
        metavar="N",
        help="sequences per optimizer step over all processes; --grad-accum is derived from it "
        "(N / (processes x --batch-size)), so the batch stays the same on any number of GPUs. "
        "Default: --batch-size x --grad-accum x processes. Recorded in the run; --resume keeps "
        "the checkpoint's global batch at a new world size unless this is given",
    )
    g = p.add_argument_group("planning")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the expected per-GPU memory (parameters, gradients, AdamW state, "
        "activations with and without --gradient-checkpointing) for --world-size GPUs and "
        "exit; nothing is allocated and no data is read",
    )
    g.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="with --dry-run: number of GPUs (default: $WORLD_SIZE, else 1)",
    )


def check_batch_args(args: argparse.Namespace) -> None:
    """``--global-batch`` replaces ``--grad-accum``; both at once is refused."""
    if args.global_batch is not None:
        if args.global_batch < 1:
            raise ValueError(f"--global-batch must be >= 1, got {args.global_batch}")
        if args.grad_accum != 1:
            raise ValueError(
                "--global-batch and --grad-accum both set the accumulation: pass only one"
            )


def _model_config(args: argparse.Namespace) -> tuple[Any, str]:
    from ..model import LLaDAConfig

    source = None
    if args.init_from is not None:
        source = Path(args.init_from) / "config.json"
    elif args.model_config is not None:
        source = Path(args.model_config)
    if source is None:
        return LLaDAConfig.preset(args.preset), f"preset {args.preset}"
    if not source.is_file():
        raise FileNotFoundError(f"model configuration not found: {str(source)!r}")
    try:
        return LLaDAConfig.from_dict(json.loads(source.read_text())), str(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(source)!r}: bad JSON ({e})") from None


def dry_run(args: argparse.Namespace) -> int:
    """``train/sft --dry-run``: print the per-GPU memory estimate and the batch split."""
    from .distributed import split_global_batch
    from .memory import estimate_training_memory

    check_batch_args(args)
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1:
        raise ValueError(f"--world-size must be >= 1, got {world}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    config, source = _model_config(args)
    gb = args.global_batch or args.batch_size * args.grad_accum * world
    accum = split_global_batch(gb, args.batch_size, world)
    est = estimate_training_memory(
        config,
        world_size=world,
        micro_batch_size=args.batch_size,
        seq_len=args.seq_len,
        fsdp=args.fsdp,
        bf16=args.precision != "fp32",
    )
    mode = f"FSDP2 over {world} GPUs" if est.fsdp else f"{world} GPU(s), each with a full copy"
    precision = "bf16 mixed precision" if est.bf16 else "fp32"
    print(f"dry run ({source}): {est.num_parameters / 1e9:.3f}B parameters, {mode}, {precision}")
    print(
        f"global batch {gb} sequences of {args.seq_len} tokens per step = {world} GPU(s) x "
        f"micro-batch {args.batch_size} x {accum} accumulation step(s)"
    )
    print("expected memory per GPU:")
    print(est.report())
    if not est.fsdp and world > 1:
        sharded = estimate_training_memory(
            config,
            world_size=world,
            micro_batch_size=args.batch_size,
            seq_len=args.seq_len,
            fsdp=True,
            bf16=est.bf16,
        )
        print(
            f"with --fsdp: {sharded.total() / 2**30:.2f} GiB, with --gradient-checkpointing "
            f"{sharded.total(True) / 2**30:.2f} GiB"
        )
    return 0


def add_export_parser(sub: Any) -> None:
    """Register ``llada-ext export RUN --to FOLDER``."""
    p = sub.add_parser(
        "export",
        help="write a training checkpoint as a model folder (published safetensors layout)",
        description="Consolidate the model weights of a training checkpoint (one file, or a "
        "distributed .dcp folder of an FSDP2 run with any number of shards) into config.json + "
        "safetensors (sharded with model.safetensors.index.json when large), with the run's "
        "tokenizer and generation_config.json, ready for `sample` and from_pretrained.",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="a run folder or its checkpoints/ folder (the newest checkpoint), a checkpoint "
        "file or a step-XXXXXXXX.dcp folder",
    )
    p.add_argument("--to", required=True, metavar="FOLDER", help="the model folder to write")
    p.add_argument(
        "--dtype",
        choices=("auto", *_DTYPES),
        default="auto",
        help="weights dtype: 'auto' = as trained (default: %(default)s)",
    )
    p.add_argument(
        "--max-shard-size",
        type=float,
        default=5.0,
        metavar="GIB",
        help="largest safetensors file in GiB; above it the weights are sharded "
        "(default: %(default)s)",
    )
    from ..cli.options import add_debug

    add_debug(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``llada-ext export``."""
    import torch

    from .export import export_checkpoint

    if not args.max_shard_size > 0:
        raise ValueError(f"--max-shard-size must be > 0, got {args.max_shard_size}")
    dtype = None if args.dtype == "auto" else getattr(torch, _DTYPES[args.dtype])
    path = export_checkpoint(
        args.run, args.to, dtype=dtype, max_shard_size=max(1, int(args.max_shard_size * 2**30))
    )
    print(f"exported {path} to {args.to}")
    return 0
