"""The result files of the benchmarks: JSON with every figure, markdown tables of them.

No torch here, so scripts that need no device (``ptxas_report.py``) share it too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented strict JSON (non-finite floats as null), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")


def fmt(value: Any, digits: int = 3) -> str:
    """Compact cell text for markdown tables."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 1000:
            return f"{value:,.0f}"
        if mag >= 1:
            return f"{value:.{max(digits - 1, 1)}f}" if mag < 10 else f"{value:.1f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_lines(
    headers: list[str], rows: Iterable[list[str]], align: Optional[str] = None
) -> list[str]:
    """The lines of a markdown table whose cells are already text.

    Parameters
    ----------
    headers : list of str
        Column titles.
    rows : iterable of list of str
        One list of cells per row (a row may have fewer cells than there are columns).
    align : str, optional
        One letter per column, ``"r"`` for right-aligned and ``"l"`` for left (the default).
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"{len(headers)} columns, {len(align)} alignment letters")
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "".join("---:|" if a == "r" else "---|" for a in align),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table of ``rows``, every cell formatted by :func:`fmt`, with a final newline."""
    return "\n".join(markdown_lines(headers, ([fmt(c) for c in r] for r in rows))) + "\n"


def write_result_files(out: Path, stem: str, data: dict[str, Any], markdown: str) -> Path:
    """Write ``out/<stem>.json`` (:func:`write_json`) and ``out/<stem>.md``; returns
    ``out/<stem>`` (the common stem, for the message naming both)."""
    write_json(out / f"{stem}.json", data)
    (out / f"{stem}.md").write_text(markdown)
    return out / stem
