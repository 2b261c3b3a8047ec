"""Option groups shared by several sub-commands, each defined once, and the data sources of
``train``, ``sft`` and ``prepare``."""

from __future__ import annotations

import argparse
from typing import Any

# Longest sequence the CLI accepts (--seq-len, prompt + --gen-length): far beyond any LLaDA
# model, small enough that the size is refused before anything is allocated.
MAX_TOKENS = 1 << 20


def add_model_folder(p: argparse.ArgumentParser) -> None:
    """Add --model, the saved model folder of ``sample`` and ``loglik``.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The sub-command's parser.
    """
    p.add_argument("--model", required=True, metavar="FOLDER", help="saved model folder")


def add_model_loading(p: argparse.ArgumentParser) -> None:
    """Options of the sub-commands that load a saved model folder."""
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype: 'auto' = bfloat16 on CUDA, float32 on CPU (default: %(default)s)",
    )
    p.add_argument("--tokenizer", metavar="FOLDER", help="tokenizer folder (default: --model)")


def add_debug(p: Any) -> None:
    """--debug: full tracebacks instead of one-line errors."""
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def add_common_runtime(p: argparse.ArgumentParser) -> None:
    """--device, --backend, --seed, --threads and --debug."""
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
    add_debug(p)


def add_data_sources(d: Any, *, data_help: str, formats: tuple[str, ...]) -> None:
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


def data_records(args: argparse.Namespace) -> Any:
    """The records of --data and --hf-dataset, read lazily (train, sft, prepare)."""
    from ..training import load_hf_records, read_records

    if args.data:
        yield from read_records(args.data, fmt=args.data_format)
    if args.hf_dataset:
        yield from load_hf_records(
            args.hf_dataset, config=args.hf_config, split=args.hf_split, limit=args.hf_limit
        )
