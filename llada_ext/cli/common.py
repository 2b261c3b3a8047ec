"""Helpers shared by the sub-commands: the user-error type, threads, model loading, prompts
and the one-line error report of :func:`llada_ext.cli.main`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


class CLIError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def check_threads(args: argparse.Namespace) -> None:
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


def resolve_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(folder: str, device_name: str, dtype_name: str, backend: str) -> Any:
    from ..model import LLaDAModel
    from ..training.distributed import resolve_device

    path = Path(folder)
    if not path.is_dir():
        raise CLIError(f"model folder not found: {folder!r}")
    device = resolve_device(device_name)
    model = LLaDAModel.from_pretrained(
        path, device=device, dtype=resolve_dtype(dtype_name, device), backend=backend
    )
    return model.eval()


def tokenizer_folder(args: argparse.Namespace) -> str:
    """The tokenizer folder of ``sample`` / ``loglik``.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options (``tokenizer``, ``model``).

    Returns
    -------
    str
        --tokenizer, else the --model folder.
    """
    return args.tokenizer or args.model


def load_saved_model(args: argparse.Namespace, settings_names: tuple[str, ...]) -> tuple:
    """The model, tokenizer and generation settings of ``sample`` / ``loglik``.

    Loads --model (with --device, --dtype, --backend), applies --threads, fills the sampler
    settings ``settings_names`` left unset from the folder (:func:`fill_generation_defaults`)
    and loads the tokenizer of :func:`tokenizer_folder`.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of the sub-command.
    settings_names : tuple of str
        Option names whose defaults come from the model folder's generation_config.json.

    Returns
    -------
    tuple
        ``(model, tokenizer, settings)``, settings being the folder's generation settings.
    """
    from ..tokenizer import load_tokenizer

    model = load_model(args.model, args.device, args.dtype, args.backend)
    apply_threads(args.threads, model.config.d_model)
    settings = fill_generation_defaults(args, settings_names)
    return model, load_tokenizer(tokenizer_folder(args)), settings


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    return list(tokenizer.encode(text))


def one_line(text: str) -> str:
    """``text`` with line breaks shown as ``\\n`` / ``\\r`` so that it stays on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def fill_generation_defaults(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """Sampler settings not given on the command line come from the model folder's
    generation_config.json (else the LLaDA defaults); returns the folder's settings."""
    from ..generation_config import read_generation_config

    settings = read_generation_config(args.model)
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, settings[name])
    return settings


def oom_message(cpu: bool = False) -> str:
    if cpu:
        return (
            "error: out of CPU memory. Use a smaller model, --batch-size, --seq-len or "
            "--gen-length, or a machine with more memory."
        )
    return (
        "error: CUDA out of memory. Reduce --batch-size or --seq-len (use --grad-accum to keep "
        "the batch), or try --gradient-checkpointing, --precision bf16, or --fsdp with torchrun."
    )


def show_library_messages(debug: bool) -> None:
    """The library logs (``llada_ext.*`` loggers); the CLI shows those messages on stderr."""
    log = logging.getLogger("llada_ext")
    if not any(getattr(h, "_llada_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._llada_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)


def report_error(e: Exception) -> int:
    """Prints ``e`` as one line on stderr (out-of-memory errors with advice); returns 1."""
    from ..training.data import DataError

    try:
        import torch

        cuda_oom = isinstance(e, torch.cuda.OutOfMemoryError) or (
            isinstance(e, RuntimeError) and "CUDA out of memory" in str(e)
        )
    except ImportError:  # pragma: no cover - torch is a dependency
        cuda_oom = False
    if cuda_oom:
        print(oom_message(), file=sys.stderr)
        return 1
    if isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError)
        and ("can't allocate memory" in str(e) or "out of memory" in str(e))
    ):
        print(oom_message(cpu=True), file=sys.stderr)
        return 1
    # one line, whatever the message looks like
    msg = " ".join(str(e).split("\n"))
    if isinstance(e, (CLIError, DataError, FileNotFoundError, ValueError, PermissionError)):
        print(f"error: {msg}", file=sys.stderr)
        return 1
    # Anything else is still one line (the traceback is --debug's)
    print(f"error: {type(e).__name__}: {msg[:2000]}", file=sys.stderr)
    return 1
