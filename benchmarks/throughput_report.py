"""Summaries of the throughput benchmark: the target ratios, console lines and the markdown
report (every record with its median and spread over the interleaved rounds)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ar_baseline import RANDOM_WEIGHTS_NOTE  # noqa: E402
from bench_common import paired_speedups, spread_stats  # noqa: E402
from bench_tables import markdown_table  # noqa: E402

# the configuration and the targets of the project
TARGET_CONFIG = {"model": "8b", "batch": 1, "prompt": 512, "gen": 256}
TARGET_K = 4
TARGET_VS_AR = 3.0
TARGET_VS_REFERENCE = 10.0


def ok_records(records: list[dict], **match: Any) -> list[dict]:
    """The records that ran, among those whose fields equal ``match``."""
    return [
        r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())
    ]


def configs(records: list[dict]) -> list[tuple[str, int, int, int]]:
    """The (model, batch, prompt, gen) of the run, sorted."""
    return sorted({(r["model"], r["batch"], r["prompt"], r["gen"]) for r in records})


def target_ratios(records: list[dict]) -> list[dict[str, Any]]:
    """At k = 4: diffusion (prefix cache, CUDA graphs when measured) against the AR baseline
    and against the reference path, for every (model, batch, prompt, gen) of the run; each
    ratio is taken per round (paired) and given as median with its quartiles and min-max."""
    out = []
    for model, b, p, g in configs(records):
        sel = {"model": model, "batch": b, "prompt": p, "gen": g}
        ours = ok_records(
            records, method="diffusion-prefix-graphs", tokens_per_step=TARGET_K, **sel
        ) or ok_records(records, method="diffusion-prefix", tokens_per_step=TARGET_K, **sel)
        ref = ok_records(records, method="reference", tokens_per_step=TARGET_K, **sel)
        row: dict[str, Any] = dict(
            sel,
            k=TARGET_K,
            is_target_config=sel == TARGET_CONFIG,
            ours=ours[0]["method"] if ours else None,
        )
        if ours and ours[0].get("vs_ar_stats"):
            row["vs_ar"] = ours[0]["vs_ar"]
            row["vs_ar_stats"] = ours[0]["vs_ar_stats"]
            row["ar_baseline"] = ours[0]["vs_ar_baseline"]
        if ours and ref:
            speed = spread_stats(paired_speedups(ref[0]["wall_s_rounds"], ours[0]["wall_s_rounds"]))
            row["vs_reference"] = speed["median"]
            row["vs_reference_stats"] = speed
        out.append(row)
    return out


def spread_text(stats: Optional[dict[str, float]], digits: int = 2, unit: str = "x") -> str:
    """``median [q1-q3]`` of a statistics dict ("-" without one)."""
    if not stats:
        return "-"
    d = digits
    return f"{stats['median']:.{d}f}{unit} [{stats['q1']:.{d}f}-{stats['q3']:.{d}f}]"


def ceiling_line(name: str, weight_bytes: int, copy_gbps: float) -> str:
    steps = copy_gbps * 1e9 / weight_bytes
    return (
        f"{name}: physical ceiling = {weight_bytes / 1e9:.3g} GB of weights read per step / "
        f"{copy_gbps:.1f} GB/s copy bandwidth = {steps:.1f} steps/s; x tokens per step x "
        "batch = ceiling tokens/s"
    )


def record_line(r: dict[str, Any]) -> str:
    """One console line per record: tokens/s and the paired speed vs AR, median [IQR]."""
    head = (
        f"{r['model']:>4} B={r['batch']:<2} P={r['prompt']:<4} G={r['gen']:<4} "
        f"{r['method']:<24} k={r['tokens_per_step']}"
    )
    if r["status"] != "ok":
        return f"{head}  {r['status']}"
    return (
        f"{head}  {spread_text(r['tokens_per_s_stats'], 1, ''):>22} tok/s  "
        f"{r['ms_per_step']:8.2f} ms/step  vs AR {spread_text(r.get('vs_ar_stats'), 2):<20} "
        f"{100 * r['fraction_of_ceiling']:5.1f}% of ceiling"
    )


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    """The closing console lines: the ratios at k = 4 against the targets."""
    lines = [f"\nk = {TARGET_K} tokens/step, diffusion (prefix cache, + CUDA graphs when run):"]
    for t in targets:
        cfg = f"  {t['model']} B={t['batch']} P={t['prompt']} G={t['gen']}" + (
            " [target config]" if t["is_target_config"] else ""
        )
        lines.append(
            f"{cfg}: {t['ours']} vs AR {spread_text(t.get('vs_ar_stats'))} (target >= "
            f"{TARGET_VS_AR:g}x), vs reference {spread_text(t.get('vs_reference_stats'))} "
            f"(target >= {TARGET_VS_REFERENCE:g}x)"
        )
    return lines


def _iqr(stats: Optional[dict[str, float]], digits: int) -> str:
    return "-" if not stats else f"{stats['q1']:.{digits}f}-{stats['q3']:.{digits}f}"


def _minmax(stats: Optional[dict[str, float]], digits: int) -> str:
    return "-" if not stats else f"{stats['min']:.{digits}f}-{stats['max']:.{digits}f}"


RECORD_COLUMNS = [
    "model",
    "B",
    "prompt",
    "gen",
    "method",
    "tok/step",
    "steps",
    "tokens/s",
    "tokens/s IQR",
    "ms/step",
    "vs AR",
    "vs AR IQR",
    "vs AR min-max",
    "peak MiB",
    "ceiling tok/s",
    "of ceiling",
    "status",
]


def record_row(r: dict[str, Any]) -> list[Any]:
    head = [r["model"], r["batch"], r["prompt"], r["gen"], r["method"]]
    head += [r["tokens_per_step"], r["steps"]]
    if r["status"] != "ok":
        return head + ["-"] * (len(RECORD_COLUMNS) - len(head) - 1) + [r["status"]]
    speed = r.get("vs_ar_stats")
    return head + [
        r["tokens_per_s"],
        _iqr(r["tokens_per_s_stats"], 1),
        r["ms_per_step"],
        "-" if speed is None else f"{speed['median']:.2f}x",
        _iqr(speed, 2),
        _minmax(speed, 2),
        r["peak_mem_bytes"] / 2**20,
        r["ceiling_tokens_per_s"],
        f"{100 * r['fraction_of_ceiling']:.1f}%",
        "ok" if r.get("matches_eager_sampler") is not False else "ok (graphs decode differently)",
    ]


def _verdict(stats: Optional[dict[str, float]], target: float) -> str:
    if not stats:
        return "-"
    met = "met" if stats["median"] >= target else f"below {target:g}x"
    return f"{spread_text(stats)}, min-max {_minmax(stats, 2)} ({met})"


def _header(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    env = ", ".join(f"{k}={v}" for k, v in meta.get("env", {}).items()) or "none set"
    return [
        f"# Decoding throughput ({result['grid']} grid, {meta['device_type']})",
        "",
        f"- device: {meta['device']}",
        f"- commit: `{meta['commit']}`, date: {meta['date']}, torch {meta['torch']}",
        f"- thread variables: {env}; the machine is shared, so every figure comes from "
        "interleaved rounds",
        f"- dtype {result['dtype']}, block length {result['block_length']}; per grid point "
        f"every runner (each AR method, each diffusion method at each k) is warmed up, then "
        f"timed in {result['repeats']} interleaved rounds (round r runs every runner once, "
        "in an order rotated by r)",
        "- tokens/s: median over the rounds, with its interquartile range (IQR); ms/step: "
        "median wall time / steps. vs AR: per round, AR baseline time / method time (paired "
        "in the same round; above 1 = faster than AR), median, IQR and min-max over the "
        "rounds. The AR baseline is `ar` (on a CPU its step is eager)",
        f"- {RANDOM_WEIGHTS_NOTE}",
        f"- copy bandwidth measured in this run: {result['copy_gbps']:.1f} GB/s; "
        f"matmul: {result['matmul_tflops']:.2f} TFLOP/s ({result['matmul_dtype']})",
        "- physical ceiling: every step reads all weights once (the embedding table "
        "excepted), so max steps/s = copy bandwidth / weight bytes, and ceiling tokens/s = "
        "max steps/s x tokens per step x batch; of ceiling = median tokens/s / ceiling",
        "- tokens/s counts answer tokens of the whole batch over the whole generation "
        "(prefill included)",
        f"- run time: {result.get('wall_s', 0):.0f} s",
        "",
    ]


def render_markdown(result: dict[str, Any]) -> str:
    """The report: header, one row per record, the target ratios, notes, plots."""
    lines = _header(result)
    if result.get("note"):
        lines.insert(-1, result["note"])  # the last item of the header's list
    lines.append(markdown_table(RECORD_COLUMNS, [record_row(r) for r in result["records"]]))
    lines += [
        "## Targets",
        "",
        f"Target configuration: {TARGET_CONFIG['model']} dims, batch "
        f"{TARGET_CONFIG['batch']}, prompt {TARGET_CONFIG['prompt']}, gen "
        f"{TARGET_CONFIG['gen']}, bf16 on H100/H200, k = {TARGET_K} tokens/step: "
        f"diffusion with prefix cache + CUDA graphs >= {TARGET_VS_AR:g}x the AR baseline "
        f"and >= {TARGET_VS_REFERENCE:g}x the reference path. Ratios are paired per round: "
        "median [IQR], min-max.",
        "",
    ]
    trows = [
        [
            f"{t['model']} B={t['batch']} P={t['prompt']} G={t['gen']}"
            + (" (target)" if t["is_target_config"] else ""),
            t["ours"] or "-",
            _verdict(t.get("vs_ar_stats"), TARGET_VS_AR),
            _verdict(t.get("vs_reference_stats"), TARGET_VS_REFERENCE),
        ]
        for t in result["targets"]
    ]
    lines.append(
        markdown_table(["configuration", "diffusion method", "vs AR", "vs reference"], trows)
    )
    if not any(t["is_target_config"] for t in result["targets"]):
        lines.append(
            "The target configuration is not part of this grid; the ratios above are "
            "informational.\n"
        )
    if result.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]] + [""]
    if result.get("plot_note"):
        lines += [result["plot_note"], ""]
    return "\n".join(lines)
