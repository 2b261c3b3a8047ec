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
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
DEFAULT_OUT = Path("llada_bench_results")
RESULT_NAME = "install-paths-cpu.md"
ALL_PATHS = ["pip", "nbi-deps-before", "nbi-deps-after", "editable", "setup.sh"]
EXTRA_PATHS = ["current"]
# Build requirements a --no-build-isolation user installs first; pyproject.toml's list wins when
# it can be read (less scipy-openblas32, which the "before/after" paths place themselves).
FALLBACK_BUILD_DEPS = ["setuptools>=64", "wheel", "pybind11>=2.12", "cmake>=3.18", "ninja"]
FALLBACK_RUNTIME_DEPS = ["numpy", "safetensors", "tokenizers", "tqdm", "scipy-openblas32"]
# Never linked into a new environment with torch: the build tools and the BLAS wheel, whose
# presence is what the paths differ in. (setuptools is linked when torch requires it, as
# torch 2.13 does: an environment that installs torch gets it the same way.)
NOT_SHARED = {"pip", "wheel", "pybind11", "cmake", "ninja", "scipy-openblas32"}
BUILD_ENV = {"LLADA_CUDA": "0", "LLADA_EMU": "0"}

# =========================================================================================
# the measurement (runs inside each environment: standard library, torch and llada_ext only)
# =========================================================================================


