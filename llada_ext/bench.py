"""Backend of ``llada-ext bench``: the end-to-end decoding throughput benchmark.

The benchmark itself lives in the source tree (``benchmarks/throughput.py``, next to the AR
baseline it compares against); this module finds it and forwards the command line to it
unchanged, so ``llada-ext bench --cpu`` and ``python benchmarks/throughput.py --cpu`` are the
same run. Set ``LLADA_BENCHMARKS_DIR`` to use a checkout elsewhere (e.g. with a wheel install).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["main", "find_benchmarks_dir"]

ENV_VAR = "LLADA_BENCHMARKS_DIR"


def find_benchmarks_dir() -> Optional[Path]:
    """The folder holding ``throughput.py``: ``$LLADA_BENCHMARKS_DIR``, else the checkout this
    package was imported from (an editable or in-place build), else None."""
    env = os.environ.get(ENV_VAR)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / "benchmarks")
    for folder in candidates:
        if (folder / "throughput.py").is_file():
            return folder
    return None


def _load_throughput(folder: Path) -> ModuleType:
    # the benchmark scripts import their siblings (bench_common, ar_baseline) by name
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(
        "llada_benchmarks_throughput", folder / "throughput.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {folder / 'throughput.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[list[str]] = None) -> int:
    """Run the throughput benchmark with ``argv`` (the arguments after ``bench``).

    Parameters
    ----------
    argv : list of str, optional
        Options of ``benchmarks/throughput.py`` (``--cpu``, ``--quick``, ``--out DIR``, ...;
        ``--help`` lists them). Default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 if no grid point ran, 2 on a usage error or when the
        benchmark scripts cannot be found.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    folder = find_benchmarks_dir()
    if folder is None:
        print(
            "llada-ext bench: benchmarks/throughput.py was not found. It ships with the "
            "source tree, not the wheel: run from a checkout (pip install -e .) or set "
            f"{ENV_VAR} to the checkout's benchmarks/ folder.",
            file=sys.stderr,
        )
        return 2
    module = _load_throughput(folder)
    try:
        # results go to the user's working folder, not the checkout's tracked results
        out = Path.cwd() / "llada_bench_results"
        return int(module.main(argv, prog="llada-ext bench", default_out=out) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
