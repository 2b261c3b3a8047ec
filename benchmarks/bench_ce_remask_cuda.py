"""GPU benchmark of the masked cross-entropy and remask kernels against plain PyTorch.

Masked CE: N rows of the LLaDA vocabulary in bfloat16, half of them masked (weight != 0),
forward + backward through ``lx.masked_cross_entropy`` (and through the raw kernels with an
in-place gradient) versus ``F.cross_entropy(reduction="none") * weights`` over every row.

Remask: one sampling step for B sequences of a W-token window, versus the step of the public
LLaDA sampler written in plain torch (argmax or float64 Gumbel noise, softmax, gather, a topk
per row).

Every throughput is reported as GB/s of logits traffic next to the device-to-device copy
bandwidth measured in the same run. Results go to ``benchmarks/results/`` (or ``--out``) as
JSON and markdown, with the device name, git commit, date and torch version.

Usage: ``python benchmarks/bench_ce_remask_cuda.py [--quick] [--out DIR]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import (  # noqa: E402
    RESULTS_DIR,
    measure_copy_gbps,
    run_metadata,
    time_fn,
    torch_gumbel_step,
    torch_remask_step,
)
from bench_tables import markdown_table, write_result_files  # noqa: E402

VOCAB = 126464
MASK_ID = 126336

CE_COLUMNS = [
    "N",
    "V",
    "mask ratio",
    "ours ms",
    "ours in-place ms",
    "torch ms",
    "speedup",
    "fwd GB/s",
    "in-place GB/s",
    "in-place / copy",
]
CE_KEYS = [
    "N",
    "V",
    "mask_ratio",
    "ours_fwd_bwd_ms",
    "ours_inplace_fwd_bwd_ms",
    "torch_fwd_bwd_ms",
    "speedup_vs_torch",
    "fwd_gbps",
    "inplace_fwd_bwd_gbps",
    "inplace_frac_of_copy",
]
REMASK_COLUMNS = ["B", "W", "T", "ours ms", "torch ms", "speedup", "logits GB/s", "/ copy"]
REMASK_KEYS = [
    "B",
    "W",
    "temperature",
    "ours_ms",
    "torch_ms",
    "speedup_vs_torch",
    "logits_read_gbps",
    "frac_of_copy",
]


def _free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _timed_or_oom(fn: Callable[[], Any], device: torch.device, reps: int) -> Optional[float]:
    """Median seconds of fn, or None when it runs out of device memory."""
    try:
        return time_fn(fn, device, warmup=1, reps=reps, min_time=0.2 if reps > 3 else 0.0)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _ms(sec: Optional[float]) -> Optional[float]:
    return sec * 1e3 if sec else None


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if (num and den) else None


def _gbps(nbytes: int, sec: Optional[float]) -> Optional[float]:
    return nbytes / sec / 1e9 if sec else None


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


def masked_ce_inputs(
    device: torch.device, N: int, V: int, ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """bf16 logits [N, V], targets, weights (1/ratio on the active rows, 0 elsewhere) and the
    number of active rows."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N, V, device=device, dtype=torch.bfloat16, generator=gen)
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    active = torch.rand(N, device=device, generator=gen) < ratio
    weights = torch.where(active, 1.0 / ratio, 0.0).float()
    return logits, targets, weights, int(active.sum())