def _stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": values[0],
        "max": values[-1],
    }


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
        Timed pairs. Pair ``r`` runs lx then SDPA for even ``r``, SDPA then lx for odd ``r``.
    warmup : int
        Untimed calls of each first.
    threads : int or None
        ``torch.set_num_threads(threads)`` when given (llada_ext's OpenMP runtime follows the
        ``OMP_NUM_THREADS`` of the process; the caller sets both).

    Returns
    -------
    dict
        ``lx_ms`` and ``sdpa_ms`` (median, q1, q3, min, max over the pairs, milliseconds),
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

    def run_lx() -> Any:
        return lx.attention(q, k, v)

    def run_sdpa() -> Any:
        return F.scaled_dot_product_attention(qt, kt, vt)

    with torch.no_grad():
        diff = float((run_lx().transpose(1, 2) - run_sdpa()).abs().max())
        for _ in range(warmup):
            run_lx()
            run_sdpa()
        t_lx: list[float] = []
        t_sdpa: list[float] = []
        for r in range(repeats):
            order = ((run_lx, t_lx), (run_sdpa, t_sdpa))
            for fn, sink in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - t0)
    return {
        "shape": {"B": batch, "H": heads, "S": seq, "D": dim, "dtype": "float32"},
        "repeats": repeats,
        "lx_ms": _stats([1e3 * t for t in t_lx]),
        "sdpa_ms": _stats([1e3 * t for t in t_sdpa]),
        "ratio": _stats([s / x for x, s in zip(t_lx, t_sdpa)]),
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


def project_deps(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(build requirements less scipy-openblas32, runtime dependencies less torch)."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - older Pythons
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return FALLBACK_BUILD_DEPS, FALLBACK_RUNTIME_DEPS
    try:
        data = tomllib.loads((root / "pyproject.toml").read_text())
        build = list(data["build-system"]["requires"])
        runtime = list(data["project"]["dependencies"])
    except (OSError, KeyError, ValueError):
        return FALLBACK_BUILD_DEPS, FALLBACK_RUNTIME_DEPS

    def name(req: str) -> str:
        return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")

    build = [r for r in build if name(r) != "scipy-openblas32"]
    runtime = [r for r in runtime if name(r) != "torch"]
    return build, runtime


def copy_source(root: Path, dst: Path) -> int:
    """Copy the files of the checkout that git tracks or would track (no build outputs).

    Falls back to a copy of the folder less the usual build outputs when ``root`` is not a
    git checkout. Returns the number of files copied.
    """
    files: Optional[list[str]] = None
    if shutil.which("git"):
        proc = subprocess.run(
            ["git", "--no-optional-locks", "ls-files", "-z", "--cached", "--others"]
            + ["--exclude-standard"],
            cwd=root,
            capture_output=True,
        )
        if proc.returncode == 0:
            files = [f for f in proc.stdout.decode().split("\0") if f]
    if files is None:
        ignore = shutil.ignore_patterns(
            ".git", "build", ".venv", "*.egg-info", "__pycache__", "*.so", "*.so.*", "runs"
        )
        shutil.copytree(root, dst, ignore=ignore, symlinks=True)
        return sum(1 for p in dst.rglob("*") if p.is_file())
    n = 0
    for rel in files:
        src = root / rel
        if not (src.is_file() or src.is_symlink()):  # deleted in the working tree
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
        n += 1
    return n


def _requirement_names(dist: Any) -> list[str]:
    """Names of the requirements of ``dist`` that apply here (extras left out)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover
        from pip._vendor.packaging.requirements import Requirement  # type: ignore
    names = []
    for text in dist.requires or []:
        try:
            req = Requirement(text)
        except Exception:  # noqa: BLE001 - an unparsable line is skipped
            continue
        if req.marker is not None:
            try:
                if not req.marker.evaluate({"extra": ""}):
                    continue
            except Exception:  # noqa: BLE001
                continue
        names.append(req.name)
    return names


def torch_layer(folder: Path) -> Path:
    """Links to the torch of this interpreter and to what it needs, in ``folder``.

    A ``.pth`` file naming ``folder`` makes them importable in a new environment (listed
    after its own site-packages, so what the environment installs itself wins), without a
    copy and without the build tools or BLAS wheel of this environment.
    """
    import importlib.metadata as md

    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen or name in NOT_SHARED:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        todo.extend(_requirement_names(dist))
        base = Path(str(dist.locate_file(""))).resolve()
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            src, dst = base / top, folder / top
            if (src.exists() or src.is_symlink()) and not dst.exists():
                dst.symlink_to(src)
    return folder


def _clean_env(venv: Optional[Path]) -> dict[str, str]:
    """The environment of an activated ``venv`` (this interpreter's venv off PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    path = env.get("PATH", "").split(os.pathsep)
    if sys.prefix != sys.base_prefix:
        own = str(Path(sys.prefix) / "bin")
        path = [p for p in path if p and str(Path(p)) != own]
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run_logged(argv: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float):
    """Run ``argv`` appending its output to ``log``; (returncode, seconds, last lines)."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n")
        fh.flush()
        try:
            rc = subprocess.run(
                argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            fh.write(f"\n[timed out after {timeout:.0f} s]\n")
        except OSError as e:
            rc = 127
            fh.write(f"\n[could not run: {e}]\n")
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, time.perf_counter() - t0, lines[-25:]


# pip's own closing lines, which name no cause
_BOILERPLATE = re.compile(
    r"^\s*(note:|hint:|╰─>|×|\[end of output\]|error: (metadata-generation-failed|"
    r"subprocess-exited-with-error))"
)


def failure_reason(lines: list[str]) -> str:
    """The line of a failed command's output that most likely names the cause: the last line
    mentioning an error that is not pip's closing boilerplate, else the last line."""
    for ln in reversed(lines):
        if not _BOILERPLATE.match(ln) and re.search(r"error|exception|fatal", ln, re.I):
            return ln.strip()
    return lines[-1].strip() if lines else ""


def _loadavg() -> Optional[list[float]]:
    """The 1/5/15-minute load averages: how busy the machine was around a measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _threads_label(t: Optional[int]) -> str:
    return "default" if t is None else str(t)


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
    rec: dict[str, Any] = {
        "path": spec.name,
        "commands": spec.commands,
        "status": "ok",
        "steps": [],
        "measurements": {},
        "warnings": [],
    }
    pdir = run_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)
    log = pdir / "install.log"
    rec["log"] = str(log)

    def fail(step: str, lines: list[str]) -> dict[str, Any]:
        rec["status"] = "failed"
        rec["failed_step"] = step
        rec["error"] = "\n".join(lines[-25:])
        rec["reason"] = failure_reason(lines)
        echo(f"[{spec.name}] FAILED at {step}: {rec['reason']}")
        return rec

    try:
        pdir.mkdir(parents=True, exist_ok=True)
        venv = pdir / "venv"
        if spec.uses_venv:
            src = pdir / "src"
            t0 = time.perf_counter()
            n = copy_source(ROOT, src)
            rec["steps"].append({"name": "copy", "seconds": time.perf_counter() - t0, "files": n})
            rc, secs, tail = _run_logged(
                [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                _clean_env(None),
                pdir,
                log,
                600,
            )
            rec["steps"].append({"name": "venv", "seconds": secs, "rc": rc})
            if rc != 0:
                return fail("venv", tail)
            python = str(venv / "bin" / "python")
            env = _clean_env(venv)
            probe = [python, "-I", "-c", "import torch; print(torch.__version__)"]
            if subprocess.run(probe, env=env, cwd=pdir, capture_output=True).returncode != 0:
                layer = torch_layer(run_dir / "torch-layer")
                (site,) = venv.glob("lib/python*/site-packages")
                (site / "zz_llada_bench_torch.pth").write_text(str(layer) + "\n")
                rec["torch_from"] = f"links to {sys.prefix}'s torch"
            else:
                rec["torch_from"] = "the system site-packages"
            rc, secs, tail = _run_logged(probe, env, pdir, log, 600)
            if rc != 0:
                return fail("torch", tail)
        else:
            # as it is: its environment variables (PYTHONPATH included) and PATH
            src, python, env = ROOT, sys.executable, dict(os.environ)
            rec["torch_from"] = "this interpreter"
        build_deps, runtime_deps = project_deps(ROOT)
        ctx = Ctx(src, venv, python, build_deps, runtime_deps)
        step_env = {**env, **BUILD_ENV, "LLADA_JOBS": str(os.cpu_count() or 1)}
        if commit and commit != "unknown":
            # the copy has no git metadata; the build names the checkout's commit this way
            step_env["LLADA_GIT_COMMIT"] = commit
        for step in spec.steps(ctx):
            echo(f"[{spec.name}] {step.name}: {' '.join(step.argv)}")
            rc, secs, tail = _run_logged(
                step.argv, {**step_env, **step.env}, pdir, log, step_timeout
            )
            rec["steps"].append({"name": step.name, "seconds": secs, "rc": rc})
            if rc != 0:
                return fail(step.name, tail)
        rec["install_seconds"] = sum(
            s["seconds"] for s in rec["steps"] if s["name"] not in ("copy", "venv")
        )
        for t in threads:
            label = _threads_label(t)
            out = pdir / f"measure-{label}.json"
            # -I: a new environment sees only what was installed into it
            isolate = ["-I"] if spec.uses_venv else []
            argv = [python, *isolate, str(THIS), "--measure-only", "--json-out", str(out)]
            argv += ["--repeats", str(repeats), "--threads", label]
            argv += [f"--{k}={v}" for k, v in size.items()]
            menv = dict(env)
            menv.pop("OMP_NUM_THREADS", None)
            if t is not None:
                menv["OMP_NUM_THREADS"] = str(t)
            echo(f"[{spec.name}] measuring, threads={label}")
            rec.setdefault("loadavg", {})[label] = _loadavg()
            rc, secs, tail = _run_logged(argv, menv, pdir, log, step_timeout)
            if rc != 0 or not out.exists():
                return fail(f"measure (threads={label})", tail)
            m = json.loads(out.read_text())
            rec["measurements"][label] = m
            rec.setdefault("build_info", m["build_info"])
            rec.setdefault("module", m["module"])
        if spec.uses_venv and not rec.get("module", "").startswith(str(pdir.resolve())):
            rec["warnings"].append(f"llada_ext was imported from {rec.get('module')}")
        return rec
    except Exception:  # noqa: BLE001 - one path's trouble is a row of the table
        return fail("internal", traceback.format_exc().splitlines())
    finally:
        if not keep:
            shutil.rmtree(pdir, ignore_errors=True)


# =========================================================================================
# report
# =========================================================================================

TABLE_COLUMNS = [
    "path",
    "status",
    "install s",
    "threads",
    "load",
    "lx ms",
    "SDPA ms",
    "lx/SDPA speed",
    "IQR",
    "min-max",
    "max abs diff",
    "BLAS",
]


def _blas_short(blas: str, where: str) -> str:
    kind = blas.split(" (", 1)[0]
    lib = blas[len(kind) + 2 : -1] if blas.endswith(")") and " (" in blas else ""
    if not lib:
        return blas
    if where and lib.startswith(where):
        return f"{kind} (the path's own)"
    return f"{kind} ({lib})"


def _f(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per (path, thread setting); one row naming the failure for a failed path."""
    rows = []
    for rec in records:
        inst = rec.get("install_seconds")
        inst_s = "-" if inst is None else f"{inst:.0f}"
        if rec["status"] != "ok":
            why = (rec.get("reason") or "").replace("|", "/")[:160]
            status = f"FAILED at {rec.get('failed_step')}: {why}"
            rows.append([rec["path"], status, inst_s] + ["-"] * (len(TABLE_COLUMNS) - 3))
            continue
        status = "ok" if not rec["warnings"] else "ok (" + "; ".join(rec["warnings"]) + ")"
        where = str(Path(rec["log"]).parent) if rec["path"] != "current" else ""
        for label, m in rec["measurements"].items():
            r = m["ratio"]
            rows.append(
                [
                    rec["path"],
                    status,
                    inst_s,
                    f"{label} ({m['torch_threads']})",
                    _f((rec.get("loadavg", {}).get(label) or [None])[0], 2),
                    _f(m["lx_ms"]["median"], 1),
                    _f(m["sdpa_ms"]["median"], 1),
                    _f(r["median"], 3),
                    f"{_f(r['q1'], 3)}-{_f(r['q3'], 3)}",
                    f"{_f(r['min'], 3)}-{_f(r['max'], 3)}",
                    f"{m['max_abs_diff']:.1e}",
                    _blas_short(m["build_info"]["blas"], where),
                ]
            )
    return rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def noise_verdicts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per thread setting: the spread of the median lx/SDPA speeds across the paths that
    worked, against the widest interquartile range among them ("within noise" when the
    spread is no larger)."""
    out = []
    labels: list[str] = []
    for rec in records:
        for label in rec.get("measurements", {}):
            if label not in labels:
                labels.append(label)
    for label in labels:
        ms = [
            (rec["path"], rec["measurements"][label]["ratio"])
            for rec in records
            if rec["status"] == "ok" and label in rec.get("measurements", {})
        ]
        if len(ms) < 2:
            continue
        meds = [r["median"] for _, r in ms]
        spread = max(meds) - min(meds)
        iqr = max(r["q3"] - r["q1"] for _, r in ms)
        out.append(
            {
                "threads": label,
                "paths": [p for p, _ in ms],
                "median_min": min(meds),
                "median_max": max(meds),
                "spread": spread,
                "widest_iqr": iqr,
                "within_noise": spread <= iqr,
            }
        )
    return out


def build_info_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for rec in records:
        bi = rec.get("build_info")
        if not bi:
            continue
        rows.append(
            [
                rec["path"],
                f"`{bi.get('commit')}`",
                str(bi.get("compiler")),
                "no" if not bi.get("cuda_kernels") else f"{bi.get('cuda_toolkit')}",
                f"{bi.get('openmp_version')}" if bi.get("openmp") else "no",
                str(bi.get("blas")),
                str(rec.get("module")),
            ]
        )
    return rows


def render_markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    s = meta["size"]
    parts = [
        "# CPU attention speed by install path\n",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}, commit: `{meta['commit']}`",
        f"- python {meta['python']}, torch {meta['torch']}, {meta['platform']}",
        f"- case: lx.attention forward vs torch SDPA, B={s['batch']} H={s['heads']} "
        f"S={s['seq']} D={s['dim']} float32, {meta['repeats']} alternating pairs per "
        "thread setting (lx, SDPA, SDPA, lx, ...), after 3 untimed calls of each",
        "- build: " + ", ".join(f"{k}={v}" for k, v in BUILD_ENV.items()) + " (CPU only)",
        "- environment: "
        + (", ".join(f"{k}={v}" for k, v in meta["env"].items()) or "no OMP_* variables set"),
        "- lx/SDPA speed: SDPA time / lx time of each pair (above 1: lx is faster); the "
        "median, its interquartile range and its min-max over the pairs. lx ms and SDPA ms: "
        "medians. threads: the setting (torch's thread count in parentheses); 1 = "
        "OMP_NUM_THREADS=1, default = the variable unset. install s: the install commands "
        "(dependencies included; venv creation and the copy of the checkout not counted). "
        "load: the 1-minute load average when the measurement started (the machine's other "
        f"work; {meta['loadavg_start']} at the start of the run, {meta.get('loadavg_end')} at "
        "its end).\n",
        markdown_table(TABLE_COLUMNS, table_rows(records)),
    ]
    verdicts = noise_verdicts(records)
    if verdicts:
        parts.append(
            "\n## Same speed within noise?\n\n"
            "Spread of the median lx/SDPA speeds across the paths, against the widest "
            "interquartile range among them.\n"
        )
        parts.append(
            markdown_table(
                ["threads", "paths", "medians", "spread", "widest IQR", "verdict"],
                [
                    [
                        v["threads"],
                        str(len(v["paths"])),
                        f"{v['median_min']:.3f}-{v['median_max']:.3f}",
                        f"{v['spread']:.3f}",
                        f"{v['widest_iqr']:.3f}",
                        "within noise" if v["within_noise"] else "larger than the noise",
                    ]
                    for v in verdicts
                ],
            )
        )
    bi_rows = build_info_rows(records)
    if bi_rows:
        parts.append("\n## build_info() per path\n")
        parts.append(
            markdown_table(
                ["path", "commit", "compiler", "CUDA", "OpenMP", "BLAS", "llada_ext from"],
                bi_rows,
            )
        )
    parts.append("\n## Commands\n")
    parts.append(
        markdown_table(
            ["path", "commands", "torch", "steps (s)"],
            [
                [
                    r["path"],
                    f"`{r['commands']}`",
                    r.get("torch_from", "-"),
                    ", ".join(f"{s['name']} {s['seconds']:.0f}" for s in r["steps"]) or "-",
                ]
                for r in records
            ],
        )
    )
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        parts.append("\n## Failures\n")
        for r in failed:
            parts.append(f"### {r['path']} (step: {r.get('failed_step')})\n")
            parts.append("```\n" + (r.get("error") or "") + "\n```\n")
    return "\n".join(parts)


def _metadata(size: dict[str, int], repeats: int) -> dict[str, Any]:
    sys.path.insert(0, str(THIS.parent))
    try:
        from bench_common import cpu_name, git_commit
    finally:
        sys.path.remove(str(THIS.parent))
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
        "loadavg_start": _loadavg(),
    }


def output_paths(out: Path) -> tuple[Path, Path]:
    """(markdown, json) for ``--out``: a ``.md`` file, or a folder to put the default name in."""
    md = out if out.suffix == ".md" else out / RESULT_NAME
    return md, md.with_suffix(".json")


# =========================================================================================
# command line
# =========================================================================================


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="install_paths.py",
        description=(
            "Install the checkout in a new virtual environment per install path (CPU-only "
            "build) and time lx.attention forward against torch SDPA in each, side by side."
        ),
        epilog=(
            "install paths: pip (pip install .), nbi-deps-before (build deps + runtime deps, "
            "then pip install --no-build-isolation .), nbi-deps-after (build deps, pip install "
            "--no-build-isolation --no-deps ., then the runtime deps), editable (pip install "
            "-e .), setup.sh (scripts/setup.sh), current (no install: this interpreter). "
            "Needs the package index pip is configured with; torch is reused, not downloaded."
        ),
    )
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
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    size = {"batch": args.batch, "heads": args.heads, "seq": args.seq, "dim": args.dim}
    if args.measure_only:
        result = measure(**size, repeats=args.repeats, threads=args.threads[0])
        text = json.dumps(result, indent=2)
        if args.json_out:
            args.json_out.write_text(text + "\n")
        else:
            print(text)
        return 0

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
    meta["loadavg_end"] = _loadavg()
    text = render_markdown(meta, records)
    print()
    print(text)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    json_path.write_text(
        json.dumps(
            {"meta": meta, "records": records, "verdicts": noise_verdicts(records)}, indent=2
        )
        + "\n"
    )
    print(
        f"wrote {md_path} and {json_path}"
        + (f"; environments kept in {run_dir}" if args.keep else "")
    )
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
