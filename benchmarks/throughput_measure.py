"""Timing of the throughput benchmark: every runner of a grid point in interleaved rounds.

For each grid point (model preset, batch, prompt length, answer length) every runner (each
AR method, each diffusion method at each tokens-per-step k) is warmed up, then timed in
``repeats`` rounds with :func:`bench_common.time_interleaved`: round ``r`` runs every
runner once, in an order rotated by ``r``, so load from the machine's other work falls on
all of them alike. Each record gives the median and the interquartile range and min-max of
the wall time and tokens/s over the rounds, and the speed against the AR baseline taken per
round (AR time / method time of the same round, paired) with the same statistics.
"""

from __future__ import annotations

import gc
import resource
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import paired_speedups, spread_stats, sync, time_interleaved  # noqa: E402
from throughput_setup import (  # noqa: E402
    AR_BASELINES,
    Models,
    Runner,
    build_models,
    point_runners,
)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(bytes, what they are): the allocator's peak on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "max_memory_allocated"
    # Linux reports kB; this is the process's high-water mark, not per run
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "process peak RSS"


def status_of(e: BaseException) -> str:
    """A record's status for an exception: "oom" or "error: <type>: <first line>"."""
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failed_record(base: dict[str, Any], method: str, k: int, steps: int, status: str) -> dict:
    return dict(base, method=method, tokens_per_step=k, steps=steps, status=status)


def ok_record(
    base: dict[str, Any],
    runner: Runner,
    times: list[float],
    baseline: Optional[tuple[str, list[float]]],
    peak: tuple[float, str],
    weight_bytes: int,
    copy_gbps: float,
) -> dict[str, Any]:
    """The record of a runner timed in every round: statistics over the rounds, the paired
    speed against ``baseline`` (its name and times of the same rounds), and the ceiling."""
    b, gen, k = base["batch"], base["gen"], runner.k
    wall = spread_stats(times)
    tps = spread_stats([b * gen / t for t in times])
    max_steps_per_s = copy_gbps * 1e9 / weight_bytes
    ceiling = max_steps_per_s * k * b
    rec = dict(
        base,
        method=runner.method,
        tokens_per_step=k,
        steps=runner.steps,
        status="ok",
        repeats=len(times),
        wall_s=wall["median"],
        wall_s_stats=wall,
        wall_s_rounds=times,
        tokens_per_s=tps["median"],
        tokens_per_s_stats=tps,
        ms_per_step=1e3 * wall["median"] / runner.steps,
        peak_mem_bytes=peak[0],
        peak_mem_kind=peak[1],
        weight_bytes_per_step=weight_bytes,
        ceiling_steps_per_s=max_steps_per_s,
        ceiling_tokens_per_s=ceiling,
        fraction_of_ceiling=tps["median"] / ceiling,
    )
    if baseline is not None:
        speed = spread_stats(paired_speedups(baseline[1], times))
        rec.update(vs_ar_baseline=baseline[0], vs_ar=speed["median"], vs_ar_stats=speed)
    rec.update(runner.extra)
    return rec


def _warm_up(
    runners: list[Runner], base: dict, device: torch.device, verbose: bool
) -> tuple[list[Runner], list[dict]]:
    """Run every runner's warm-up; (the runners that worked, records of those that failed)."""
    ready, failed = [], []
    for r in runners:
        try:
            r.warmup()
            sync(device)
            ready.append(r)
        except Exception as e:  # noqa: BLE001 - record and go on with the grid
            failed.append(failed_record(base, r.method, r.k, r.steps, status_of(e)))
            if verbose:
                traceback.print_exc()
            r.release()
            free(device)
    return ready, failed


def _graphs_check(r: Runner) -> Optional[bool]:
    """Whether a graphs runner decoded what the eager sampler decodes (None: no room)."""
    try:
        return r.check(r.last) if r.check is not None else None
    except torch.OutOfMemoryError:
        return None


def measure_point(
    base: dict[str, Any],
    runners: list[Runner],
    device: torch.device,
    repeats: int,
    weight_bytes: int,
    copy_gbps: float,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Warm up ``runners`` and time them in ``repeats`` interleaved rounds; one record each
    (in the order of ``runners``), failures included. Releases every runner."""
    ready, records = _warm_up(runners, base, device, verbose)
    peaks: dict[str, float] = {}

    def before(name: str) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def after(name: str) -> None:
        peaks[name] = max(peaks.get(name, 0.0), peak_memory(device)[0])

    fns = {r.name: r.call for r in ready}
    res = time_interleaved(fns, device, repeats, before=before, after=after)
    kind = peak_memory(device)[1]
    by_name = {r.name: r for r in ready}
    base_name = next((n for n in (f"{m} k=1" for m in AR_BASELINES) if n in res.times), None)
    baseline = (by_name[base_name].method, res.times[base_name]) if base_name else None
    out = []
    for r in ready:
        if r.name in res.errors:
            out.append(failed_record(base, r.method, r.k, r.steps, status_of(res.errors[r.name])))
            if verbose:
                print(f"{r.name}: {res.errors[r.name]!r}", file=sys.stderr)
            continue
        rec = ok_record(
            base,
            r,
            res.times[r.name],
            baseline,
            (peaks[r.name], kind),
            weight_bytes,
            copy_gbps,
        )
        if r.check is not None:
            rec["matches_eager_sampler"] = _graphs_check(r)
        out.append(rec)
    for r in runners:
        r.release()
        r.last = None
    free(device)
    order = {r.name: i for i, r in enumerate(runners)}
    return sorted(records + out, key=lambda x: order[f"{x['method']} k={x['tokens_per_step']}"])


def run_model(
    name: str,
    grid: dict[str, list],
    methods: list[str],
    device: torch.device,
    dtype: torch.dtype,
    *,
    repeats: int,
    block_length: int,
    compile_ar: bool,
    copy_gbps: float,
    log: Callable[[dict[str, Any]], None],
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Every grid point of one model preset, all models of the preset in memory together.

    ``log`` is called with each record as soon as its grid point is done.
    """
    ms: Models = build_models(name, methods, device, dtype, compile_ar)
    cfg = ms.cfg
    points = [(b, p, g) for b in grid["batches"] for p in grid["prompts"] for g in grid["gens"]]
    gen = torch.Generator().manual_seed(1234)
    high = min(cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id)
    prompts = {
        (b, p): torch.randint(0, high, (b, p), generator=gen).to(device) for b, p, _ in points
    }
    records: list[dict[str, Any]] = []
    try:
        for b, p, g in points:
            base = {
                "model": name,
                "batch": b,
                "prompt": p,
                "gen": g,
                "dtype": str(dtype).replace("torch.", ""),
            }
            runners, skipped = point_runners(
                ms, methods, prompts[(b, p)], g, grid["ks"], block_length, device.type == "cuda"
            )
            recs = [failed_record(base, *s) for s in skipped]
            recs += measure_point(
                base, runners, device, repeats, ms.weight_bytes, copy_gbps, verbose
            )
            for rec in recs:
                log(rec)
            records += recs
    finally:
        if ms.llada is not None:
            ms.llada.backend = "kernels"
        del ms
        free(device)
    return records
