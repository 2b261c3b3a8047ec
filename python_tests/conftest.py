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


# --------------------------------------------------------------------------------------------
# Training, CLI and shard tests: torch thread count, comparing weights
# --------------------------------------------------------------------------------------------
class TorchThreads:
    """``with TorchThreads(n):`` runs the block with ``n`` torch threads, then restores the
    previous count."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.previous = None

    def __enter__(self) -> "TorchThreads":
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.previous)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matrices run fastest on one thread, and OpenMP
    threads spin-waiting on a shared CPU slow them down many times over."""
    with TorchThreads(1):
        yield


def assert_same_tensors(got: dict, want: dict, **tolerance) -> None:
    """``got`` and ``want`` hold the same names and tensors: bitwise equal, or with ``rtol`` /
    ``atol`` given, equal within :func:`torch.testing.assert_close` tolerances."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        if tolerance:
            torch.testing.assert_close(got[name], value, **tolerance)
        else:
            assert torch.equal(got[name], value), name


# --------------------------------------------------------------------------------------------
# Model, checkpoint and model-folder tests: small LLaDA configs and models
# --------------------------------------------------------------------------------------------
def llada_config(**fields) -> lx.LLaDAConfig:
    """A small :class:`llada_ext.LLaDAConfig` whose special ids sit at the top of its
    ``vocab_size`` V: MASK V-1, EOS and padding V-2, BOS V-3, EoT V-4 (fields given win)."""
    v = fields["vocab_size"]
    ids = dict(mask_token_id=v - 1, eos_token_id=v - 2, pad_token_id=v - 2, bos_token_id=v - 3)
    return lx.LLaDAConfig(**{**ids, "eot_token_id": v - 4, **fields})


def vary_norm_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Draw the RMSNorm weights (the only 1-D parameters) from U(0.5, 1.5) instead of
    leaving them at 1, so that tests see them; returns ``model``."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


# --------------------------------------------------------------------------------------------
# Sampler and likelihood tests: tiny random LLaDA models, left-padded prompt batches
# --------------------------------------------------------------------------------------------
def tiny_llada(
    backend: str = "torch",
    *,
    seed: int = 0,
    vocab: int = 61,
    n_layers: int = 2,
    mlp_hidden_size: int = 48,
    max_sequence_length: int = 128,
) -> lx.LLaDAModel:
    """A random LLaDA in eval mode drawn after ``torch.manual_seed(seed)``: d_model 32, 4 heads,
    2 KV heads, weights of std 0.3 (so predictions differ between positions), special ids as
    :func:`llada_config` places them and no EoT id."""
    torch.manual_seed(seed)
    cfg = llada_config(
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_size=mlp_hidden_size,
        vocab_size=vocab,
        max_sequence_length=max_sequence_length,
        rope_theta=10000.0,
        eot_token_id=None,
        initializer_range=0.3,
    )
    return lx.LLaDAModel(cfg, backend=backend).eval()


def left_padded_batch(model, lens=(5, 3, 7), seed=1):
    """Random prompts of lengths ``lens`` (ids below ``vocab_size - 3``, so never special),
    right-aligned: ids int64 [B, max(lens)] padded with the pad id, and the attention mask
    int64 [B, max(lens)] (1 on real tokens)."""
    g = torch.Generator().manual_seed(seed)
    plen = max(lens)
    ids = torch.full((len(lens), plen), model.config.pad_token_id)
    mask = torch.zeros(len(lens), plen, dtype=torch.long)
    for r, n in enumerate(lens):
        ids[r, plen - n :] = torch.randint(0, model.config.vocab_size - 3, (n,), generator=g)
        mask[r, plen - n :] = 1
    return ids, mask


class LogitsOnly(torch.nn.Module):
    """A model seen only through ``forward(ids, attention_mask).logits``, ``.config`` and
    ``.device``, as a Hugging Face model is: no ``forward_hidden`` or ``lm_head``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, ids, attention_mask=None):
        return self.inner(ids, attention_mask=attention_mask)


# --------------------------------------------------------------------------------------------
# Embedding tests: the C library built and installed as a CMake package, once a session
# --------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> "str | None":
    import shutil

    # Prefer the tools of the running environment (the venv ships cmake and ninja).
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


CMAKE, NINJA = _tool("cmake"), _tool("ninja")


def _run(
    cmd: list[str], cwd: "Path | None" = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    env.pop("CMAKE_PREFIX_PATH", None)  # only the prefix under test may satisfy find_package
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-4000:]
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return proc


def _generator() -> list[str]:
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={NINJA}"] if NINJA else []


@pytest.fixture(scope="session")
def installed_prefix(tmp_path_factory) -> Path:
    """The C library configured, built (2 jobs) and installed into a fresh prefix, once."""
    import shutil

    if CMAKE is None or shutil.which("cc") is None or shutil.which("c++") is None:
        pytest.skip("needs cmake and a C/C++ compiler")
    base = tmp_path_factory.mktemp("llada_install")
    build, prefix = base / "build", base / "prefix"
    _run(
        [
            CMAKE,
            "-S",
            str(ROOT),
            "-B",
            str(build),
            *_generator(),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLADA_BUILD_PYTHON=OFF",
            "-DLLADA_CUDA=OFF",
        ]
    )
    _run([CMAKE, "--build", str(build), "-j", "2"])
    _run([CMAKE, "--install", str(build), "--prefix", str(prefix)])
    return prefix
