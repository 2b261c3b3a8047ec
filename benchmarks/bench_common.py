"""Shared pieces of the benchmarks: run metadata, timing, device peaks, result files.

Timing has one implementation here: :func:`timed_call` times one device-synchronised call;
:func:`time_fn` repeats one callable, :func:`time_interleaved` runs several in rotated
rounds (paired figures for ratios), :func:`spread_stats` summarises a series;
:func:`cuda_time_ms` times with CUDA events where only GPU time counts.

The result files and their tables are written by ``bench_tables.py``.

Every figure a benchmark reports is put next to a ceiling measured *in the same run* on the
same device (a large matmul for FLOP/s, a large copy for bytes/s), so a number can be read as
"fraction of what this machine does" rather than against a datasheet.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------


def git_commit(short: bool = False) -> str:
    """Commit hash of the checkout (with ``-dirty`` when tracked files differ), or "unknown".

    ``short``: the abbreviated hash (``git rev-parse --short``).
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device`` (GPU name, or CPU model plus usable cores)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()} ({cores} cores, {torch.get_num_threads()} torch threads)"


def run_metadata(device: torch.device) -> dict[str, Any]:
    """Device, commit, date, library versions: the header of every result file."""
    try:
        import llada_ext

        lx_version = llada_ext.__version__
        cuda_kernels = bool(llada_ext.has_cuda_kernels())
    except Exception as e:  # noqa: BLE001 - a broken build is reported, not fatal here
        lx_version, cuda_kernels = f"unavailable ({e})", False
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "llada_ext": lx_version,
        "llada_ext_cuda_kernels": cuda_kernels,
        "host": platform.node(),
        # thread settings change CPU figures a lot on a shared machine; keep them with the data
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")
            if k in os.environ
        },
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call of ``fn``, the device synchronised before and after (so work
    queued before is not counted and the call's own queued work is)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    reps: int = 5,
    min_time: float = 0.0,
    max_reps: int = 1000,
) -> float:
    """Median wall time of ``fn()`` in seconds (device-synchronised).

    Parameters
    ----------
    fn : callable
        The work to time; its result is discarded.
    device : torch.device
        Synchronised before and after every call so queued GPU work is counted.
    warmup, reps : int
        Untimed calls first, then at least ``reps`` timed calls.
    min_time : float
        Keep timing (up to ``max_reps`` calls) until this many seconds were spent, which
        steadies very short kernels.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < reps or (sum(times) < min_time and len(times) < max_reps):
        times.append(timed_call(fn, device))
    return statistics.median(times)


def cuda_time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median time of ``fn`` in milliseconds, measured with CUDA events on the current stream.

    Parameters
    ----------
    fn : callable
        The work to time; it must only enqueue work on the current stream.
    warmup, iters : int
        Untimed and timed repetitions.

    Returns
    -------
    float
        Median over ``iters`` runs (the upper middle one for an even count), in milliseconds.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


@dataclass
class Interleaved:
    """What :func:`time_interleaved` measured.

    ``times[name]`` holds one wall time per round, in round order, for every callable that
    never raised (round ``r`` of two callables ran in the same stretch of the machine's
    load, so ``times[a][r] / times[b][r]`` is a paired ratio); ``errors[name]`` the exception
    of a callable that raised (left out of the later rounds; the others rotate on);
    ``orders[r]`` the order of round ``r``.
    """

    times: dict[str, list[float]]
    errors: dict[str, BaseException]
    orders: list[list[str]]


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int,
    *,
    warmup: int = 0,
    before: Optional[Callable[[str], None]] = None,
    after: Optional[Callable[[str], None]] = None,
) -> Interleaved:
    """Time several callables in interleaved rounds, so a busy machine slows them alike.

    Round ``r`` calls every callable once, in the order of ``fns`` rotated by ``r`` (with two
    callables: a, b, then b, a, ...), each call timed by :func:`timed_call`.

    Parameters
    ----------
    fns : dict of str to callable
        The work to time, by name; results are discarded.
    device : torch.device
        Synchronised around every timed call.
    rounds : int
        Timed rounds (>= 1).
    warmup : int
        Untimed rounds first (same rotation).
    before, after : callable, optional
        Called with the name around every timed call, outside the timed window (e.g. to reset
        and read a peak-memory counter).

    Returns
    -------
    Interleaved
        Per-round times, the exceptions of callables that raised, and the round orders.
    """
    names = list(fns)
    res = Interleaved({n: [] for n in names}, {}, [])
    for r in range(-warmup, rounds):
        alive = [n for n in names if n not in res.errors]
        shift = r % len(alive) if alive else 0
        order = alive[shift:] + alive[:shift]
        if r >= 0:
            res.orders.append(order)
        for name in order:
            try:
                if r < 0:
                    fns[name]()
                    continue
                if before is not None:
                    before(name)
                res.times[name].append(timed_call(fns[name], device))
                if after is not None:
                    after(name)
            except Exception as e:  # noqa: BLE001 - the caller reports it per callable
                res.errors[name] = e
                res.times.pop(name, None)
    return res


def spread_stats(values: list[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method) and min/max of ``values`` (at least one)."""
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
        "n": len(values),
    }


