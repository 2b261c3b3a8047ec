"""Plots of the throughput benchmark (matplotlib, optional).

Per (model, batch, prompt, gen): on the left tokens/s against tokens per step, one line per
diffusion method (median over the interleaved rounds, the bars span the interquartile
range), the AR methods as horizontal lines with their IQR as a band, and the weight-read
ceiling; on the right the speed against the AR baseline, paired per round (median, IQR
bars). When an ``attention_cuda*.json`` is at hand, attention TFLOP/s against sequence
length too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS_DIR  # noqa: E402
from throughput_report import configs, ok_records  # noqa: E402
from throughput_setup import DIFFUSION_METHODS  # noqa: E402

AR_STYLES = (("ar", "--"), ("ar-eager", ":"), ("hf", "-."))


def _load_attention_json(path: Path) -> list[tuple[str, list[float], list[float]]]:
    """Series (label, seq lens, TFLOP/s) from the attention benchmark's JSON, read loosely:
    records with a sequence-length key and either one ``tflops`` + an implementation name or
    several ``*tflops*`` keys."""
    data = json.loads(path.read_text())
    recs: Any = data
    if isinstance(data, dict):
        for key in ("records", "results", "rows", "cases", "runs", "data"):
            if isinstance(data.get(key), list):
                recs = data[key]
                break
    if not isinstance(recs, list):
        return []
    seq_keys = ("seq_len", "seqlen", "S", "s", "Sk", "Sq", "seq", "L", "length")
    # fields that name a series (not "batch": at a fixed token budget it varies with seq)
    tags = ("pass", "direction", "mode", "kind", "dtype", "D", "head_dim", "H", "heads")
    series: dict[str, dict[float, float]] = {}
    for r in recs:
        if not isinstance(r, dict):
            continue
        seq = next((r[k] for k in seq_keys if isinstance(r.get(k), (int, float))), None)
        if seq is None:
            continue
        tag = " ".join(f"{k}={r[k]}" for k in tags if k in r and not isinstance(r[k], dict))
        name = next((str(r[k]) for k in ("impl", "method", "name", "backend") if k in r), "")
        for key, val in r.items():
            if "tflops" in key.lower() and isinstance(val, (int, float)) and val > 0:
                label = " ".join(
                    x for x in (name, key if key.lower() != "tflops" else "", tag) if x
                )
                series.setdefault(label or key, {})[float(seq)] = float(val)
    return [(lab, sorted(pts), [pts[s] for s in sorted(pts)]) for lab, pts in series.items() if pts]


def latest_attention_json(out: Path) -> Optional[Path]:
    """Newest ``attention_cuda*.json`` (written by bench_attention_cuda.py) in ``out`` or in
    the default results folder."""
    found = [p for d in dict.fromkeys((out, RESULTS_DIR)) for p in d.glob("attention_cuda*.json")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _errorbar(ax: Any, recs: list[dict], key: str, label: str) -> bool:
    """Median and IQR bars of ``recs[*][key]`` (a statistics dict) against k."""
    pts = sorted((r["tokens_per_step"], r[key]) for r in recs if r.get(key))
    if not pts:
        return False
    xs = [x for x, _ in pts]
    med = [s["median"] for _, s in pts]
    err = [[s["median"] - s["q1"] for _, s in pts], [s["q3"] - s["median"] for _, s in pts]]
    ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=label)
    return True


def _throughput_axes(ax: Any, recs: list[dict], sel: dict[str, Any]) -> bool:
    drew = False
    for mt in DIFFUSION_METHODS:
        drew |= _errorbar(ax, ok_records(recs, method=mt, **sel), "tokens_per_s_stats", mt)
    for mt, style in AR_STYLES:
        rr = ok_records(recs, method=mt, **sel)
        if rr:
            s = rr[0]["tokens_per_s_stats"]
            line = ax.axhline(s["median"], color="k", linestyle=style, label=f"{mt} (KV cache)")
            ax.axhspan(s["q1"], s["q3"], color=line.get_color(), alpha=0.08)
            drew = True
    ceil = sorted(
        {
            (r["tokens_per_step"], r["ceiling_tokens_per_s"])
            for r in ok_records(recs, **sel)
            if r["method"] in DIFFUSION_METHODS
        }
    )
    if ceil:
        xs, ys = [x for x, _ in ceil], [y for _, y in ceil]
        ax.plot(xs, ys, color="0.6", linestyle="--", label="weight-read ceiling")
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (answer tokens of the batch)")
    return drew


def _ratio_axes(ax: Any, recs: list[dict], sel: dict[str, Any]) -> None:
    base = next((r.get("vs_ar_baseline") for r in ok_records(recs, **sel) if r.get("vs_ar")), None)
    for mt in DIFFUSION_METHODS:
        _errorbar(ax, ok_records(recs, method=mt, **sel), "vs_ar_stats", mt)
    ax.axhline(1.0, color="k", linestyle="--", label=f"{base or 'AR'} (= 1)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"speed vs {base or 'AR'} (paired per round)")


def _k_axis(ax: Any, ks: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, labels=[str(k) for k in ks])
    ax.set_xlabel("tokens per step (k)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _attention_plot(plt: Any, path: Path, out: Path, stem: str) -> Optional[str]:
    try:
        series = _load_attention_json(path)
    except (OSError, ValueError) as e:
        print(f"could not read {path}: {e}")
        return None
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lab, xs, ys in series:
        ax.plot(xs, ys, marker="o", label=lab)
    ax.set_xscale("log", base=2)
    seqs = sorted({int(x) for _, xs, _ in series for x in xs})
    ax.set_xticks(seqs, labels=[str(x) for x in seqs])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"attention kernel vs SDPA ({path.name})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    png = out / f"attention_tflops_vs_seqlen_{stem}.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return str(png)


def make_plots(
    result: dict[str, Any], out: Path, stem: str, attention_json: Optional[Path]
) -> tuple[list[str], Optional[str]]:
    """PNG plots; returns (paths, note). Without matplotlib: no plots and a clear note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], (
            "plots skipped: matplotlib is not installed "
            "(pip install matplotlib, or the project's [bench] extra)"
        )
    paths: list[str] = []
    recs = result["records"]
    for model, b, p, g in configs(recs):
        sel = {"model": model, "batch": b, "prompt": p, "gen": g}
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
        if not _throughput_axes(left, recs, sel):
            plt.close(fig)
            continue
        _ratio_axes(right, recs, sel)
        ks = sorted({r["tokens_per_step"] for r in ok_records(recs, **sel)})
        _k_axis(left, ks)
        _k_axis(right, ks)
        fig.suptitle(
            f"{model} dims, batch {b}, prompt {p}, gen {g} ({result['meta']['device_type']}, "
            f"{result['dtype']}); median of {result['repeats']} interleaved rounds, bars: IQR",
            fontsize=10,
        )
        path = out / f"{stem}_{model}_b{b}_p{p}_g{g}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    if attention_json is not None and attention_json.is_file():
        png = _attention_plot(plt, attention_json, out, stem)
        if png:
            paths.append(png)
    return paths, None
