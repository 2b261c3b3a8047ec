"""Environments for ``install_paths.py``: the checkout copied the way git sees it, a new
virtual environment that reuses this interpreter's torch, and install commands run with
their output in a log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
# Build requirements a --no-build-isolation user installs first; pyproject.toml's list wins when
# it can be read (less scipy-openblas32, which the "before/after" paths place themselves).
FALLBACK_BUILD_DEPS = ["setuptools>=64", "wheel", "pybind11>=2.12", "cmake>=3.18", "ninja"]
FALLBACK_RUNTIME_DEPS = ["numpy", "safetensors", "tokenizers", "tqdm", "scipy-openblas32"]
# Never linked into a new environment with torch: the build tools and the BLAS wheel, whose
# presence is what the paths differ in. (setuptools is linked when torch requires it, as
# torch 2.13 does: an environment that installs torch gets it the same way.)
NOT_SHARED = {"pip", "wheel", "pybind11", "cmake", "ninja", "scipy-openblas32"}
# every install is CPU-only: the CPU executor of the CUDA kernels plays no part in CPU attention
BUILD_ENV = {"LLADA_CUDA": "0", "LLADA_EMU": "0"}


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


def clean_env(venv: Optional[Path]) -> dict[str, str]:
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


def run_logged(argv: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float):
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


def loadavg() -> Optional[list[float]]:
    """The 1/5/15-minute load averages: how busy the machine was around a measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
