#!/usr/bin/env python
"""Throughput of the CUDA attention kernels against PyTorch SDPA backends.

Non-causal attention in bfloat16 (default) at a fixed token budget (batch * seq = 16384,
hidden 2048 = 16 heads x 128), for sequence lengths 512 .. 8192. For each length it times
the forward and the backward of ``lx.attention`` and of
``torch.nn.functional.scaled_dot_product_attention`` under each SDPA backend that accepts the
problem (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION; a backend that errors is
reported as skipped), and reports TFLOP/s with forward FLOPs = 4 * b * h * s^2 * d and
backward FLOPs = 2.5 x forward, next to the measured bf16 matmul peak (a large
``torch.matmul``) and the fraction of it reached. Results go to
``benchmarks/results/attention_cuda_<device>_<date>.{json,md}``.

Usage::

    python benchmarks/bench_attention_cuda.py [--seqlens 512,1024,...] [--iters 20]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cuda_time_ms, git_commit  # noqa: E402
from bench_tables import markdown_lines, write_result_files  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TABLE_HEADERS = [
    "seq",
    "batch",
    "impl",
    "fwd ms",
    "fwd TFLOP/s",
    "fwd % peak",
    "bwd ms",
    "bwd TFLOP/s",
    "bwd % peak",
]
TABLE_ALIGN = "rrlrrrrrr"

# ---------------------------------------------------------------------------------------
# the implementations and their timing
# ---------------------------------------------------------------------------------------


def matmul_peak_tflops(dtype: torch.dtype, n: int, warmup: int, iters: int) -> float:
    """Measured dense matmul throughput (TFLOP/s) for an n x n x n product in ``dtype``."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_time_ms(lambda: torch.matmul(a, b), warmup, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def time_fwd_bwd(
    attn: Attn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    warmup: int,
    iters: int,
) -> tuple[float, float]:
    """Forward and backward times (ms) of ``attn`` on leaf copies of q, k, v.

    The backward is timed alone: one forward builds the graph, then ``backward`` runs
    repeatedly with ``retain_graph=True``.
    """
    with torch.no_grad():
        fwd_ms = cuda_time_ms(lambda: attn(q, k, v), warmup, iters)
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = attn(qg, kg, vg)
    dout = torch.randn_like(out)

    def bwd() -> None:
        qg.grad = kg.grad = vg.grad = None
        out.backward(dout, retain_graph=True)

    bwd_ms = cuda_time_ms(bwd, warmup, iters)
    return fwd_ms, bwd_ms


