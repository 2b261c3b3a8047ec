"""The ``llada-ext`` command line: train, fine-tune, sample, score, benchmark, demo.

Every sub-command has ``--help``. User errors (missing files, bad settings, out of memory)
print one plain line and exit with status 1 (2 for bad command-line syntax); set
``LLADA_DEBUG=1`` or pass ``--debug`` to get the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_PRESETS = ("tiny", "1b", "8b")


class CLIError(Exception):
    """An error caused by the user's input; printed without a traceback."""


# ------------------------------------------------------------------------------------------
# argument definitions
# ------------------------------------------------------------------------------------------
def _add_model_loading(p: argparse.ArgumentParser) -> None:
    """Options of the sub-commands that load a saved model folder."""
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype: 'auto' = bfloat16 on CUDA, float32 on CPU (default: %(default)s)",
    )
    p.add_argument("--tokenizer", metavar="FOLDER", help="tokenizer folder (default: --model)")


# Longest sequence the CLI accepts (--seq-len, prompt + --gen-length): far beyond any LLaDA
# model, small enough that the size is refused before anything is allocated.
MAX_TOKENS = 1 << 20


def _add_common_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="where to run: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N' "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--backend",
        choices=("kernels", "torch"),
        default="kernels",
        help="'kernels': the library's fused attention / masked cross-entropy; 'torch': plain "
        "PyTorch (reference) (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed (integer, default: %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 for models up to d_model 512, the fastest on a shared "
        "CPU; PyTorch's choice for larger ones)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


_SFT_RECORDS = "record per line with 'prompt'/'response' or 'messages')"
_TEXT_RECORDS = "record per line with a 'text' field)"


def _add_data_sources(d: Any, *, data_help: str, formats: tuple[str, ...]) -> None:
    """--data, --data-format and the Hugging Face dataset options (train, sft, prepare)."""
    d.add_argument("--data", nargs="+", metavar="PATH", default=[], help=data_help)
    d.add_argument(
        "--data-format",
        choices=formats,
        default="auto",
        help="how to read --data: 'auto' goes by suffix (.jsonl/.json/.ndjson are JSONL)"
        + (
            ", and a folder holding manifest.json is a prepared folder"
            if "shards" in formats
            else ""
        )
        + " (default: %(default)s)",
    )
    d.add_argument(
        "--hf-dataset",
        metavar="NAME",
        default=None,
        help="Hugging Face dataset to read instead of / besides --data (needs the `datasets` "
        "package and network access or a local cache)",
    )
    d.add_argument("--hf-config", default=None, help="dataset configuration name")
    d.add_argument("--hf-split", default="train", help="dataset split (default: %(default)s)")
    d.add_argument(
        "--hf-limit",
        type=int,
        default=None,
        metavar="N",
        help="read at most N records of the dataset (default: all)",
    )


