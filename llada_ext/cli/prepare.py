"""``llada-ext prepare``: tokenize training data once into memory-mapped token shards."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .common import CLIError
from .options import add_data_sources, add_debug, data_records


def _add_data_group(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    add_data_sources(
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


def _add_output_group(p: argparse.ArgumentParser) -> None:
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


def add_parser(sub: Any) -> None:
    """The ``prepare`` sub-command."""
    p = sub.add_parser(
        "prepare",
        help="tokenize training data once into memory-mapped token shards",
        description="Tokenize text / JSONL / a Hugging Face dataset (the inputs of `train`, or "
        "of `sft` with --sft) into uint16/uint32 token shards with an index, a manifest and "
        "SHA-256 checksums, in parallel, written atomically to --out. Then pass the folder to "
        "`llada-ext train --data FOLDER` (or `sft`): the shards are read through memory maps "
        "and give the same batches as the original files, for any --seq-len.",
    )
    _add_data_group(p)
    _add_output_group(p)
    add_debug(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``llada-ext prepare``."""
    import shlex

    from ..training.prepare import prepare_shards

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
        data_records(args),
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
