"""``llada-ext train`` and ``llada-ext sft``: their options (data, model, optimisation,
output) and the training run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .common import CLIError, apply_threads, check_threads
from .options import MAX_TOKENS, add_common_runtime, add_data_sources, data_records

PRESETS = ("tiny", "1b", "8b")


SFT_RECORDS = "record per line with 'prompt'/'response' or 'messages')"
TEXT_RECORDS = "record per line with a 'text' field)"


def _add_data_group(p: argparse.ArgumentParser, *, sft: bool) -> None:
    d = p.add_argument_group("data")
    add_data_sources(
        d,
        data_help="training files or folders: .txt/.md (one document per file) or .jsonl/.json "
        "(one " + (SFT_RECORDS if sft else TEXT_RECORDS) + "; or one folder written by "
        "`llada-ext prepare` (token shards read through memory maps, same batches as the "
        "original files)",
        formats=("auto", "text", "jsonl", "shards"),
    )
    d.add_argument(
        "--no-verify-data",
        action="store_true",
        help="prepared folder: skip the SHA-256 check of the shards at start (rank 0 reads "
        "every shard once for it; headers, sizes and indexes are always checked)",
    )
    if sft:
        d.add_argument(
            "--chat-template",
            action="store_true",
            help="wrap 'prompt'/'response' pairs in the tokenizer's chat template "
            "('messages' records always use it)",
        )
    else:
        d.add_argument(
            "--text-field",
            default="text",
            help="JSONL field holding the document text (default: %(default)s)",
        )
        d.add_argument("--add-bos", action="store_true", help="prepend BOS to every document")
    d.add_argument(
        "--seq-len",
        type=int,
        default=256 if not sft else 512,
        help="tokens per training sequence"
        + (" (prompt + answer + EOS padding)" if sft else " (documents are packed)")
        + " (default: %(default)s)",
    )


def _add_model_group(p: argparse.ArgumentParser, *, sft: bool) -> None:
    m = p.add_argument_group("model")
    m.add_argument(
        "--preset",
        choices=PRESETS,
        default="tiny",
        help="architecture of a model trained from scratch: 'tiny' (byte-level, ~1M "
        "parameters), '1b', '8b' (default: %(default)s)",
    )
    m.add_argument(
        "--model-config",
        metavar="FILE",
        default=None,
        help="config.json of the architecture (overrides --preset)",
    )
    m.add_argument(
        "--init-from",
        metavar="FOLDER",
        default=None,
        help="start from the weights of a saved model folder (config.json + safetensors)"
        + (", e.g. a pre-trained run" if sft else ""),
    )
    m.add_argument(
        "--tokenizer",
        metavar="FOLDER",
        default=None,
        help="folder with tokenizer.json (default: the --init-from folder if it has one, "
        "else the byte tokenizer of the tiny preset)",
    )


def _add_batch_and_schedule_args(o: Any) -> None:
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    o.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per micro-batch per process (default: %(default)s)",
    )
    o.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches accumulated per optimizer step (default: %(default)s)",
    )
    o.add_argument(
        "--lr", type=float, default=4e-4, help="peak learning rate (default: %(default)s)"
    )
    o.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.1,
        help="final learning rate as a fraction of --lr (default: %(default)s)",
    )
    o.add_argument(
        "--warmup-steps",
        type=int,
        default=100,
        help="linear warmup, in optimizer steps (default: %(default)s)",
    )
    o.add_argument(
        "--decay-frac",
        type=float,
        default=0.2,
        help="fraction of --steps at the end spent decaying the learning rate "
        "(warmup-stable-decay schedule) (default: %(default)s)",
    )
    o.add_argument(
        "--decay-shape",
        choices=("linear", "cosine", "sqrt"),
        default="linear",
        help="shape of the final decay (default: %(default)s)",
    )


def _add_loss_args(o: Any, *, sft: bool) -> None:
    o.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="AdamW weight decay of weight matrices; norms and embeddings get none "
        "(default: %(default)s)",
    )
    o.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="clip the global gradient norm to this value, 0 = off (default: %(default)s)",
    )
    o.add_argument(
        "--mask-eps",
        type=float,
        default=1e-3,
        help="smallest masking probability: p_mask = (1 - eps) * t + eps (default: %(default)s)",
    )
    if not sft:
        o.add_argument(
            "--random-length-prob",
            type=float,
            default=0.01,
            help="probability that a batch is cut to a random length in [1, seq-len] "
            "(default: %(default)s)",
        )


def _add_compute_args(p: argparse.ArgumentParser, o: Any) -> None:
    o.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="'auto': bfloat16 autocast on CUDA, float32 on CPU (default: %(default)s)",
    )
    o.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, more compute)",
    )
    o.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model with FSDP2 across processes (launch with torchrun); default "
        "is DDP when several processes run",
    )
    from ..training.cli_support import add_scale_args

    add_scale_args(p, o)


def _add_optimisation_group(p: argparse.ArgumentParser, *, sft: bool) -> None:
    o = p.add_argument_group("optimisation")
    _add_batch_and_schedule_args(o)
    _add_loss_args(o, sft=sft)
    _add_compute_args(p, o)


def _add_output_group(p: argparse.ArgumentParser, *, sft: bool) -> None:
    c = p.add_argument_group("output")
    c.add_argument(
        "--out",
        default="runs/" + ("sft" if sft else "pretrain"),
        help="output folder: model weights, checkpoints/, metrics.jsonl (default: %(default)s)",
    )
    c.add_argument(
        "--save-every",
        type=int,
        default=500,
        help="write a checkpoint every N optimizer steps, 0 = only at the end "
        "(default: %(default)s)",
    )
    c.add_argument(
        "--keep-last",
        type=int,
        default=3,
        help="checkpoints to keep, 0 = all (default: %(default)s)",
    )
    c.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue a run: alone, from the newest checkpoint in --out (starting fresh if "
        "there is none); or from a checkpoint file, a step-XXXXXXXX.dcp folder or a run "
        "folder. Either kind loads at any number of processes, with or without --fsdp",
    )
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_training_args(p: argparse.ArgumentParser, *, sft: bool) -> None:
    """All options of ``train`` (``sft=False``) or ``sft``, in their help order."""
    _add_data_group(p, sft=sft)
    _add_model_group(p, sft=sft)
    _add_optimisation_group(p, sft=sft)
    _add_output_group(p, sft=sft)
    add_common_runtime(p)


# (sub-command, objective, help, description)
_COMMANDS = (
    (
        "train",
        "pretrain",
        "pre-train a model (Alg. 1: random masking of all tokens)",
        "Pre-train a LLaDA mask predictor on text (Alg. 1). Multi-GPU: "
        "torchrun --nproc-per-node N -m llada_ext.cli train ...",
    ),
    (
        "sft",
        "sft",
        "supervised fine-tuning (Alg. 2: prompt kept, answer masked)",
        "Fine-tune on prompt/response pairs (Alg. 2): the prompt is never masked, "
        "the answer is padded with EOS to --seq-len and the padding is trained.",
    ),
)


def add_parsers(sub: Any) -> None:
    """The ``train`` and ``sft`` sub-commands."""
    for name, objective, help_text, description in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=description)
        add_training_args(p, sft=objective == "sft")
        p.set_defaults(func=run, objective=objective)


def prepared_folder(args: argparse.Namespace) -> Path | None:
    """The folder of --data when it is a prepared one (token shards), else None."""
    from ..training.shards import is_prepared_folder

    auto = args.data_format == "auto" and any(is_prepared_folder(d) for d in args.data)
    if args.data_format != "shards" and not auto:
        return None
    if len(args.data) != 1 or args.hf_dataset:
        raise CLIError(
            "a prepared folder is the whole training data: pass one --data FOLDER and no "
            "other files or --hf-dataset (prepare them together instead)"
        )
    folder = Path(args.data[0])
    manifest = _manifest(folder)
    sft = args.objective == "sft"
    if manifest["objective"] != args.objective:
        command = "sft" if manifest["objective"] == "sft" else "train"
        raise CLIError(
            f"{str(folder)!r} holds {manifest['objective']} data: train on it with "
            f"`llada-ext {command}`, or prepare the data "
            + ("with --sft" if sft else "without --sft")
        )
    checks = (
        ("--chat-template", sft and args.chat_template and not manifest.get("chat_template")),
        ("--add-bos", not sft and args.add_bos and not manifest.get("add_bos")),
        ("--text-field", not sft and args.text_field not in ("text", manifest["text_field"])),
    )
    for flag, contradicted in checks:
        if contradicted:
            raise CLIError(
                f"{flag} is applied when preparing, and {str(folder)!r} was prepared "
                "otherwise: run `llada-ext prepare` again with it"
            )
    return folder


def _manifest(folder: Path) -> dict[str, Any]:
    from ..training.shards import load_manifest

    return load_manifest(folder)


def training_tokenizer(
    args: argparse.Namespace, prepared: Path | None
) -> tuple[str | None, Any, int]:
    """(tokenizer folder copied into the run, tokenizer or None, vocabulary size)."""
    from ..tokenizer import load_tokenizer

    tok_folder = args.tokenizer
    if (
        tok_folder is None
        and args.init_from
        and (Path(args.init_from) / "tokenizer.json").is_file()
    ):
        tok_folder = args.init_from
    if prepared is None:
        tokenizer = load_tokenizer(tok_folder)
        return tok_folder, tokenizer, int(tokenizer.vocab_size)
    from ..training.shards import check_tokenizer

    manifest = _manifest(prepared)
    if tok_folder is not None:
        tokenizer = load_tokenizer(tok_folder)
        check_tokenizer(manifest, tokenizer, tok_folder)
        return tok_folder, tokenizer, int(tokenizer.vocab_size)
    tok = manifest["tokenizer"]
    if tok.get("type") == "tokenizers":  # the copy the folder holds goes into the run folder
        return str(prepared), None, int(tok["vocab_size"])
    tokenizer = load_tokenizer(None)
    check_tokenizer(manifest, tokenizer, None)
    return None, tokenizer, int(tokenizer.vocab_size)


def training_dataset(
    args: argparse.Namespace, tokenizer: Any, prepared: Path | None, is_main: bool
) -> Any:
    """The rows to train on: memory-mapped shards of a prepared folder, else the records of
    --data / --hf-dataset tokenized in memory."""
    from ..training import (
        build_pretrain_dataset,
        build_sft_dataset,
        records_to_pairs,
        records_to_texts,
    )

    sft = args.objective == "sft"
    if prepared is not None:
        from ..training.shards import ShardDataset

        verify = is_main and not args.no_verify_data
        dataset = ShardDataset(
            prepared, seq_len=args.seq_len, objective=args.objective, verify=verify
        )
        dropped = dataset.dropped
    elif sft:
        pairs = records_to_pairs(data_records(args), tokenizer, chat_template=args.chat_template)
        dataset, dropped = build_sft_dataset(
            pairs, seq_len=args.seq_len, eos_id=tokenizer.eos_token_id
        )
    else:
        texts = records_to_texts(data_records(args), field=args.text_field)
        return build_pretrain_dataset(texts, tokenizer, seq_len=args.seq_len, add_bos=args.add_bos)
    if dropped and is_main:
        print(f"note: {dropped} examples dropped (prompt longer than --seq-len)")
    return dataset


def check_training_memory(cfg: Any, device: str | None) -> None:
    """Refuses, before allocating, a CPU training run whose weights, gradients and AdamW
    state (16 bytes a parameter in float32) alone exceed the machine's physical memory."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in (None, "cpu"):
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return
    import math

    from ..model_files import expected_shapes

    params = sum(math.prod(shape) for shape in expected_shapes(cfg).values())
    need = 16 * params
    if need > total:
        raise CLIError(
            f"training this model on the CPU needs at least {need / 2**30:.0f} GiB "
            f"({params / 1e9:.2f}B parameters x 16 bytes for weights, gradients and AdamW), "
            f"but the machine has {total / 2**30:.0f} GiB; use a smaller --preset or "
            "--model-config, or a GPU"
        )