def _add_training_args(p: argparse.ArgumentParser, *, sft: bool) -> None:
    d = p.add_argument_group("data")
    _add_data_sources(
        d,
        data_help="training files or folders: .txt/.md (one document per file) or .jsonl/.json "
        "(one " + (_SFT_RECORDS if sft else _TEXT_RECORDS) + "; or one folder written by "
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

    m = p.add_argument_group("model")
    m.add_argument(
        "--preset",
        choices=_PRESETS,
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

    o = p.add_argument_group("optimisation")
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
    from .training.cli_support import add_scale_args

    add_scale_args(p, o)

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
    _add_common_runtime(p)


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    _add_data_sources(
        d,
        data_help="files or folders: .txt/.md (one document per file) or .jsonl/.json (one "
        "record per line: a 'text' field, or with --sft 'prompt'/'response' or 'messages')",
        formats=("auto", "text", "jsonl"),
    )
    d.add_argument(
        "--sft",
        action="store_true",
        help="prepare prompt/response examples for `llada-ext sft` (default: documents for "
        "`llada-ext train`)",
    )
    d.add_argument(
        "--chat-template",
        action="store_true",
        help="with --sft: wrap 'prompt'/'response' pairs in the tokenizer's chat template "
        "('messages' records always use it)",
    )
    d.add_argument(
        "--text-field",
        default="text",
        help="without --sft: JSONL field holding the document text (default: %(default)s)",
    )
    d.add_argument(
        "--add-bos", action="store_true", help="without --sft: prepend BOS to every document"
    )
    d.add_argument(
        "--tokenizer",
        metavar="FOLDER",
        default=None,
        help="folder with tokenizer.json, copied into --out (default: the byte tokenizer of "
        "the tiny preset)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="FOLDER", help="the folder to write")
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a prepared folder already (any other existing, non-empty "
        "folder is refused)",
    )
    o.add_argument(
        "--dtype",
        choices=("auto", "uint16", "uint32"),
        default="auto",
        help="token dtype: 'auto' = uint16 when the vocabulary has at most 65536 ids, else "
        "uint32 (default: %(default)s)",
    )
    o.add_argument(
        "--shard-tokens",
        type=int,
        default=100_000_000,
        metavar="N",
        help="tokens per shard file (whole documents) (default: %(default)s)",
    )
    o.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizing processes, 1 = tokenize in this process; the output does not "
        "depend on it (default: one less than the CPU count, at most 8)",
    )
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``llada-ext`` argument parser with all sub-commands.

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="llada-ext",
        description="Masked diffusion language models (LLaDA): train, fine-tune, sample, score "
        "and benchmark with the llada_ext kernels. Start with `llada-ext demo`.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="pre-train a model (Alg. 1: random masking of all tokens)",
        description="Pre-train a LLaDA mask predictor on text (Alg. 1). Multi-GPU: "
        "torchrun --nproc-per-node N -m llada_ext.cli train ...",
    )
    _add_training_args(p, sft=False)
    p.set_defaults(func=_cmd_train, objective="pretrain")

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning (Alg. 2: prompt kept, answer masked)",
        description="Fine-tune on prompt/response pairs (Alg. 2): the prompt is never masked, "
        "the answer is padded with EOS to --seq-len and the padding is trained.",
    )
    _add_training_args(p, sft=True)
    p.set_defaults(func=_cmd_train, objective="sft")

    p = sub.add_parser(
        "prepare",
        help="tokenize training data once into memory-mapped token shards",
        description="Tokenize text / JSONL / a Hugging Face dataset (the inputs of `train`, or "
        "of `sft` with --sft) into uint16/uint32 token shards with an index, a manifest and "
        "SHA-256 checksums, in parallel, written atomically to --out. Then pass the folder to "
        "`llada-ext train --data FOLDER` (or `sft`): the shards are read through memory maps "
        "and give the same batches as the original files, for any --seq-len.",
    )
    _add_prepare_args(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "sample",
        help="generate answers for prompts",
        description="Load a saved model folder and generate an answer for each prompt with "
        "the reverse process (low-confidence remasking, semi-autoregressive blocks). Prompts "
        "come from --prompt, --prompt-file, or standard input (one per line) when neither is "
        "given. With the default options the output is that of the public LLaDA sampler; the "
        "options under 'speed' trade exactness for speed.",
    )
    p.add_argument("--model", required=True, metavar="FOLDER", help="saved model folder")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="prompt text (repeat for several prompts); '-' reads prompts from standard input, "
        "one per line",
    )
    p.add_argument(
        "--prompt-file",
        metavar="FILE",
        help="file with one prompt per line ('-' = standard input); without --prompt and "
        "--prompt-file, prompts are read from standard input when it is not a terminal",
    )
    p.add_argument(
        "--chat",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        help="wrap each prompt in the tokenizer's chat template (for Instruct checkpoints); "
        "'--chat' alone = 'on'; 'auto' = on when the tokenizer folder's tokenizer_config.json "
        "defines a chat_template (the byte tokenizer never turns it on by itself; use "
        "'--chat off' for a base model whose tokenizer ships a template) (default: %(default)s)",
    )
    p.add_argument(
        "--no-chat",
        dest="chat",
        action="store_const",
        const="off",
        help="same as --chat off",
    )
    folder_default = "(default: the model folder's generation_config.json, else %s)"
    p.add_argument("--gen-length", type=int, help="answer length in tokens " + folder_default % 64)
    p.add_argument(
        "--steps",
        type=int,
        help="sampling steps in total, a multiple of gen-length / block-length "
        + folder_default % 64,
    )
    p.add_argument(
        "--block-length",
        type=int,
        help="tokens per semi-autoregressive block; must divide --gen-length "
        + folder_default % 32,
    )
    p.add_argument(
        "--temperature", type=float, help="0 = greedy; > 0 samples " + folder_default % 0.0
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance scale, 0 = off " + folder_default % 0.0,
    )
    p.add_argument(
        "--remasking",
        choices=("low_confidence", "random", "margin", "entropy"),
        help="which predictions are kept each step " + folder_default % "low_confidence",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="prompts sampled together (left-padded with EOS, which the model does not "
        "see); the answers are those of --batch-size 1, except for the random draws of "
        "--temperature > 0 or --remasking random (default: %(default)s)",
    )
    p.add_argument(
        "--show-steps",
        action="store_true",
        help="print the answer canvas after every step to standard error: 'step N/T: text' "
        "with '_' for each still-masked token, one line per step run and prompt (--threshold, "
        "--factor and --eos-early-stop can finish in fewer than T = --steps)",
    )
    speed = p.add_argument_group(
        "speed",
        "Options marked 'approximation' can change the answers compared with the default "
        "exact sampler; they trade exactness for speed.",
    )
    speed.add_argument(
        "--cache",
        choices=("none", "prefix", "dual"),
        default="none",
        help="key/value caching within a block (approximation): 'prefix' reuses the prompt "
        "and finished blocks, 'dual' also the masked suffix; the cache is rebuilt at each "
        "block start (default: %(default)s)",
    )
    speed.add_argument(
        "--cache-refresh",
        type=int,
        default=None,
        metavar="N",
        help="with --cache: also rebuild the cache every N steps inside a block (smaller N = "
        "closer to exact and slower; 1 = exact) (default: only at block starts)",
    )
    speed.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="TAU",
        help="approximation: each step also keeps every prediction whose confidence exceeds "
        "TAU (a probability, e.g. 0.9) and ends a block once it has no mask left; pair it "
        "with --steps equal to --gen-length (default: off)",
    )
    speed.add_argument(
        "--factor",
        type=float,
        default=None,
        metavar="F",
        help="approximation: Fast-dLLM's factor rule instead of --threshold: each step keeps "
        "the n most confident predictions for the largest n whose i-th confidence (i = 1..n) "
        "is >= 1 - F / (i + 1); F > 0, e.g. 1.0; needs --remasking low_confidence or margin "
        "(default: off)",
    )
    speed.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each sampling step as a captured CUDA graph (needs a CUDA device, e.g. "
        "--device cuda; same answers, less launch overhead)",
    )
    speed.add_argument(
        "--eos-early-stop",
        action="store_true",
        help="approximation: once every answer ends in EOS through the end of a finished "
        "block, fill the remaining blocks with EOS and stop (what an SFT model predicts there)",
    )
    eos = p.add_argument_group("end of the answer")
    eos.add_argument(
        "--forbid-eos",
        action="store_true",
        help="never predict EOS (forces answers that use the full --gen-length)",
    )
    eos.add_argument(
        "--zero-eos-confidence",
        action="store_true",
        help="keep EOS / end-of-turn predictions last, after every other candidate (avoids "
        "answers that end too early)",
    )
    _add_model_loading(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='print JSON lines {"prompt": ..., "answer": ...} (answers are always cut at the '
        "first EOS / end-of-turn token)",
    )
    _add_common_runtime(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "loglik",
        help="estimate log p(answer | prompt), or rank several answers",
        description="Monte Carlo estimate of the conditional log-likelihood (Alg. 3). With one "
        "--answer, prints the estimate; with several, prints '<loglik> TAB <answer>' per "
        "answer and a TAB '*' after the most likely one.",
    )
    p.add_argument("--model", required=True, metavar="FOLDER", help="saved model folder")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument(
        "--answer",
        required=True,
        action="append",
        metavar="TEXT",
        help="answer text; repeat to score several candidate answers of the same prompt",
    )
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    p.add_argument(
        "--mc-num",
        type=int,
        default=128,
        help="Monte Carlo samples, a multiple of --batch-size (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="samples per forward pass (default: %(default)s)"
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance scale (default: the model folder's "
        "generation_config.json, else 0)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="divide each log-likelihood by its answer's number of tokens (compares answers "
        "of different lengths)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print a JSON list of {"answer": ..., "loglik": ..., "best": ...}',
    )
    _add_model_loading(p)
    _add_common_runtime(p)
    p.set_defaults(func=_cmd_loglik)

    p = sub.add_parser(
        "bench",
        help="run the throughput benchmarks (options are passed on; see `bench --help`)",
        add_help=False,
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "demo",
        help="train the tiny model on a built-in task for a few minutes and evaluate it",
        description="Trains the tiny byte-level model on the built-in corpus (reverse / copy "
        "letter strings), saves it, samples answers for held-out prompts, prints the "
        "exact-match accuracy and the kernels-vs-torch training throughput.",
    )
    from .demo import add_demo_arguments

    add_demo_arguments(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=_cmd_demo)
    from .training.cli_support import add_export_parser

    add_export_parser(sub)
    for sp in sub.choices.values():  # errors after parsing are reported with this usage
        sp.set_defaults(usage_parser=sp)
    return parser


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _set_threads(args: argparse.Namespace) -> None:
    """Checks --threads (the count is applied once the model size is known)."""
    n = getattr(args, "threads", None)
    if n is not None and n < 1:
        raise CLIError(f"--threads must be >= 1, got {n}")


# Models up to this width run on one CPU thread unless --threads says otherwise.
SMALL_MODEL_WIDTH = 512


def apply_threads(requested: int | None, d_model: int) -> None:
    """The CPU thread count of every sub-command: --threads N if given; else one thread for a
    small model (d_model <= 512: its matrices gain little from more threads, while OpenMP
    threads that wait on a busy core slow a step down many times over), and PyTorch's own
    choice for larger ones."""
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
    elif d_model <= SMALL_MODEL_WIDTH:
        torch.set_num_threads(1)


def _resolve_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_model(folder: str, device_name: str, dtype_name: str, backend: str) -> Any:
    from .model import LLaDAModel
    from .training.distributed import resolve_device

    path = Path(folder)
    if not path.is_dir():
        raise CLIError(f"model folder not found: {folder!r}")
    device = resolve_device(device_name)
    model = LLaDAModel.from_pretrained(
        path, device=device, dtype=_resolve_dtype(dtype_name, device), backend=backend
    )
    return model.eval()


def _prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    return list(tokenizer.encode(text))


def _one_line(text: str) -> str:
    """``text`` with line breaks shown as ``\\n`` / ``\\r`` so that it stays on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _stdin_is_terminal() -> bool:
    stream = sys.stdin
    if stream is None:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # closed or replaced standard input
        return True


def _read_stdin_prompts() -> list[str]:
    stream = sys.stdin
    if stream is None:
        return []
    try:
        text = stream.read()
    except (OSError, ValueError):  # closed or unreadable standard input
        return []
    return _nonempty_lines(text)


def _collect_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts of ``sample`` in order: ``--prompt`` values, ``--prompt-file`` lines, and
    standard input (for ``-``, or when neither option is given and it is not a terminal)."""
    stdin_read = False

    def from_stdin() -> list[str]:
        nonlocal stdin_read
        if stdin_read:  # a second '-' finds standard input exhausted
            return []
        stdin_read = True
        return _read_stdin_prompts()

    prompts: list[str] = []
    for text in args.prompt:
        prompts += from_stdin() if text == "-" else [text]
    if args.prompt_file == "-":
        prompts += from_stdin()
    elif args.prompt_file:
        pf = Path(args.prompt_file)
        if not pf.is_file():
            raise CLIError(f"--prompt-file not found: {args.prompt_file!r}")
        prompts += _nonempty_lines(pf.read_text(encoding="utf-8"))
    if not args.prompt and not args.prompt_file and not _stdin_is_terminal():
        prompts += from_stdin()
    if not prompts:
        raise CLIError(
            "no prompt: pass --prompt TEXT or --prompt-file FILE, or pipe prompts (one per "
            "line) to standard input"
        )
    return prompts


def _chat_enabled(mode: str, tokenizer: Any, folder: str) -> bool:
    """``--chat on/off`` as given; ``auto``: on iff the tokenizer (not the byte tokenizer)
    carries a chat template, as an attribute or in its folder's tokenizer_config.json."""
    if mode != "auto":
        return mode == "on"
    from .tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return False
    if getattr(tokenizer, "chat_template", None):
        return True
    cfg = Path(folder) / "tokenizer_config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("chat_template"))


def _fill_generation_defaults(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """Sampler settings not given on the command line come from the model folder's
    generation_config.json (else the LLaDA defaults); returns the folder's settings."""
    from .generation_config import read_generation_config

    settings = read_generation_config(args.model)
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, settings[name])
    return settings


def _sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``generate`` for the speed / EOS options that were set; options
    left at their defaults are not passed."""
    opts: dict[str, Any] = {}
    if args.cache != "none":
        opts["cache"] = args.cache
    if args.cache_refresh is not None:
        if args.cache == "none":
            raise CLIError("--cache-refresh needs --cache prefix or --cache dual")
        if args.cache_refresh < 1:
            raise CLIError(f"--cache-refresh must be >= 1, got {args.cache_refresh}")
        opts["cache_refresh"] = args.cache_refresh
    if args.threshold is not None:
        opts["threshold"] = args.threshold
    if args.factor is not None:
        opts["factor"] = args.factor
    if args.cuda_graphs:
        opts["cuda_graphs"] = True
    for name in ("eos_early_stop", "forbid_eos", "zero_eos_confidence"):
        if getattr(args, name):
            opts[name] = True
    return opts


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------
def _data_records(args: argparse.Namespace) -> Any:
    """The records of --data and --hf-dataset, read lazily (train, sft, prepare)."""
    from .training import load_hf_records, read_records

    if args.data:
        yield from read_records(args.data, fmt=args.data_format)
    if args.hf_dataset:
        yield from load_hf_records(
            args.hf_dataset, config=args.hf_config, split=args.hf_split, limit=args.hf_limit
        )


def _prepared_folder(args: argparse.Namespace) -> Path | None:
    """The folder of --data when it is a prepared one (token shards), else None."""
    from .training.shards import is_prepared_folder

    auto = args.data_format == "auto" and any(is_prepared_folder(d) for d in args.data)
    if args.data_format != "shards" and not auto:
        return None
    if len(args.data) != 1 or args.hf_dataset:
        raise CLIError(
            "a prepared folder is the whole training data: pass one --data FOLDER and no "
            "other files or --hf-dataset (prepare them together instead)"
        )
    folder = Path(args.data[0])
    manifest = _load_manifest(folder)
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


def _load_manifest(folder: Path) -> dict[str, Any]:
    from .training.shards import load_manifest

    return load_manifest(folder)


def _training_tokenizer(
    args: argparse.Namespace, prepared: Path | None
) -> tuple[str | None, Any, int]:
    """(tokenizer folder copied into the run, tokenizer or None, vocabulary size)."""
    from .tokenizer import load_tokenizer

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
    from .training.shards import check_tokenizer

    manifest = _load_manifest(prepared)
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


def _training_dataset(
    args: argparse.Namespace, tokenizer: Any, prepared: Path | None, is_main: bool
) -> Any:
    """The rows to train on: memory-mapped shards of a prepared folder, else the records of
    --data / --hf-dataset tokenized in memory."""
    from .training import (
        build_pretrain_dataset,
        build_sft_dataset,
        records_to_pairs,
        records_to_texts,
    )

    sft = args.objective == "sft"
    if prepared is not None:
        from .training.shards import ShardDataset

        verify = is_main and not args.no_verify_data
        dataset = ShardDataset(
            prepared, seq_len=args.seq_len, objective=args.objective, verify=verify
        )
        dropped = dataset.dropped
    elif sft:
        pairs = records_to_pairs(_data_records(args), tokenizer, chat_template=args.chat_template)
        dataset, dropped = build_sft_dataset(
            pairs, seq_len=args.seq_len, eos_id=tokenizer.eos_token_id
        )
    else:
        texts = records_to_texts(_data_records(args), field=args.text_field)
        return build_pretrain_dataset(texts, tokenizer, seq_len=args.seq_len, add_bos=args.add_bos)
    if dropped and is_main:
        print(f"note: {dropped} examples dropped (prompt longer than --seq-len)")
    return dataset


def _cmd_prepare(args: argparse.Namespace) -> int:
    import shlex

    from .training.prepare import prepare_shards

    if not args.data and not args.hf_dataset:
        raise CLIError("no data: pass --data FILE... and/or --hf-dataset NAME")
    if args.sft and (args.add_bos or args.text_field != "text"):
        raise CLIError("--add-bos and --text-field are for pre-training data (without --sft)")
    if args.chat_template and not args.sft:
        raise CLIError("--chat-template is for SFT data: add --sft")
    workers = args.workers
    if workers is None:  # one core is left to the process that reads records, writes shards
        workers = max(1, min((os.cpu_count() or 1) - 1, 8))
    if workers < 1 or args.shard_tokens < 1:
        raise CLIError("--workers and --shard-tokens must be >= 1")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise CLIError(f"--tokenizer folder not found: {args.tokenizer!r}")
    source = {
        "data": [str(d) for d in args.data],
        "data_format": args.data_format,
        "hf_dataset": args.hf_dataset,
        "hf_config": args.hf_config,
        "hf_split": args.hf_split if args.hf_dataset else None,
        "hf_limit": args.hf_limit,
    }
    m = prepare_shards(
        _data_records(args),
        args.out,
        objective="sft" if args.sft else "pretrain",
        tokenizer_folder=args.tokenizer,
        text_field=args.text_field,
        add_bos=args.add_bos,
        chat_template=args.chat_template,
        dtype=args.dtype,
        shard_tokens=args.shard_tokens,
        workers=workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        source=source,
    )
    what = ("example" if args.sft else "document") + ("" if m["num_documents"] == 1 else "s")
    print(
        f"prepared {m['num_documents']} {what}, {m['num_tokens']} tokens ({m['dtype']}, "
        f"{len(m['shards'])} shard(s)) in {args.out}; train with: llada-ext "
        f"{'sft' if args.sft else 'train'} --data {shlex.quote(args.out)}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .model import LLaDAConfig, LLaDAModel
    from .training import TrainConfig, Trainer, cleanup_distributed, init_distributed

    _set_threads(args)
    from .training.cli_support import check_batch_args, dry_run

    if args.dry_run:
        return dry_run(args)
    check_batch_args(args)
    if not args.data and not args.hf_dataset:
        raise CLIError("no training data: pass --data FILE... and/or --hf-dataset NAME")
    if not 2 <= args.seq_len <= MAX_TOKENS:
        raise CLIError(f"--seq-len must lie in [2, {MAX_TOKENS}], got {args.seq_len}")
    if args.init_from is not None and not Path(args.init_from).is_dir():
        raise CLIError(f"--init-from folder not found: {args.init_from!r}")
    prepared = _prepared_folder(args)
    tok_folder, tokenizer, vocab_size = _training_tokenizer(args, prepared)

    info = init_distributed(args.device)
    try:
        torch.manual_seed(args.seed)  # same initial weights on every rank
        if args.init_from is not None:
            model = LLaDAModel.from_pretrained(args.init_from, backend=args.backend)
        else:
            if args.model_config is not None:
                cfg_path = Path(args.model_config)
                if not cfg_path.is_file():
                    raise CLIError(f"--model-config file not found: {args.model_config!r}")
                try:
                    cfg = LLaDAConfig.from_dict(json.loads(cfg_path.read_text()))
                except json.JSONDecodeError as e:
                    raise CLIError(
                        f"--model-config {args.model_config!r}: bad JSON ({e})"
                    ) from None
            else:
                cfg = LLaDAConfig.preset(args.preset)
            _check_training_memory(cfg, args.device)
            model = LLaDAModel(cfg, backend=args.backend)
        apply_threads(args.threads, model.config.d_model)
        if vocab_size > model.config.vocab_size:
            raise CLIError(
                f"the tokenizer has {vocab_size} ids but the model only "
                f"{model.config.vocab_size}; pick a matching --tokenizer / model"
            )
        dataset = _training_dataset(args, tokenizer, prepared, info.is_main)

        tc = TrainConfig(
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


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .sampling import decode_answers, generate, left_pad
    from .tokenizer import load_tokenizer

    _set_threads(args)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = _sampler_options(args)  # checked before the (possibly slow) model load
    prompts = _collect_prompts(args)
    model = _load_model(args.model, args.device, args.dtype, args.backend)
    apply_threads(args.threads, model.config.d_model)
    settings = _fill_generation_defaults(
        args, ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "remasking")
    )
    tok_folder = args.tokenizer or args.model
    tokenizer = load_tokenizer(tok_folder)
    if any(options.get(k) for k in ("eos_early_stop", "forbid_eos", "zero_eos_confidence")):
        # the ids that decoding cuts at, so that sampler and decoding agree
        options["eos_id"] = int(tokenizer.eos_token_id)
        eot = getattr(tokenizer, "eot_token_id", None)
        if eot is not None:
            options["eot_id"] = int(eot)
    if args.cuda_graphs:
        if model.device.type != "cuda":
            raise CLIError(
                f"--cuda-graphs needs a CUDA device, but the model is on {model.device.type}; "
                "pass --device cuda on a machine with a GPU"
            )
        from .sampling import SamplerGraphs

        # one recording for all batches: batches of the same shape replay it
        options["cuda_graphs"] = SamplerGraphs()
    chat = _chat_enabled(args.chat, tokenizer, tok_folder)
    from .model import config_token_id

    mask_id = config_token_id(
        model.config, "mask_token_id", settings.get("mask_id"), "mask_id", "sampling"
    )
    pad_id = int(tokenizer.eos_token_id)
    encoded = [_prompt_ids(tokenizer, text, chat) for text in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise CLIError(f"prompt number {i + 1} is empty")
    gen = torch.Generator(device=model.device).manual_seed(args.seed)

    for first in range(0, len(prompts), args.batch_size):
        group = encoded[first : first + args.batch_size]
        # left padding with EOS; the attention mask hides it from the model
        x, real = left_pad(group, pad_id)
        width = x.shape[1]
        kwargs = dict(options)
        if not bool(real.all()):
            kwargs["attention_mask"] = real.to(model.device)
        if args.show_steps:
            kwargs["callback"] = _steps_printer(
                tokenizer, mask_id, width, args.steps, first, len(prompts) > 1
            )
        out = generate(
            model,
            x.to(model.device),
            gen_length=args.gen_length,
            steps=args.steps,
            block_length=args.block_length,
            temperature=args.temperature,
            cfg_scale=args.cfg_scale,
            remasking=args.remasking,
            mask_id=mask_id,
            generator=gen,
            **kwargs,
        )
        answers = decode_answers(tokenizer, out, width)  # cut at the first EOS / EoT
        for text, answer in zip(prompts[first : first + len(group)], answers):
            if args.json:
                print(json.dumps({"prompt": text, "answer": answer}), flush=True)
            else:
                print(f"{text}{answer}" if not chat else answer, flush=True)
    return 0


def _steps_printer(
    tokenizer: Any, mask_id: int, width: int, steps: int, first: int, numbered: bool
) -> Any:
    """The sampler callback of ``--show-steps``: a legend, then one stderr line per step and
    answer showing every position (masks and end tokens marked)."""

    from .sampling import render_canvas

    marks = {}
    for attr, mark in (("eos_token_id", "<eos>"), ("eot_token_id", "<eot>")):
        if getattr(tokenizer, attr, None) is not None:
            marks[int(getattr(tokenizer, attr))] = mark

    def callback(step: int, x: Any, confidence: Any) -> None:
        if step == 0 and first == 0:
            print(
                "(_ = still masked, <eos>/<eot> = end of text / of turn: the answer is what "
                "comes before the first of them)",
                file=sys.stderr,
                flush=True,
            )
        for r, canvas in enumerate(render_canvas(tokenizer, x, width, mask_id, "_", marks)):
            tag = f" [{first + r + 1}]" if numbered else ""
            print(f"step {step + 1}/{steps}{tag}: {_one_line(canvas)}", file=sys.stderr, flush=True)

    return callback


def _cmd_loglik(args: argparse.Namespace) -> int:
    import torch

    from .likelihood import score_choices
    from .tokenizer import load_tokenizer

    _set_threads(args)
    model = _load_model(args.model, args.device, args.dtype, args.backend)
    apply_threads(args.threads, model.config.d_model)
    settings = _fill_generation_defaults(args, ("cfg_scale",))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    prompt = torch.tensor(_prompt_ids(tokenizer, args.prompt, args.chat), dtype=torch.long)
    answers = list(args.answer)
    answer_ids = [torch.tensor(tokenizer.encode(a), dtype=torch.long) for a in answers]
    for i, ids in enumerate(answer_ids):
        if ids.numel() == 0:
            raise CLIError(
                "--answer is empty" if len(answers) == 1 else f"--answer number {i + 1} is empty"
            )
    gen = torch.Generator().manual_seed(args.seed)
    # one answer: the same estimate log_likelihood gives with this generator
    scores = score_choices(
        model,
        prompt.to(model.device),
        [ids.to(model.device) for ids in answer_ids],
        mc_num=args.mc_num,
        batch_size=args.batch_size,
        cfg_scale=args.cfg_scale,
        mask_id=settings.get("mask_id"),
        generator=gen,
        normalize=args.normalize,
    )
    scores = [float(v) for v in scores]
    best = max(range(len(scores)), key=lambda i: scores[i])  # the first one on ties
    if args.json:
        print(
            json.dumps(
                [
                    {"answer": a, "loglik": v, "best": i == best}
                    for i, (a, v) in enumerate(zip(answers, scores))
                ]
            )
        )
    elif len(answers) == 1:
        print(f"{scores[0]:.6f}")
    else:
        for i, (a, v) in enumerate(zip(answers, scores)):
            print(f"{v:.6f}\t{_one_line(a)}" + ("\t*" if i == best else ""))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from . import bench
    except ModuleNotFoundError as e:
        if e.name in ("llada_ext.bench", f"{__package__}.bench"):
            print("error: the benchmark module (llada_ext.bench) is not installed", file=sys.stderr)
            return 2
        raise
    rest = list(args.bench_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        return int(bench.main(rest) or 0)
    except SystemExit as e:  # the benchmark's own argparse (--help, usage errors)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_from_args

    return run_demo_from_args(args)


# ------------------------------------------------------------------------------------------
def _check_training_memory(cfg: Any, device: str | None) -> None:
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

    from .model_files import expected_shapes

    params = sum(math.prod(shape) for shape in expected_shapes(cfg).values())
    need = 16 * params
    if need > total:
        raise CLIError(
            f"training this model on the CPU needs at least {need / 2**30:.0f} GiB "
            f"({params / 1e9:.2f}B parameters x 16 bytes for weights, gradients and AdamW), "
            f"but the machine has {total / 2**30:.0f} GiB; use a smaller --preset or "
            "--model-config, or a GPU"
        )


def _oom_message(cpu: bool = False) -> str:
    if cpu:
        return (
            "error: out of CPU memory. Use a smaller model, --batch-size, --seq-len or "
            "--gen-length, or a machine with more memory."
        )
    return (
        "error: CUDA out of memory. Reduce --batch-size or --seq-len (use --grad-accum to keep "
        "the batch), or try --gradient-checkpointing, --precision bf16, or --fsdp with torchrun."
    )


def _show_library_messages(debug: bool) -> None:
    """The library logs (``llada_ext.*`` loggers); the CLI shows those messages on stderr."""
    log = logging.getLogger("llada_ext")
    if not any(getattr(h, "_llada_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._llada_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``llada-ext`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 success, 1 user error, 2 bad usage, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to the benchmark's own parser (argparse would
        # otherwise claim options such as --help or --cpu for itself).
        return _cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # reported by the sub-command's own parser, so its usage is what the user sees
            usage = getattr(args, "usage_parser", parser)
            usage.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("LLADA_DEBUG") == "1"
    _show_library_messages(debug)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        from .training.data import DataError

        try:
            import torch

            cuda_oom = isinstance(e, torch.cuda.OutOfMemoryError) or (
                isinstance(e, RuntimeError) and "CUDA out of memory" in str(e)
            )
        except ImportError:  # pragma: no cover - torch is a dependency
            cuda_oom = False
        if cuda_oom:
            print(_oom_message(), file=sys.stderr)
            return 1
        if isinstance(e, MemoryError) or (
            isinstance(e, RuntimeError)
            and ("can't allocate memory" in str(e) or "out of memory" in str(e))
        ):
            print(_oom_message(cpu=True), file=sys.stderr)
            return 1
        # one line, whatever the message looks like
        msg = " ".join(str(e).split("\n"))
        if isinstance(e, (CLIError, DataError, FileNotFoundError, ValueError, PermissionError)):
            print(f"error: {msg}", file=sys.stderr)
            return 1
        # Anything else is still one line (the traceback is --debug's)
        print(f"error: {type(e).__name__}: {msg[:2000]}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # torchrun -m llada_ext.cli ... / python -m llada_ext.cli
    sys.exit(main())
