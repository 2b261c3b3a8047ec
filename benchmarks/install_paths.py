"""CPU attention speed after each way of installing llada_ext, side by side.

The kernel library is built by CMake whichever way pip drives setup.py, and its CPU attention
finds OpenBLAS at run time, so every install path should run the same code at the same speed.
This script checks that. For each install path it

1. copies the checkout (tracked and untracked, not ignored, files: no build folder, no
   in-place modules) into a fresh folder under the temporary directory,
2. creates a virtual environment there with ``python -m venv --system-site-packages`` (as
   ``scripts/setup.sh`` does). torch is reused, never downloaded: from the system
   site-packages when it is there, else through a ``.pth`` file pointing at links to the torch
   (and its dependencies) of the interpreter running this script,
3. installs the copy that way, CPU-only (``LLADA_CUDA=0``, and ``LLADA_EMU=0``: the CPU
   executor of the CUDA kernels plays no part in CPU attention),
4. times, in that environment, ``lx.attention`` forward against
   ``torch.nn.functional.scaled_dot_product_attention`` (B=1, H=8, S=1024, D=64, float32; SDPA
   on its native [B, H, S, D] layout), on one thread and on the default thread count, with the
   two alternating (lx, SDPA, SDPA, lx, ...) so that a busy machine slows both alike, and
   reads ``llada_ext.build_info()``.

Install paths (``--paths``):

- ``pip``: ``pip install .`` (build isolation: pip installs the build requirements of
  pyproject.toml in a throw-away environment).
- ``nbi-deps-before``: the build requirements (setuptools, wheel, pybind11, cmake, ninja) and
  the runtime dependencies, scipy-openblas32 included, first; then
  ``pip install --no-build-isolation .``.
- ``nbi-deps-after``: the build requirements only, then
  ``pip install --no-build-isolation --no-deps .``, then the runtime dependencies
  (scipy-openblas32 installed after the build).
- ``editable``: ``pip install -e .``.
- ``setup.sh``: ``LLADA_VENV=<venv> bash scripts/setup.sh`` (the project's own set-up).
- ``current``: no install; the interpreter running this script, as it is (not in the
  default list).

Modules: ``install_envs.py`` (the copy, the environments, the logged commands),
``install_report.py`` (the tables); the timing is ``bench_common.time_interleaved``.

Each figure is the median over ``--repeats`` alternating pairs; "lx/SDPA speed" is
SDPA time / lx time of each pair (above 1: lx is faster), reported with its interquartile
range and its minimum and maximum. A path that fails is a row of the table naming the step
and the end of its log, not a crash (the exit status is then 1). The table is printed and
written as markdown (and JSON) to ``--out``.

Usage::

    python benchmarks/install_paths.py                        # every path, ~15-30 min on 2 cores
    python benchmarks/install_paths.py --paths pip,editable --keep
    python benchmarks/install_paths.py --out benchmarks/results/install-paths-cpu.md
    python benchmarks/install_paths.py --measure-only         # the timing, this environment only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# the measurement runs this file in each new environment with ``python -I`` (no script folder
# on sys.path): its sibling modules are found through this line
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    cpu_name,
    git_commit,
    paired_speedups,
    spread_stats,
    time_interleaved,
)
from install_envs import (  # noqa: E402
    BUILD_ENV,
    ROOT,
    clean_env,
    copy_source,
    failure_reason,
    loadavg,
    project_deps,
    run_logged,
    torch_layer,
)
from install_report import (  # noqa: E402, F401 - re-exported: the tests and users call them
    TABLE_COLUMNS,
    noise_verdicts,
    render_markdown,
    table_rows,
)

THIS = Path(__file__).resolve()
DEFAULT_OUT = Path("llada_bench_results")
RESULT_NAME = "install-paths-cpu.md"
ALL_PATHS = ["pip", "nbi-deps-before", "nbi-deps-after", "editable", "setup.sh"]
EXTRA_PATHS = ["current"]

# =========================================================================================
# the measurement (runs inside each environment: torch, llada_ext and bench_common only)
# =========================================================================================


def measure(
    *,
    batch: int = 1,
    heads: int = 8,
    seq: int = 1024,
    dim: int = 64,
    repeats: int = 25,
    warmup: int = 3,
    threads: Optional[int] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``lx.attention`` forward against SDPA in this process, alternating the two.

    Parameters
    ----------
    batch, heads, seq, dim : int
        Shape: q, k, v float32 ``[batch, seq, heads, dim]`` for lx.attention; the same values
        as contiguous ``[batch, heads, seq, dim]`` tensors for SDPA (its native layout).
    repeats : int
        Timed pairs. Pair ``r`` runs lx then SDPA for even ``r``, SDPA then lx for odd ``r``
        (:func:`bench_common.time_interleaved`).
    warmup : int
        Untimed calls of each first.
    threads : int or None
        ``torch.set_num_threads(threads)`` when given (llada_ext's OpenMP runtime follows the
        ``OMP_NUM_THREADS`` of the process; the caller sets both).

    Returns
    -------
    dict
        ``lx_ms`` and ``sdpa_ms`` (median, q1, q3, min, max, n over the pairs, milliseconds),
        ``ratio`` (the same statistics of SDPA time / lx time per pair: above 1, lx is
        faster), ``max_abs_diff`` (lx output vs SDPA output), ``build_info``
        (``llada_ext.build_info()``), ``module`` (where llada_ext was imported from),
        ``torch_threads``, ``omp_num_threads``, ``torch``, ``shape``, ``repeats``.
    """
    import torch
    import torch.nn.functional as F

    import llada_ext as lx

    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    fns = {
        "lx": lambda: lx.attention(q, k, v),
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt),
    }
    with torch.no_grad():
        diff = float((fns["lx"]().transpose(1, 2) - fns["sdpa"]()).abs().max())
        res = time_interleaved(fns, torch.device("cpu"), repeats, warmup=warmup)
    if res.errors:
        name, err = next(iter(res.errors.items()))
        raise RuntimeError(f"{name} failed while timed") from err
    t_lx, t_sdpa = res.times["lx"], res.times["sdpa"]
    return {
        "shape": {"B": batch, "H": heads, "S": seq, "D": dim, "dtype": "float32"},
        "repeats": repeats,
        "lx_ms": spread_stats([1e3 * t for t in t_lx]),
        "sdpa_ms": spread_stats([1e3 * t for t in t_sdpa]),
        "ratio": spread_stats(paired_speedups(t_sdpa, t_lx)),
        "max_abs_diff": diff,
        "build_info": lx.build_info(),
        "module": str(Path(lx.__file__).resolve().parent),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
    }


