"""The ``llada-ext`` parser with all sub-commands, and :func:`main`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import bench, demo, loglik, prepare, sample, train
from .common import report_error, show_library_messages


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
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parsers(sub)
    prepare.add_parser(sub)
    sample.add_parser(sub)
    loglik.add_parser(sub)
    bench.add_parser(sub)
    demo.add_parser(sub)
    from ..training.cli_support import add_export_parser

    add_export_parser(sub)
    for sp in sub.choices.values():  # errors after parsing are reported with this usage
        sp.set_defaults(usage_parser=sp)
    return parser


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
        return bench.run(argparse.Namespace(bench_args=argv[1:]))
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
    show_library_messages(debug)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        return report_error(e)