def _new_model(args: argparse.Namespace) -> Any:
    """The model to train: --init-from weights, else a fresh --model-config / --preset one."""
    from ..model import LLaDAConfig, LLaDAModel

    if args.init_from is not None:
        return LLaDAModel.from_pretrained(args.init_from, backend=args.backend)
    if args.model_config is not None:
        cfg_path = Path(args.model_config)
        if not cfg_path.is_file():
            raise CLIError(f"--model-config file not found: {args.model_config!r}")
        try:
            cfg = LLaDAConfig.from_dict(json.loads(cfg_path.read_text()))
        except json.JSONDecodeError as e:
            raise CLIError(f"--model-config {args.model_config!r}: bad JSON ({e})") from None
    else:
        cfg = LLaDAConfig.preset(args.preset)
    check_training_memory(cfg, args.device)
    return LLaDAModel(cfg, backend=args.backend)


def _train_config(args: argparse.Namespace) -> Any:
    from ..training import TrainConfig

    return TrainConfig(
        objective=args.objective,
        out_dir=args.out,
        steps=args.steps,
        micro_batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        global_batch=args.global_batch,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        decay_frac=args.decay_frac,
        decay_shape=args.decay_shape,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        mask_eps=args.mask_eps,
        random_length_prob=0.0 if args.objective == "sft" else args.random_length_prob,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
        save_every=args.save_every,
        keep_last=args.keep_last,
        progress=not args.no_progress,
    )