def paired_speedups(base_times: list[float], times: list[float]) -> list[float]:
    """Per round, ``base time / time`` (above 1: faster than the base), from two series of
    :func:`time_interleaved` times of the same rounds."""
    if len(base_times) != len(times):
        raise ValueError(f"unpaired series: {len(base_times)} vs {len(times)} rounds")
    return [b / t for b, t in zip(base_times, times)]


# ---------------------------------------------------------------------------------------
# device ceilings
# ---------------------------------------------------------------------------------------


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: Optional[int] = None
) -> float:
    """TFLOP/s of a large square matmul in ``dtype``: the compute ceiling of this run.

    CUDA float32 is measured with TF32 off, as the kernels that run in float32 use it.
    """
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        sec = time_fn(lambda: torch.mm(a, b), device, warmup=2, reps=5, min_time=0.3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2.0 * n**3 / sec / 1e12


def measure_copy_gbps(device: torch.device, nbytes: Optional[int] = None) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    sec = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=5, min_time=0.3)
    return 2.0 * nbytes / sec / 1e9


def measure_peaks(
    device: torch.device, matmul_dtypes: tuple[torch.dtype, ...] = ()
) -> dict[str, float]:
    """Copy bandwidth and matmul throughput of ``device`` measured now.

    Returns
    -------
    dict
        ``copy_gbps`` and ``matmul_tflops_<dtype>`` for every dtype asked for (default:
        float32 on CPU, float32 and bfloat16 on CUDA).
    """
    if not matmul_dtypes:
        matmul_dtypes = (
            (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
        )
    peaks = {"copy_gbps": measure_copy_gbps(device)}
    for dt in matmul_dtypes:
        peaks[f"matmul_tflops_{dtype_name(dt)}"] = measure_matmul_tflops(device, dt)
    return peaks


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------
# reference remask step (the public LLaDA generate.py, plain torch)
# ---------------------------------------------------------------------------------------


def torch_remask_step(
    logits: torch.Tensor, x: torch.Tensor, num_transfer: torch.Tensor, mask_id: int, offset: int = 0
) -> torch.Tensor:
    """One low-confidence remasking step written the way the public LLaDA sampler writes it.

    argmax over the vocabulary, softmax + gather for the confidence, ``-inf`` outside the
    candidates, then one ``topk`` per row (the per-row ``k`` is read on the host, as there).

    Parameters
    ----------
    logits : Tensor
        [B, W, V] predictions for ``x[:, offset:offset + W]``.
    x : Tensor
        int64 [B, L] current sequence (not modified).
    num_transfer : Tensor
        int64 [B] tokens to unmask per row.
    mask_id : int
        Mask token id.
    offset : int
        Start of the window in ``x``.

    Returns
    -------
    Tensor
        int64 [B, L]: the new sequence.
    """
    x0 = torch.argmax(logits, dim=-1)
    return transfer_most_confident(logits, x0, x, num_transfer, mask_id, offset)


def torch_gumbel_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    num_transfer: torch.Tensor,
    mask_id: int,
    temperature: float,
    offset: int = 0,
) -> torch.Tensor:
    """The public sampler's step at temperature > 0: float64 Gumbel noise, then as
    :func:`torch_remask_step` (confidence from the untempered softmax)."""
    l64 = logits.to(torch.float64)
    noise = torch.rand_like(l64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    x0 = torch.argmax(l64.exp() / gumbel_noise, dim=-1)
    return transfer_most_confident(logits, x0, x, num_transfer, mask_id, offset)


def transfer_most_confident(
    logits: torch.Tensor,
    x0: torch.Tensor,
    x: torch.Tensor,
    num_transfer: torch.Tensor,
    mask_id: int,
    offset: int = 0,
) -> torch.Tensor:
    """The rest of the public sampler's step once the tokens ``x0`` [B, W] are picked.

    Confidence is the softmax probability of ``x0`` at the masked positions (``-inf``
    elsewhere); one ``topk`` per row picks the ``num_transfer`` positions written into a copy
    of ``x`` (the other arguments as in :func:`torch_remask_step`).
    """
    W = logits.shape[1]
    xw = x[:, offset : offset + W]
    mask_index = xw == mask_id
    p = F.softmax(logits, dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, xw)
    confidence = torch.where(mask_index, x0_p, -math.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    ks = num_transfer.tolist()
    for j in range(confidence.shape[0]):
        _, select = torch.topk(confidence[j], k=int(ks[j]))
        transfer[j, select] = True
    out = x.clone()
    window = out[:, offset : offset + W]
    window[transfer] = x0[transfer]
    return out


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def add_out_argument(ap: argparse.ArgumentParser, default: Path) -> None:
    """The ``--out`` option of the scripts whose results go into one folder."""
    ap.add_argument("--out", type=Path, default=default, help=f"output folder (default {default})")
