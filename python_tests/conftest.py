"""Shared fixtures: every kernel test runs on the CPU and, when one is present, on CUDA."""

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import llada_ext as lx

_DEVICES = ["cpu", "cuda"]


def cuda_ready() -> bool:
    return torch.cuda.is_available() and lx.has_cuda_kernels()


@pytest.fixture(params=_DEVICES)
def device(request) -> str:
    """'cpu' or 'cuda' (skipped when there is no GPU or no CUDA build)."""
    if request.param == "cuda" and not cuda_ready():
        pytest.skip("needs a CUDA device and a CUDA build of the kernels")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class DemoRun(NamedTuple):
    cwd: Path  # where the demo ran, as a user would from the checkout
    folder: Path  # cwd / "runs/demo"
    stdout: str
    exe: list[str]


def llada_ext_command() -> list[str]:
    """The installed ``llada-ext`` script beside this Python, else ``python -m llada_ext``."""
    script = Path(sys.executable).parent / "llada-ext"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llada_ext"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """``llada-ext demo`` exactly as the README's main job runs it (about 2 minutes on 2
    cores), in a process and folder of its own; the README, quick-start and lm-eval tests use
    the model it trains."""
    cwd = tmp_path_factory.mktemp("checkout")
    exe = llada_ext_command()
    proc = subprocess.run([*exe, "demo"], cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return DemoRun(cwd, cwd / "runs" / "demo", proc.stdout, exe)