def _check_args(args: argparse.Namespace) -> None:
    from ..training.cli_support import check_batch_args

    check_batch_args(args)
    if not args.data and not args.hf_dataset:
        raise CLIError("no training data: pass --data FILE... and/or --hf-dataset NAME")
    if not 2 <= args.seq_len <= MAX_TOKENS:
        raise CLIError(f"--seq-len must lie in [2, {MAX_TOKENS}], got {args.seq_len}")
    if args.init_from is not None and not Path(args.init_from).is_dir():
        raise CLIError(f"--init-from folder not found: {args.init_from!r}")


def run(args: argparse.Namespace) -> int:
    """``llada-ext train`` / ``llada-ext sft``."""
    import torch

    from ..training import Trainer, cleanup_distributed, init_distributed

    check_threads(args)
    from ..training.cli_support import dry_run

    if args.dry_run:
        return dry_run(args)
    _check_args(args)
    prepared = prepared_folder(args)
    tok_folder, tokenizer, vocab_size = training_tokenizer(args, prepared)

    info = init_distributed(args.device)
    try:
        torch.manual_seed(args.seed)  # same initial weights on every rank
        model = _new_model(args)
        apply_threads(args.threads, model.config.d_model)
        if vocab_size > model.config.vocab_size:
            raise CLIError(
                f"the tokenizer has {vocab_size} ids but the model only "
                f"{model.config.vocab_size}; pick a matching --tokenizer / model"
            )
        dataset = training_dataset(args, tokenizer, prepared, info.is_main)

        tc = _train_config(args)
        trainer = Trainer(model, dataset, tc, dist_info=info, tokenizer_folder=tok_folder)
        if args.resume is not None:
            resumed = trainer.resume(args.resume)
            if info.is_main:
                print(
                    f"resumed from {trainer.last_checkpoint} at step {trainer.step}"
                    if resumed
                    else "no checkpoint to resume from; starting fresh"
                )
        if info.is_main:
            n_par = model.num_parameters()
            print(
                f"{args.objective}: {n_par / 1e6:.2f}M parameters, {len(dataset)} sequences of "
                f"{dataset.seq_len} tokens, {trainer.sequences_per_step} sequences/step, "
                f"{info.world_size} process(es) on {info.device}, backend {args.backend}"
            )
        result = trainer.train()
        if info.is_main:
            last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
            print(
                f"step {result.step}/{tc.steps}, last loss {last}, "
                f"{result.tokens_per_second:,.0f} tokens/s; model saved to {args.out}"
            )
        return 130 if result.interrupted else 0
    finally:
        cleanup_distributed()
