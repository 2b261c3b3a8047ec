"""``llada-ext loglik``: estimate log p(answer | prompt), or rank several answers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import CLIError, check_threads, load_saved_model, one_line, prompt_ids
from .options import add_common_runtime, add_model_folder, add_model_loading


def add_parser(sub: Any) -> None:
    """The ``loglik`` sub-command."""
    p = sub.add_parser(
        "loglik",
        help="estimate log p(answer | prompt), or rank several answers",
        description="Monte Carlo estimate of the conditional log-likelihood (Alg. 3). With one "
        "--answer, prints the estimate; with several, prints '<loglik> TAB <answer>' per "
        "answer and a TAB '*' after the most likely one.",
    )
    add_model_folder(p)
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
    add_model_loading(p)
    add_common_runtime(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``llada-ext loglik``."""
    import torch

    from ..likelihood import score_choices

    check_threads(args)
    model, tokenizer, settings = load_saved_model(args, ("cfg_scale",))
    prompt = torch.tensor(prompt_ids(tokenizer, args.prompt, args.chat), dtype=torch.long)
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
            print(f"{v:.6f}\t{one_line(a)}" + ("\t*" if i == best else ""))
    return 0
