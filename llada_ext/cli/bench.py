"""``llada-ext bench``: the throughput benchmarks (their options are passed on)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

_LIBRARY = __name__.rsplit(".", 2)[0]  # the package holding the benchmark module


def add_parser(sub: Any) -> None:
    """The ``bench`` sub-command."""
    p = sub.add_parser(
        "bench",
        help="run the throughput benchmarks (options are passed on; see `bench --help`)",
        add_help=False,
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``llada-ext bench``: the arguments go to :func:`llada_ext.bench.main`."""
    try:
        from .. import bench
    except ModuleNotFoundError as e:
        if e.name in ("llada_ext.bench", f"{_LIBRARY}.bench"):
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
