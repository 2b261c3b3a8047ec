"""``llada-ext demo``: train the tiny model on a built-in task and evaluate it."""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_debug


def add_parser(sub: Any) -> None:
    """The ``demo`` sub-command."""
    p = sub.add_parser(
        "demo",
        help="train the tiny model on a built-in task for a few minutes and evaluate it",
        description="Trains the tiny byte-level model on the built-in corpus (reverse / copy "
        "letter strings), saves it, samples answers for held-out prompts, prints the "
        "exact-match accuracy and the kernels-vs-torch training throughput.",
    )
    from ..demo import add_demo_arguments

    add_demo_arguments(p)
    add_debug(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``llada-ext demo``."""
    from ..demo import run_demo_from_args

    return run_demo_from_args(args)
