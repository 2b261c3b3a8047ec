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
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cuda_time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds, measured with CUDA events.

    Parameters
    ----------
    fn : callable
        The work to time; it must only enqueue work on the current stream.
    warmup, iters : int
        Untimed and timed repetitions.

    Returns
    -------
    float
        Median over ``iters`` runs, in milliseconds.
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


def matmul_peak_tflops(dtype: torch.dtype, n: int, warmup: int, iters: int) -> float:
    """Measured dense matmul throughput (TFLOP/s) for an n x n x n product in ``dtype``."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_time_ms(lambda: torch.matmul(a, b), warmup, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def time_fwd_bwd(
    attn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
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
    from torch.nn.attention import SDPBackend

    names = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]
    return {n: getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def make_sdpa(
    backend: object,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
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


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# CUDA attention throughput ({meta['dtype']}, non-causal, head dim {meta['head_dim']})",
        "",
        f"- device: {meta['device']}",
        f"- date: {meta['date']}; git commit: {meta['git_commit']}",
        f"- torch {meta['torch']} (CUDA {meta['cuda']})",
        f"- tokens per step (batch x seq): {meta['tokens']}, heads: {meta['heads']}",
        f"- measured {meta['dtype']} matmul peak: {meta['matmul_peak_tflops']:.1f} TFLOP/s",
        "",
        "| seq | batch | impl | fwd ms | fwd TFLOP/s | fwd % peak | bwd ms | bwd TFLOP/s "
        "| bwd % peak |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['seq']} | {r['batch']} | {r['impl']} | skipped: {r['error']} |")
            continue
        lines.append(
            f"| {r['seq']} | {r['batch']} | {r['impl']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_tflops']:.1f} | {100 * r['fwd_frac_peak']:.0f}% | {r['bwd_ms']:.3f} | "
            f"{r['bwd_tflops']:.1f} | {100 * r['bwd_frac_peak']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status (1 without a CUDA device)."""
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
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "bench_attention_cuda: no CUDA device is available (torch.cuda.is_available() is "
            "False); this benchmark only runs on a GPU. Nothing was measured.",
            file=sys.stderr,
        )
        return 1

    import llada_ext as lx

    dtype = getattr(torch, args.dtype)
    h, d = args.heads, args.head_dim
    peak = matmul_peak_tflops(dtype, args.matmul_n, args.warmup, args.iters)
    impls: dict[str, Callable] = {"llada_ext": lambda q, k, v: lx.attention(q, k, v)}
    for name, backend in sdpa_backends().items():
        impls[f"sdpa[{name}]"] = make_sdpa(backend)

    rows = []
    for s in (int(x) for x in args.seqlens.split(",")):
        b = max(1, args.tokens // s)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
        fwd_flops = 4 * b * h * s * s * d
        for name, fn in impls.items():
            row = {"seq": s, "batch": b, "impl": name}
            try:
                fwd_ms, bwd_ms = time_fwd_bwd(fn, q, k, v, args.warmup, args.iters)
            except Exception as e:  # a backend that cannot run this problem is skipped
                row["error"] = re.sub(r"\s+", " ", str(e))[:120] or type(e).__name__
                print(f"seq {s:5d} {name:28s} skipped: {row['error']}")
                rows.append(row)
                torch.cuda.synchronize()
                continue
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
            rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()

    now = _dt.datetime.now(_dt.timezone.utc)
    device = torch.cuda.get_device_name()
    meta = {
        "device": device,
        "git_commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "head_dim": d,
        "heads": h,
        "tokens": args.tokens,
        "matmul_peak_tflops": peak,
        "flops": "forward 4*b*h*s^2*d, backward 2.5x forward",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"attention_cuda_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}_{now:%Y%m%d}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out_dir / f"{stem}.md").write_text(to_markdown(meta, rows))
    print(f"peak matmul {peak:.1f} TFLOP/s; results in {args.out_dir / stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
