"""Kernel speed vs plain torch, as a table and as result files.

Runs the cases of ``kernel_cases.py`` (remask, masked cross-entropy fwd+bwd, attention forward
and forward+backward) on the CPU (or ``--device cuda``), timing the implementations of a case
in interleaved rounds so that a busy machine slows them alike, and writes
``results/kernels_<device>.json`` and ``.md`` with the device, commit, date, torch version,
the device ceilings measured in the same run and every figure.

Usage::

    python benchmarks/bench_kernels_cpu.py [--device cpu|cuda] [--reps 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    RESULTS_DIR,
    add_out_argument,
    measure_peaks,
    run_metadata,
    time_interleaved,
)
from bench_tables import markdown_table, write_result_files  # noqa: E402
from kernel_cases import BUILDERS, Case  # noqa: E402

DEFAULT_CASES = ["remask", "masked_ce", "attention_fwd", "attention_fwd_bwd", "linear_ce"]


def time_case(case: Case, reps: int, warmup: int = 1) -> list[float]:
    """Median seconds of every implementation of ``case``, timed in interleaved rounds."""
    res = time_interleaved({i.name: i.fn for i in case.impls}, case.device, reps, warmup=warmup)
    if res.errors:
        name, err = next(iter(res.errors.items()))
        raise RuntimeError(f"{case.key}: {name} failed: {err!r}") from err
    return [statistics.median(res.times[i.name]) for i in case.impls]


def summarize(case: Case, medians: list[float], peaks: dict[str, float]) -> dict[str, Any]:
    """The record of one case: every implementation's time, rate, share of the device
    ceiling and speed against the baseline, and whether the target was met."""
    names = [i.name for i in case.impls]
    base = medians[names.index(case.baseline)]
    peak = peaks[case.peak_key]
    impls = []
    for name, sec in zip(names, medians):
        rate = case.rate(sec)
        impls.append(
            {
                "name": name,
                "median_s": sec,
                "rate": rate,
                "fraction_of_peak": rate / peak,
                "speedup_vs_baseline": base / sec,
            }
        )
    speedup = base / medians[0]
    return {
        "key": case.key,
        "title": case.title,
        "shape": case.shape,
        "unit": case.unit,
        "work": case.work,
        "peak_key": case.peak_key,
        "peak": peak,
        "ours": names[0],
        "baseline": case.baseline,
        "speedup": speedup,
        "target": case.target,
        "target_text": case.target_text,
        "meets_target": None if case.target is None else bool(speedup >= case.target),
        "impls": impls,
        "unavailable": case.skipped,
    }


def _impl_rows(cases: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for c in cases:
        for im in c["impls"]:
            rows.append(
                [
                    c["key"],
                    im["name"],
                    im["median_s"] * 1e3,
                    f"{im['rate']:.3g} {c['unit']}",
                    f"{100 * im['fraction_of_peak']:.1f}%",
                    im["speedup_vs_baseline"],
                ]
            )
    return rows


def _target_rows(cases: list[dict[str, Any]]) -> list[list[Any]]:
    trows = []
    for c in cases:
        verdict = "-" if c["meets_target"] is None else ("met" if c["meets_target"] else "MISSED")
        trows.append(
            [
                c["title"],
                f"{c['ours']} vs {c['baseline']}",
                f"{c['speedup']:.2f}x",
                c["target_text"],
                verdict,
            ]
        )
    return trows


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report: the run's header, every implementation's figures, the targets
    and the baselines that did not run."""
    meta = result["meta"]
    peaks = result["peaks"]
    lines = [
        f"# Kernel benchmarks on {meta['device_type'].upper()}",
        "",
        f"- device: {meta['device']}",
        f"- commit: `{meta['commit']}`, date: {meta['date']}, torch {meta['torch']}",
        "- ceilings measured in this run: " + ", ".join(f"{k} = {v:.3g}" for k, v in peaks.items()),
        "- times are medians; the implementations of a case were timed in interleaved rounds "
        "(the order rotated per round)",
        "",
    ]
    headers = ["case", "implementation", "ms", "rate", "of peak", "speed vs baseline"]
    lines.append(markdown_table(headers, _impl_rows(result["cases"])))
    lines += ["## Targets", ""]
    headers = ["case", "comparison", "measured", "target", "verdict"]
    lines.append(markdown_table(headers, _target_rows(result["cases"])))
    unavailable = [
        (c["key"], n, why) for c in result["cases"] for n, why in c["unavailable"].items()
    ]
    if unavailable:
        lines += ["## Baselines not run", ""]
        lines += [f"- {k}: {n}: {why}" for k, n, why in unavailable]
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)"
    )
    ap.add_argument(
        "--cases",
        nargs="+",
        default=DEFAULT_CASES,
        choices=list(BUILDERS),
        help="which cases to run (default all)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed calls per implementation (default 5 on CPU, 30 on CUDA)",
    )
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile'd cross-entropy baseline (its compile takes "
        "a minute on a small CPU)",
    )
    add_out_argument(ap, RESULTS_DIR)
    return ap


def print_summary(case: Case, summary: dict[str, Any]) -> None:
    """Console lines of one case: a line per implementation, then the baselines not run."""
    print(f"\n[{case.title}]")
    for im in summary["impls"]:
        print(
            f"  {im['name']:<34} {im['median_s'] * 1e3:9.2f} ms  {im['rate']:8.3g} "
            f"{case.unit:<7} {100 * im['fraction_of_peak']:5.1f}% of peak  "
            f"{im['speedup_vs_baseline']:6.2f}x vs baseline"
        )
    for name, why in case.skipped.items():
        print(f"  {name}: not run ({why})")


def run_cases(
    keys: list[str], device: torch.device, reps: int, peaks: dict[str, float], with_compile: bool
) -> list[dict[str, Any]]:
    """Build, time and summarise every case of ``keys`` that is available on ``device``."""
    cases = []
    for key in keys:
        kwargs = {"with_compile": with_compile} if key == "masked_ce" else {}
        case = BUILDERS[key](device, **kwargs)
        if case is None:
            print(f"[{key}] not available on {device.type}, skipped")
            continue
        summary = summarize(case, time_case(case, reps), peaks)
        cases.append(summary)
        print_summary(case, summary)
        del case  # free the inputs before the next case
    return cases


def main(argv: Optional[list[str]] = None) -> int:
    """Run the cases and write ``kernels_<device>.{json,md}``; returns the exit status."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    reps = args.reps or (5 if device.type == "cpu" else 30)

    t_start = time.perf_counter()
    meta = run_metadata(device)
    print(f"device: {meta['device']}\ncommit: {meta['commit']}  torch {meta['torch']}")
    peaks = measure_peaks(device)
    print("ceilings: " + ", ".join(f"{k} = {v:.3g}" for k, v in peaks.items()))
    cases = run_cases(args.cases, device, reps, peaks, not args.no_compile)
    result = {
        "meta": meta,
        "peaks": peaks,
        "reps": reps,
        "cases": cases,
        "wall_s": time.perf_counter() - t_start,
    }
    stem = f"kernels_{device.type}"
    md = render_markdown(result)
    write_result_files(args.out, stem, result, md)
    print("\n" + md.split("## Targets", 1)[1].strip())
    print(f"\nwrote {args.out / (stem + '.json')} and .md  ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
