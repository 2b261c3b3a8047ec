"""``llada-ext sample``: generate answers for prompts with the reverse process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import (
    CLIError,
    check_threads,
    load_saved_model,
    one_line,
    prompt_ids,
    tokenizer_folder,
)
from .options import add_common_runtime, add_model_folder, add_model_loading


def _add_prompt_options(p: argparse.ArgumentParser) -> None:
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


def _add_generation_settings(p: argparse.ArgumentParser) -> None:
    """The sampler settings whose defaults come from the model folder, batching, --show-steps."""
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


def _add_speed_options(p: argparse.ArgumentParser) -> None:
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


def _add_eos_options(p: argparse.ArgumentParser) -> None:
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


def add_parser(sub: Any) -> None:
    """The ``sample`` sub-command."""
    p = sub.add_parser(
        "sample",
        help="generate answers for prompts",
        description="Load a saved model folder and generate an answer for each prompt with "
        "the reverse process (low-confidence remasking, semi-autoregressive blocks). Prompts "
        "come from --prompt, --prompt-file, or standard input (one per line) when neither is "
        "given. With the default options the output is that of the public LLaDA sampler; the "
        "options under 'speed' trade exactness for speed.",
    )
    add_model_folder(p)
    _add_prompt_options(p)
    _add_generation_settings(p)
    _add_speed_options(p)
    _add_eos_options(p)
    add_model_loading(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='print JSON lines {"prompt": ..., "answer": ...} (answers are always cut at the '
        "first EOS / end-of-turn token)",
    )
    add_common_runtime(p)
    p.set_defaults(func=run)


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
    from ..tokenizer import ByteTokenizer

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


def _steps_printer(
    tokenizer: Any, mask_id: int, width: int, steps: int, first: int, numbered: bool
) -> Any:
    """The sampler callback of ``--show-steps``: a legend, then one stderr line per step and
    answer showing every position (masks and end tokens marked)."""

    from ..sampling import render_canvas

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
            print(f"step {step + 1}/{steps}{tag}: {one_line(canvas)}", file=sys.stderr, flush=True)

    return callback


def _end_token_options(options: dict[str, Any], tokenizer: Any, model: Any) -> None:
    """Adds to ``options`` the EOS / end-of-turn ids and the CUDA graph recorder they need."""
    if any(options.get(k) for k in ("eos_early_stop", "forbid_eos", "zero_eos_confidence")):
        # the ids that decoding cuts at, so that sampler and decoding agree
        options["eos_id"] = int(tokenizer.eos_token_id)
        eot = getattr(tokenizer, "eot_token_id", None)
        if eot is not None:
            options["eot_id"] = int(eot)
    if options.get("cuda_graphs"):
        if model.device.type != "cuda":
            raise CLIError(
                f"--cuda-graphs needs a CUDA device, but the model is on {model.device.type}; "
                "pass --device cuda on a machine with a GPU"
            )
        from ..sampling import SamplerGraphs

        # one recording for all batches: batches of the same shape replay it
        options["cuda_graphs"] = SamplerGraphs()


def _sample_batches(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    encoded: list[list[int]],
    options: dict[str, Any],
    mask_id: int,
    chat: bool,
) -> None:
    """Samples ``encoded`` --batch-size prompts at a time and prints each answer."""
    import torch

    from ..sampling import decode_answers, generate, left_pad

    pad_id = int(tokenizer.eos_token_id)
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


def run(args: argparse.Namespace) -> int:
    """``llada-ext sample``."""
    check_threads(args)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = _sampler_options(args)  # checked before the (possibly slow) model load
    prompts = _collect_prompts(args)
    model, tokenizer, settings = load_saved_model(
        args, ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "remasking")
    )
    _end_token_options(options, tokenizer, model)
    chat = _chat_enabled(args.chat, tokenizer, tokenizer_folder(args))
    from ..model import config_token_id

    mask_id = config_token_id(
        model.config, "mask_token_id", settings.get("mask_id"), "mask_id", "sampling"
    )
    encoded = [prompt_ids(tokenizer, text, chat) for text in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise CLIError(f"prompt number {i + 1} is empty")
    _sample_batches(args, model, tokenizer, prompts, encoded, options, mask_id, chat)
    return 0