# =========================================================================================
# install paths
# =========================================================================================


@dataclass
class Step:
    """One command of an install path."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Ctx:
    """What the steps of one install path work with."""

    src: Path
    venv: Path
    python: str
    build_deps: list[str]
    runtime_deps: list[str]


@dataclass
class InstallPath:
    name: str
    commands: str  # as a user types them, for the report
    steps: Callable[[Ctx], list[Step]]
    uses_venv: bool = True


def _pip(ctx: Ctx, *args: str) -> list[str]:
    return [ctx.python, "-m", "pip", "install", "--disable-pip-version-check", *args]


PATHS: dict[str, InstallPath] = {
    p.name: p
    for p in [
        InstallPath("pip", "pip install .", lambda c: [Step("install", _pip(c, str(c.src)))]),
        InstallPath(
            "nbi-deps-before",
            "pip install <build deps> <deps incl. scipy-openblas32>; "
            "pip install --no-build-isolation .",
            lambda c: [
                Step("deps", _pip(c, *c.build_deps, *c.runtime_deps)),
                Step("install", _pip(c, "--no-build-isolation", str(c.src))),
            ],
        ),
        InstallPath(
            "nbi-deps-after",
            "pip install <build deps>; pip install --no-build-isolation --no-deps .; "
            "pip install <deps incl. scipy-openblas32>",
            lambda c: [
                Step("build deps", _pip(c, *c.build_deps)),
                Step("install", _pip(c, "--no-build-isolation", "--no-deps", str(c.src))),
                Step("deps", _pip(c, *c.runtime_deps)),
            ],
        ),
        InstallPath(
            "editable", "pip install -e .", lambda c: [Step("install", _pip(c, "-e", str(c.src)))]
        ),
        InstallPath(
            "setup.sh",
            "LLADA_VENV=<venv> bash scripts/setup.sh",
            lambda c: [
                Step(
                    "setup.sh",
                    ["bash", str(c.src / "scripts" / "setup.sh")],
                    {"LLADA_VENV": str(c.venv), "PYTHON": c.python},
                )
            ],
        ),
        InstallPath("current", "(none: this interpreter as it is)", lambda c: [], False),
    ]
}


def _threads_label(t: Optional[int]) -> str:
    return "default" if t is None else str(t)


class StepFailed(Exception):
    """A step of an install path failed: its name and the end of its log."""

    def __init__(self, step: str, lines: list[str]) -> None:
        super().__init__(step)
        self.step, self.lines = step, lines


def _make_venv(pdir: Path, run_dir: Path, log: Path, rec: dict[str, Any]) -> tuple[str, dict]:
    """A new environment in ``pdir/venv`` that imports torch; (python, environment)."""
    venv = pdir / "venv"
    rc, secs, tail = run_logged(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        clean_env(None),
        pdir,
        log,
        600,
    )
    rec["steps"].append({"name": "venv", "seconds": secs, "rc": rc})
    if rc != 0:
        raise StepFailed("venv", tail)
    python = str(venv / "bin" / "python")
    env = clean_env(venv)
    probe = [python, "-I", "-c", "import torch; print(torch.__version__)"]
    if subprocess.run(probe, env=env, cwd=pdir, capture_output=True).returncode != 0:
        layer = torch_layer(run_dir / "torch-layer")
        (site,) = venv.glob("lib/python*/site-packages")
        (site / "zz_llada_bench_torch.pth").write_text(str(layer) + "\n")
        rec["torch_from"] = f"links to {sys.prefix}'s torch"
    else:
        rec["torch_from"] = "the system site-packages"
    rc, secs, tail = run_logged(probe, env, pdir, log, 600)
    if rc != 0:
        raise StepFailed("torch", tail)
    return python, env


def _measure_in(
    spec: InstallPath, python: str, env: dict, pdir: Path, log: Path, rec: dict, **kw: Any
) -> None:
    """Run the measurement in the path's environment, once per thread setting."""
    for t in kw["threads"]:
        label = _threads_label(t)
        out = pdir / f"measure-{label}.json"
        # -I: a new environment sees only what was installed into it
        isolate = ["-I"] if spec.uses_venv else []
        argv = [python, *isolate, str(THIS), "--measure-only", "--json-out", str(out)]
        argv += ["--repeats", str(kw["repeats"]), "--threads", label]
        argv += [f"--{k}={v}" for k, v in kw["size"].items()]
        menv = dict(env)
        menv.pop("OMP_NUM_THREADS", None)
        if t is not None:
            menv["OMP_NUM_THREADS"] = str(t)
        kw["echo"](f"[{spec.name}] measuring, threads={label}")
        rec.setdefault("loadavg", {})[label] = loadavg()
        rc, secs, tail = run_logged(argv, menv, pdir, log, kw["step_timeout"])
        if rc != 0 or not out.exists():
            raise StepFailed(f"measure (threads={label})", tail)
        m = json.loads(out.read_text())
        rec["measurements"][label] = m
        rec.setdefault("build_info", m["build_info"])
        rec.setdefault("module", m["module"])