def sdpa_backends() -> dict[str, object]:
    """The SDPA backends this torch names, of FLASH, CUDNN and EFFICIENT attention."""
    from torch.nn.attention import SDPBackend

    names = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]
    return {n: getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def make_sdpa(backend: object) -> Attn:
    """SDPA restricted to one backend, taking and returning [B, S, H, D] tensors."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            o = scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
        return o.transpose(1, 2)

    return run


def implementations() -> dict[str, Attn]:
    """``lx.attention`` first, then SDPA under every backend this torch names."""
    import llada_ext as lx

    impls: dict[str, Attn] = {"llada_ext": lambda q, k, v: lx.attention(q, k, v)}
    for name, backend in sdpa_backends().items():
        impls[f"sdpa[{name}]"] = make_sdpa(backend)
    return impls


def bench_impl(
    name: str,
    fn: Attn,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    peak: float,
) -> dict[str, Any]:
    """The row of one implementation at one sequence length (``error`` where it cannot run)."""
    b, s = qkv[0].shape[:2]
    row: dict[str, Any] = {"seq": s, "batch": b, "impl": name}
    try:
        fwd_ms, bwd_ms = time_fwd_bwd(fn, *qkv, args.warmup, args.iters)
    except Exception as e:  # a backend that cannot run this problem is skipped
        row["error"] = re.sub(r"\s+", " ", str(e))[:120] or type(e).__name__
        print(f"seq {s:5d} {name:28s} skipped: {row['error']}")
        torch.cuda.synchronize()
        return row
    fwd_flops = 4 * b * args.heads * s * s * args.head_dim
    fwd_tf = fwd_flops / (fwd_ms * 1e-3) / 1e12
    bwd_tf = 2.5 * fwd_flops / (bwd_ms * 1e-3) / 1e12
    row.update(
        fwd_ms=fwd_ms,
        bwd_ms=bwd_ms,
        fwd_tflops=fwd_tf,
        bwd_tflops=bwd_tf,
        fwd_frac_peak=fwd_tf / peak,
        bwd_frac_peak=bwd_tf / peak,
    )
    print(f"seq {s:5d} {name:28s} fwd {fwd_tf:7.1f} TFLOP/s  bwd {bwd_tf:7.1f} TFLOP/s")
    return row


def bench_seqlens(
    args: argparse.Namespace, impls: dict[str, Attn], peak: float
) -> list[dict[str, Any]]:
    """Every implementation at every ``--seqlens`` length, batch = tokens // length."""
    dtype = getattr(torch, args.dtype)
    rows = []
    for s in (int(x) for x in args.seqlens.split(",")):
        b = max(1, args.tokens // s)
        shape = (b, s, args.heads, args.head_dim)
        q, k, v = (torch.randn(*shape, device="cuda", dtype=dtype) for _ in range(3))
        rows += [bench_impl(name, fn, (q, k, v), args, peak) for name, fn in impls.items()]
        del q, k, v
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------
# result files
# ---------------------------------------------------------------------------------------


def table_cells(r: dict[str, Any]) -> list[str]:
    """The markdown cells of one row (four for a skipped implementation)."""
    cells = [str(r["seq"]), str(r["batch"]), str(r["impl"])]
    if r.get("error"):
        return cells + [f"skipped: {r['error']}"]
    return cells + [
        f"{r['fwd_ms']:.3f}",
        f"{r['fwd_tflops']:.1f}",
        f"{100 * r['fwd_frac_peak']:.0f}%",
        f"{r['bwd_ms']:.3f}",
        f"{r['bwd_tflops']:.1f}",
        f"{100 * r['bwd_frac_peak']:.0f}%",
    ]


def to_markdown(meta: dict, rows: list[dict]) -> str:
    """The markdown report: the run's header, then one table row per (length, impl)."""
    lines = [
        f"# CUDA attention throughput ({meta['dtype']}, non-causal, head dim {meta['head_dim']})",
        "",
        f"- device: {meta['device']}",
        f"- date: {meta['date']}; git commit: {meta['git_commit']}",
        f"- torch {meta['torch']} (CUDA {meta['cuda']})",
        f"- tokens per step (batch x seq): {meta['tokens']}, heads: {meta['heads']}",
        f"- measured {meta['dtype']} matmul peak: {meta['matmul_peak_tflops']:.1f} TFLOP/s",
        "",
    ]
    lines += markdown_lines(TABLE_HEADERS, (table_cells(r) for r in rows), TABLE_ALIGN)
    return "\n".join(lines) + "\n"


def run_meta(args: argparse.Namespace, now: _dt.datetime, peak: float) -> dict[str, Any]:
    """The header of the result files."""
    return {
        "device": torch.cuda.get_device_name(),
        "git_commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "head_dim": args.head_dim,
        "heads": args.heads,
        "tokens": args.tokens,
        "matmul_peak_tflops": peak,
        "flops": "forward 4*b*h*s^2*d, backward 2.5x forward",
    }


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seqlens",
        default="512,1024,2048,4096,8192",
        help="comma-separated sequence lengths (default: %(default)s)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=16384,
        help="batch * seq per step; batch = tokens // seq (default: %(default)s)",
    )
    parser.add_argument("--heads", type=int, default=16, help="attention heads (default: 16)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs (default: 5)")
    parser.add_argument("--iters", type=int, default=20, help="timed runs (default: 20)")
    parser.add_argument(
        "--matmul-n",
        type=int,
        default=8192,
        help="size of the square matmul that measures peak (default: 8192)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="where the JSON and markdown results go",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status (1 without a CUDA device)."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_attention_cuda: no CUDA device is available (torch.cuda.is_available() is "
            "False); this benchmark only runs on a GPU. Nothing was measured.",
            file=sys.stderr,
        )
        return 1
    impls = implementations()
    peak = matmul_peak_tflops(getattr(torch, args.dtype), args.matmul_n, args.warmup, args.iters)
    rows = bench_seqlens(args, impls, peak)
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = run_meta(args, now, peak)
    device = re.sub(r"[^A-Za-z0-9]+", "_", meta["device"]).strip("_")
    stem = f"attention_cuda_{device}_{now:%Y%m%d}"
    write_result_files(args.out_dir, stem, {"meta": meta, "rows": rows}, to_markdown(meta, rows))
    print(f"peak matmul {peak:.1f} TFLOP/s; results in {args.out_dir / stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
