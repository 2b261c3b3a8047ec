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
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import (  # noqa: E402
    RESULTS_DIR,
    markdown_table,
    measure_copy_gbps,
    run_metadata,
    time_fn,
    torch_remask_step,
    write_json,
)

VOCAB = 126464
MASK_ID = 126336


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


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


def bench_masked_ce(
    lx, device: torch.device, N: int, V: int, ratio: float, reps: int, copy_gbps: float
) -> dict[str, Any]:
    """Forward + backward of the masked loss; GB/s counts the bytes the kernels must move."""
    from llada_ext import _C
    from llada_ext._views import stream_of, view

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N, V, device=device, dtype=torch.bfloat16, generator=gen)
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    active = torch.rand(N, device=device, generator=gen) < ratio
    weights = torch.where(active, 1.0 / ratio, 0.0).float()
    n_active = int(active.sum())

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

    t_ours = _timed_or_oom(ours, device, reps)
    t_inplace = _timed_or_oom(ours_inplace, device, reps)
    t_fwd = _timed_or_oom(ours_fwd, device, reps)
    t_ref = _timed_or_oom(reference, device, reps)

    # Bytes the kernels must move: the forward reads the active rows; the backward reads
    # them again and writes every row (zeros for the inactive ones).
    row_bytes = V * logits.element_size()
    fwd_bytes = n_active * row_bytes
    fwdbwd_bytes = 2 * n_active * row_bytes + N * row_bytes

    def gbps(nbytes: int, sec: Optional[float]) -> Optional[float]:
        return nbytes / sec / 1e9 if sec else None

    res = {
        "N": N,
        "V": V,
        "dtype": "bfloat16",
        "mask_ratio": ratio,
        "active_rows": n_active,
        "ours_fwd_bwd_ms": t_ours * 1e3 if t_ours else None,
        "ours_inplace_fwd_bwd_ms": t_inplace * 1e3 if t_inplace else None,
        "ours_fwd_ms": t_fwd * 1e3 if t_fwd else None,
        "torch_fwd_bwd_ms": t_ref * 1e3 if t_ref else None,
        "speedup_vs_torch": (t_ref / t_ours) if (t_ref and t_ours) else None,
        "speedup_inplace_vs_torch": (t_ref / t_inplace) if (t_ref and t_inplace) else None,
        "fwd_gbps": gbps(fwd_bytes, t_fwd),
        "inplace_fwd_bwd_gbps": gbps(fwdbwd_bytes, t_inplace),
        "copy_gbps": copy_gbps,
    }
    res["fwd_frac_of_copy"] = res["fwd_gbps"] / copy_gbps if res["fwd_gbps"] else None
    res["inplace_frac_of_copy"] = (
        res["inplace_fwd_bwd_gbps"] / copy_gbps if res["inplace_fwd_bwd_gbps"] else None
    )
    return res


# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


def torch_gumbel_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    num_transfer: torch.Tensor,
    mask_id: int,
    temperature: float,
    offset: int = 0,
) -> torch.Tensor:
    """The public sampler's step at temperature > 0: float64 Gumbel noise, then as
    ``torch_remask_step`` (confidence from the untempered softmax)."""
    W = logits.shape[1]
    xw = x[:, offset : offset + W]
    mask_index = xw == mask_id
    l64 = logits.to(torch.float64)
    noise = torch.rand_like(l64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    x0 = torch.argmax(l64.exp() / gumbel_noise, dim=-1)
    p = F.softmax(logits, dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
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
    read_bytes = logits.numel() * logits.element_size()
    gbps = read_bytes / t_ours / 1e9 if t_ours else None
    return {
        "B": B,
        "W": W,
        "V": V,
        "temperature": temperature,
        "dtype": "bfloat16",
        "ours_ms": t_ours * 1e3 if t_ours else None,
        "torch_ms": t_ref * 1e3 if t_ref else None,
        "speedup_vs_torch": (t_ref / t_ours) if (t_ref and t_ours) else None,
        "logits_read_gbps": gbps,
        "frac_of_copy": gbps / copy_gbps if gbps else None,
    }


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
    write_json(out / "ce_remask_cuda.json", result)
    md = [
        f"# Masked CE and remask on {meta['device']}\n",
        f"commit {meta['commit']}, {meta['date']}, torch {meta['torch']}, "
        f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)\n",
        "## Masked cross-entropy (bf16, fwd + bwd)\n",
        markdown_table(
            [
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
            ],
            [
                [
                    ce["N"],
                    ce["V"],
                    ce["mask_ratio"],
                    ce["ours_fwd_bwd_ms"],
                    ce["ours_inplace_fwd_bwd_ms"],
                    ce["torch_fwd_bwd_ms"],
                    ce["speedup_vs_torch"],
                    ce["fwd_gbps"],
                    ce["inplace_fwd_bwd_gbps"],
                    ce["inplace_frac_of_copy"],
                ]
            ],
        ),
        "\n## Remask step (bf16 logits, every window position a candidate)\n",
        markdown_table(
            ["B", "W", "T", "ours ms", "torch ms", "speedup", "logits GB/s", "/ copy"],
            [
                [
                    r["B"],
                    r["W"],
                    r["temperature"],
                    r["ours_ms"],
                    r["torch_ms"],
                    r["speedup_vs_torch"],
                    r["logits_read_gbps"],
                    r["frac_of_copy"],
                ]
                for r in remask_rows
            ],
        ),
    ]
    (out / "ce_remask_cuda.md").write_text("\n".join(md))


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
    Bs = (1, 8) if args.quick else (1, 8, 32)
    for B in Bs:
        for W in (32, 256, 1024):
            for T in (0.0, 1.0):
                if args.quick and T > 0 and W > 256:
                    continue
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