def _install(spec: InstallPath, ctx: Ctx, env: dict, pdir: Path, log: Path, rec: dict, **kw: Any):
    """Run the path's install steps (CPU-only build, the checkout's commit named)."""
    step_env = {**env, **BUILD_ENV, "LLADA_JOBS": str(os.cpu_count() or 1)}
    if kw["commit"] and kw["commit"] != "unknown":
        # the copy has no git metadata; the build names the checkout's commit this way
        step_env["LLADA_GIT_COMMIT"] = kw["commit"]
    for step in spec.steps(ctx):
        kw["echo"](f"[{spec.name}] {step.name}: {' '.join(step.argv)}")
        rc, secs, tail = run_logged(
            step.argv, {**step_env, **step.env}, pdir, log, kw["step_timeout"]
        )
        rec["steps"].append({"name": step.name, "seconds": secs, "rc": rc})
        if rc != 0:
            raise StepFailed(step.name, tail)
    rec["install_seconds"] = sum(
        s["seconds"] for s in rec["steps"] if s["name"] not in ("copy", "venv")
    )


def run_path(
    spec: InstallPath,
    run_dir: Path,
    *,
    threads: list[Optional[int]],
    size: dict[str, int],
    repeats: int,
    keep: bool,
    commit: str,
    step_timeout: float = 3600.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Install the checkout the ``spec`` way in a new environment and measure there.

    Never raises: a failing step (or anything unexpected) is recorded in the returned
    dict's ``status`` ("ok" or "failed"), ``failed_step`` and ``error`` (the end of the log).
    """
    rec: dict[str, Any] = {"path": spec.name, "commands": spec.commands, "status": "ok"}
    rec.update(steps=[], measurements={}, warnings=[])
    pdir = run_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)
    log = pdir / "install.log"
    rec["log"] = str(log)
    kw = dict(threads=threads, size=size, repeats=repeats, commit=commit, echo=echo)
    kw["step_timeout"] = step_timeout
    try:
        pdir.mkdir(parents=True, exist_ok=True)
        if spec.uses_venv:
            src = pdir / "src"
            t0 = time.perf_counter()
            n = copy_source(ROOT, src)
            rec["steps"].append({"name": "copy", "seconds": time.perf_counter() - t0, "files": n})
            python, env = _make_venv(pdir, run_dir, log, rec)
        else:
            # as it is: its environment variables (PYTHONPATH included) and PATH
            src, python, env = ROOT, sys.executable, dict(os.environ)
            rec["torch_from"] = "this interpreter"
        ctx = Ctx(src, pdir / "venv", python, *project_deps(ROOT))
        _install(spec, ctx, env, pdir, log, rec, **kw)
        _measure_in(spec, python, env, pdir, log, rec, **kw)
        if spec.uses_venv and not rec.get("module", "").startswith(str(pdir.resolve())):
            rec["warnings"].append(f"llada_ext was imported from {rec.get('module')}")
    except StepFailed as e:
        _fail(rec, e.step, e.lines, echo)
    except Exception:  # noqa: BLE001 - one path's trouble is a row of the table
        _fail(rec, "internal", traceback.format_exc().splitlines(), echo)
    finally:
        if not keep:
            shutil.rmtree(pdir, ignore_errors=True)
    return rec


def _fail(rec: dict[str, Any], step: str, lines: list[str], echo: Callable[[str], None]) -> None:
    rec["status"] = "failed"
    rec["failed_step"] = step
    rec["error"] = "\n".join(lines[-25:])
    rec["reason"] = failure_reason(lines)
    echo(f"[{rec['path']}] FAILED at {step}: {rec['reason']}")


# =========================================================================================
# result files and command line
# =========================================================================================


def _metadata(size: dict[str, int], repeats: int) -> dict[str, Any]:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not importable"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "machine": f"{cpu_name()} ({cores} cores)",
        "host": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch_version,
        "size": size,
        "repeats": repeats,
        "env": {k: v for k, v in os.environ.items() if k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "loadavg_start": loadavg(),
    }


def output_paths(out: Path) -> tuple[Path, Path]:
    """(markdown, json) for ``--out``: a ``.md`` file, or a folder to put the default name in."""
    md = out if out.suffix == ".md" else out / RESULT_NAME
    return md, md.with_suffix(".json")


def _parse_threads(text: str) -> list[Optional[int]]:
    out: list[Optional[int]] = []
    for part in text.split(","):
        part = part.strip()
        if part == "default":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"thread setting {part!r}: a count > 0 or 'default'")
    return out


def _parse_paths(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [n for n in names if n not in PATHS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown install path(s) {bad}; choose from {', '.join(ALL_PATHS + EXTRA_PATHS)}"
        )
    return names


DESCRIPTION = (
    "Install the checkout in a new virtual environment per install path (CPU-only "
    "build) and time lx.attention forward against torch SDPA in each, side by side."
)
EPILOG = (
    "install paths: pip (pip install .), nbi-deps-before (build deps + runtime deps, "
    "then pip install --no-build-isolation .), nbi-deps-after (build deps, pip install "
    "--no-build-isolation --no-deps ., then the runtime deps), editable (pip install "
    "-e .), setup.sh (scripts/setup.sh), current (no install: this interpreter). "
    "Needs the package index pip is configured with; torch is reused, not downloaded."
)


def _add_run_options(ap: argparse.ArgumentParser) -> None:
    """Which paths, and where the results and the environments go."""
    ap.add_argument(
        "--paths",
        type=_parse_paths,
        default=list(ALL_PATHS),
        help=f"comma-separated install paths (default: {','.join(ALL_PATHS)})",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"a .md file, or a folder for {RESULT_NAME} (default: ./{DEFAULT_OUT}/); a .json "
        "with every figure is written beside it",
    )
    ap.add_argument("--keep", action="store_true", help="keep the environments and their logs")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the environments are made (default: the system's temporary directory)",
    )


def _add_measure_options(ap: argparse.ArgumentParser) -> None:
    """The measurement: thread settings, pairs, the attention shape, the time allowed to
    each command, --measure-only."""
    ap.add_argument(
        "--threads",
        type=_parse_threads,
        default=[1, None],
        help="comma-separated thread settings, counts or 'default' (default: 1,default)",
    )
    ap.add_argument(
        "--repeats", type=int, default=25, help="timed lx/SDPA pairs per setting (default 25)"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument(
        "--step-timeout",
        type=float,
        default=3600.0,
        help="seconds allowed to one install command or measurement (default 3600)",
    )
    ap.add_argument(
        "--measure-only",
        action="store_true",
        help="only time this interpreter's llada_ext (with the first --threads setting) and "
        "print the result as JSON",
    )
    ap.add_argument("--json-out", type=Path, help="with --measure-only: write the JSON here")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    ap = argparse.ArgumentParser(prog="install_paths.py", description=DESCRIPTION, epilog=EPILOG)
    _add_run_options(ap)
    _add_measure_options(ap)
    return ap


def _measure_only(args: argparse.Namespace, size: dict[str, int]) -> int:
    result = measure(**size, repeats=args.repeats, threads=args.threads[0])
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    else:
        print(text)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    size = {"batch": args.batch, "heads": args.heads, "seq": args.seq, "dim": args.dim}
    if args.measure_only:
        return _measure_only(args, size)
    meta = _metadata(size, args.repeats)
    md_path, json_path = output_paths(args.out)
    run_dir = Path(tempfile.mkdtemp(prefix="llada-install-paths-", dir=args.workdir))
    print(f"working in {run_dir}", flush=True)
    records = []
    try:
        for name in args.paths:
            t0 = time.perf_counter()
            rec = run_path(
                PATHS[name],
                run_dir,
                threads=args.threads,
                size=size,
                repeats=args.repeats,
                keep=args.keep,
                commit=meta["commit"],
                step_timeout=args.step_timeout,
                echo=lambda s: print(s, flush=True),
            )
            rec["wall_seconds"] = time.perf_counter() - t0
            records.append(rec)
            print(f"[{name}] {rec['status']} in {rec['wall_seconds']:.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    meta["loadavg_end"] = loadavg()
    text = render_markdown(meta, records)
    print("\n" + text)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    data = {"meta": meta, "records": records, "verdicts": noise_verdicts(records)}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    kept = f"; environments kept in {run_dir}" if args.keep else ""
    print(f"wrote {md_path} and {json_path}{kept}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