def masked_ce_callables(
    lx, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """The timed calls, by name: ``ours`` (autograd), ``ours_inplace`` (raw kernels, the
    gradient written over a copy of the logits), ``ours_fwd`` (forward kernel alone) and
    ``reference`` (``F.cross_entropy`` over every row)."""
    from llada_ext import _C
    from llada_ext._views import stream_of, view

    N = logits.shape[0]
    device = logits.device

    def ours() -> None:
        leaf = logits.detach().requires_grad_(True)
        lx.masked_cross_entropy(leaf, targets, weights).backward()

    loss = torch.empty(N, device=device)
    lse = torch.empty(N, device=device)
    ones = torch.ones(N, device=device)
    work = logits.clone()
    stream = stream_of(work)

    def ours_inplace() -> None:
        # forward, then the gradient written over the logits (as a training step would)
        _C.masked_ce_fwd(view(work), view(targets), view(weights), view(loss), view(lse), stream)
        _C.masked_ce_bwd(
            view(work), view(targets), view(weights), view(lse), view(ones), view(work), stream
        )

    def reference() -> None:
        leaf = logits.detach().requires_grad_(True)
        (F.cross_entropy(leaf, targets, reduction="none") * weights).sum().backward()

    def ours_fwd() -> None:
        _C.masked_ce_fwd(view(logits), view(targets), view(weights), view(loss), view(lse), stream)

    return {
        "ours": ours,
        "ours_inplace": ours_inplace,
        "ours_fwd": ours_fwd,
        "reference": reference,
    }


def bench_masked_ce(
    lx, device: torch.device, N: int, V: int, ratio: float, reps: int, copy_gbps: float
) -> dict[str, Any]:
    """Forward + backward of the masked loss; GB/s counts the bytes the kernels must move."""
    logits, targets, weights, n_active = masked_ce_inputs(device, N, V, ratio)
    fns = masked_ce_callables(lx, logits, targets, weights)
    t = {name: _timed_or_oom(fn, device, reps) for name, fn in fns.items()}
    t_ours, t_inplace, t_fwd, t_ref = t["ours"], t["ours_inplace"], t["ours_fwd"], t["reference"]

    # Bytes the kernels must move: the forward reads the active rows; the backward reads
    # them again and writes every row (zeros for the inactive ones).
    row_bytes = V * logits.element_size()
    fwd_gbps = _gbps(n_active * row_bytes, t_fwd)
    inplace_gbps = _gbps(2 * n_active * row_bytes + N * row_bytes, t_inplace)
    return {
        "N": N,
        "V": V,
        "dtype": "bfloat16",
        "mask_ratio": ratio,
        "active_rows": n_active,
        "ours_fwd_bwd_ms": _ms(t_ours),
        "ours_inplace_fwd_bwd_ms": _ms(t_inplace),
        "ours_fwd_ms": _ms(t_fwd),
        "torch_fwd_bwd_ms": _ms(t_ref),
        "speedup_vs_torch": _ratio(t_ref, t_ours),
        "speedup_inplace_vs_torch": _ratio(t_ref, t_inplace),
        "fwd_gbps": fwd_gbps,
        "inplace_fwd_bwd_gbps": inplace_gbps,
        "copy_gbps": copy_gbps,
        "fwd_frac_of_copy": fwd_gbps / copy_gbps if fwd_gbps else None,
        "inplace_frac_of_copy": inplace_gbps / copy_gbps if inplace_gbps else None,
    }


# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


def bench_remask(
    lx,
    device: torch.device,
    B: int,
    W: int,
    V: int,
    temperature: float,
    reps: int,
    copy_gbps: float,
) -> dict[str, Any]:
    """One remask step over a fresh (fully masked) block against the plain-torch step."""
    gen = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(B, W, V, device=device, dtype=torch.bfloat16, generator=gen) * 4
    x = torch.full((B, W), MASK_ID, dtype=torch.int64, device=device)  # a fresh block
    k = max(1, W // 8)
    nt = torch.full((B,), k, dtype=torch.int64, device=device)
    rgen = torch.Generator(device=device).manual_seed(2)

    def ours() -> None:
        lx.remask(logits, x, nt, mask_id=MASK_ID, temperature=temperature, generator=rgen)

    if temperature > 0:

        def ref() -> None:
            torch_gumbel_step(logits, x, nt, MASK_ID, temperature)

        # float64 logits + noise + quotient, bf16 -> float softmax: ~5 float64 copies
        ref_bytes = logits.numel() * (5 * 8 + 2 * 4)
    else:

        def ref() -> None:
            torch_remask_step(logits, x, nt, MASK_ID)

        ref_bytes = logits.numel() * 3 * 4
    t_ours = _timed_or_oom(ours, device, reps)
    t_ref = (
        _timed_or_oom(ref, device, max(1, reps // 2))
        if ref_bytes < 0.8 * _free_bytes(device)
        else None
    )
    gbps = _gbps(logits.numel() * logits.element_size(), t_ours)
    return {
        "B": B,
        "W": W,
        "V": V,
        "temperature": temperature,
        "dtype": "bfloat16",
        "ours_ms": _ms(t_ours),
        "torch_ms": _ms(t_ref),
        "speedup_vs_torch": _ratio(t_ref, t_ours),
        "logits_read_gbps": gbps,
        "frac_of_copy": gbps / copy_gbps if gbps else None,
    }


def remask_shapes(quick: bool) -> list[tuple[int, int, float]]:
    """(B, W, temperature) of the remask rows: B in {1, 8, 32} ({1, 8} with ``quick``, which
    also leaves out the sampled steps of windows over 256)."""
    Bs = (1, 8) if quick else (1, 8, 32)
    return [
        (B, W, T)
        for B in Bs
        for W in (32, 256, 1024)
        for T in (0.0, 1.0)
        if not (quick and T > 0 and W > 256)
    ]


# ---------------------------------------------------------------------------------------
# result files
# ---------------------------------------------------------------------------------------


def render_markdown(
    meta: dict[str, Any], copy_gbps: float, ce: dict[str, Any], remask_rows: list[dict[str, Any]]
) -> str:
    """The markdown report: a header, the masked CE table and the remask table."""
    md = [
        f"# Masked CE and remask on {meta['device']}\n",
        f"commit {meta['commit']}, {meta['date']}, torch {meta['torch']}, "
        f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)\n",
        "## Masked cross-entropy (bf16, fwd + bwd)\n",
        markdown_table(CE_COLUMNS, [[ce[k] for k in CE_KEYS]]),
        "\n## Remask step (bf16 logits, every window position a candidate)\n",
        markdown_table(REMASK_COLUMNS, [[r[k] for k in REMASK_KEYS] for r in remask_rows]),
    ]
    return "\n".join(md)


def write_results(
    out: Path,
    meta: dict[str, Any],
    copy_gbps: float,
    ce: dict[str, Any],
    remask_rows: list[dict[str, Any]],
    quick: bool,
) -> None:
    """Writes ``ce_remask_cuda.json`` and ``ce_remask_cuda.md`` into ``out``."""
    result = {
        "meta": meta,
        "copy_gbps": copy_gbps,
        "masked_ce": ce,
        "remask": remask_rows,
        "quick": quick,
    }
    write_result_files(
        out, "ce_remask_cuda", result, render_markdown(meta, copy_gbps, ce, remask_rows)
    )


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """Runs both benchmarks and writes ``ce_remask_cuda.{json,md}``.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (``--quick``, ``--out DIR``).

    Returns
    -------
    int
        0 on success or when there is no GPU (nothing to measure).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions and shapes (B in {1, 8}, no W=1024 at B=32)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="directory for ce_remask_cuda.json / .md (default: %(default)s)",
    )
    ap.add_argument("--rows", type=int, default=8192, help="masked CE rows N (default 8192)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_ce_remask_cuda: no CUDA device, nothing to measure")
        return 0
    import llada_ext as lx

    if not lx.has_cuda_kernels():
        print("bench_ce_remask_cuda: llada_ext was built without CUDA kernels")
        return 0
    device = torch.device("cuda")
    reps = 3 if args.quick else 10
    meta = run_metadata(device)
    copy_gbps = measure_copy_gbps(device)
    print(f"[bench] {meta['device']}  copy {copy_gbps:.0f} GB/s")

    ce = bench_masked_ce(lx, device, args.rows, VOCAB, 0.5, reps, copy_gbps)
    print(f"[bench] masked CE: {ce}")
    torch.cuda.empty_cache()

    remask_rows = []
    for B, W, T in remask_shapes(args.quick):
        r = bench_remask(lx, device, B, W, VOCAB, T, reps, copy_gbps)
        print(f"[bench] remask: {r}")
        remask_rows.append(r)
        torch.cuda.empty_cache()

    out = Path(args.out)
    write_results(out, meta, copy_gbps, ce, remask_rows, args.quick)
    print(f"[bench] wrote {out / 'ce_remask_cuda.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
