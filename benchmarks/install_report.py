"""The report of ``install_paths.py``: one table row per install path and thread setting,
whether the paths agree within noise, each path's ``build_info()`` and its commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tables import markdown_table  # noqa: E402
from install_envs import BUILD_ENV  # noqa: E402

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


def _header(meta: dict[str, Any]) -> list[str]:
    s = meta["size"]
    env = ", ".join(f"{k}={v}" for k, v in meta["env"].items()) or "no OMP_* variables set"
    return [
        "# CPU attention speed by install path\n",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}, commit: `{meta['commit']}`",
        f"- python {meta['python']}, torch {meta['torch']}, {meta['platform']}",
        f"- case: lx.attention forward vs torch SDPA, B={s['batch']} H={s['heads']} "
        f"S={s['seq']} D={s['dim']} float32, {meta['repeats']} alternating pairs per "
        "thread setting (lx, SDPA, SDPA, lx, ...), after 3 untimed calls of each",
        "- build: " + ", ".join(f"{k}={v}" for k, v in BUILD_ENV.items()) + " (CPU only)",
        f"- environment: {env}",
        "- lx/SDPA speed: SDPA time / lx time of each pair (above 1: lx is faster); the "
        "median, its interquartile range and its min-max over the pairs. lx ms and SDPA ms: "
        "medians. threads: the setting (torch's thread count in parentheses); 1 = "
        "OMP_NUM_THREADS=1, default = the variable unset. install s: the install commands "
        "(dependencies included; venv creation and the copy of the checkout not counted). "
        "load: the 1-minute load average when the measurement started (the machine's other "
        f"work; {meta['loadavg_start']} at the start of the run, {meta.get('loadavg_end')} at "
        "its end).\n",
    ]


def _verdict_table(verdicts: list[dict[str, Any]]) -> str:
    rows = [
        [
            v["threads"],
            str(len(v["paths"])),
            f"{v['median_min']:.3f}-{v['median_max']:.3f}",
            f"{v['spread']:.3f}",
            f"{v['widest_iqr']:.3f}",
            "within noise" if v["within_noise"] else "larger than the noise",
        ]
        for v in verdicts
    ]
    return (
        "\n## Same speed within noise?\n\n"
        "Spread of the median lx/SDPA speeds across the paths, against the widest "
        "interquartile range among them.\n\n"
        + markdown_table(["threads", "paths", "medians", "spread", "widest IQR", "verdict"], rows)
    )


def _commands_table(records: list[dict[str, Any]]) -> str:
    rows = [
        [
            r["path"],
            f"`{r['commands']}`",
            r.get("torch_from", "-"),
            ", ".join(f"{s['name']} {s['seconds']:.0f}" for s in r["steps"]) or "-",
        ]
        for r in records
    ]
    return "\n## Commands\n\n" + markdown_table(["path", "commands", "torch", "steps (s)"], rows)


def render_markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The whole report: header, the timing table, the noise verdicts, build_info() per path,
    the commands, and the end of the log of every failed path."""
    parts = _header(meta) + [markdown_table(TABLE_COLUMNS, table_rows(records))]
    verdicts = noise_verdicts(records)
    if verdicts:
        parts.append(_verdict_table(verdicts))
    bi_rows = build_info_rows(records)
    if bi_rows:
        parts.append("\n## build_info() per path\n")
        parts.append(
            markdown_table(
                ["path", "commit", "compiler", "CUDA", "OpenMP", "BLAS", "llada_ext from"],
                bi_rows,
            )
        )
    parts.append(_commands_table(records))
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        parts.append("\n## Failures\n")
        for r in failed:
            parts.append(f"### {r['path']} (step: {r.get('failed_step')})\n")
            parts.append("```\n" + (r.get("error") or "") + "\n```\n")
    return "\n".join(parts)
