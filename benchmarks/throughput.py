"""End-to-end decoding throughput: LLaDA diffusion sampling vs KV-cached autoregressive decoding.

For every (model dims, batch, prompt length, answer length) of the grid it measures

- ``ar``: a causal twin of the model (same sizes and layers, ``ar_baseline.py``) decoding one
  token per step from a static KV cache; on CUDA the step is ``torch.compile``d with
  ``mode="reduce-overhead"`` (CUDA graphs), gpt-fast style. ``ar-eager``: the same step
  uncompiled. ``hf``: ``transformers``' ``LlamaForCausalLM.generate`` with a static cache,
  when transformers is installed.
- ``diffusion-{none,prefix,dual}``: :func:`llada_ext.generate` (kernel attention + fused
  remask, LM head on the current block only) with that block cache, at k = 1, 2, 4, 8 tokens
  per step (steps = gen_length / k); on CUDA also ``...-graphs``: the same sampler with its
  steps replayed from CUDA graphs (``generate(cuda_graphs=SamplerGraphs())``).
- ``reference``: the public LLaDA sampler loop in plain torch (SDPA attention, logits of the
  whole sequence, softmax + gather + a topk per row) on the same weights, at the same k.

Measurement: for each grid point every runner (each AR method, each diffusion method at each
k) is built (the AR twin and the LLaDA model are in memory together) and warmed up, then
all are timed in ``--repeats`` interleaved rounds (5 by default, 3 with ``--quick``): round
r runs every runner once, in an order rotated by r, so the load of a shared machine falls on
all of them alike. Each record gives the median, the interquartile range and the min-max
over the rounds of the wall time and tokens/s, and the speed against the AR baseline taken
per round (AR time / method time of the same round) with the same statistics.

Weights are random (decoding speed does not depend on their values at a fixed number of
tokens per step). Every run also names the physical ceiling: a step must read every weight
once, so ``max steps/s = copy bandwidth / weight bytes`` (bandwidth measured in this run) and
``ceiling tokens/s = max steps/s * tokens per step * batch``; the fraction reached is reported.

Output (``benchmarks/results/`` or ``--out``): ``throughput_<grid>_<device>.json`` (device,
commit, torch version, every figure and every round's time), a markdown table next to it,
and PNG plots (throughput vs tokens per step, one line per method with IQR bars, the AR
baseline as a horizontal line, and the paired speed vs AR; attention TFLOP/s vs sequence
length when ``attention_cuda.json`` is present).

Modules: ``throughput_setup.py`` (models, reference sampler, runners),
``throughput_measure.py`` (warm-up and interleaved timing, records),
``throughput_report.py`` (targets, console lines, markdown), ``throughput_plots.py``.

Examples::

    python benchmarks/throughput.py --cpu            # tiny model, float32, ~10 minutes
    python benchmarks/throughput.py --quick          # 1b and 8b dims, bf16, < 10 minutes
    python benchmarks/throughput.py                  # the full grid (hours on one GPU)
    llada-ext bench --quick                          # the same script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ar_baseline import RANDOM_WEIGHTS_NOTE  # noqa: E402
from bench_common import (  # noqa: E402
    RESULTS_DIR,
    add_out_argument,
    dtype_name,
    measure_copy_gbps,
    measure_matmul_tflops,
    run_metadata,
)
from bench_tables import write_result_files  # noqa: E402
from throughput_measure import run_model  # noqa: E402
from throughput_plots import latest_attention_json, make_plots  # noqa: E402
from throughput_report import (  # noqa: E402
    ceiling_line,
    record_line,
    render_markdown,
    target_lines,
    target_ratios,
)
from throughput_setup import (  # noqa: E402
    AR_METHODS,
    DIFFUSION_METHODS,
    reference_generate,
)

import llada_ext as lx  # noqa: E402

__all__ = ["GRIDS", "build_parser", "main", "reference_generate", "render_markdown"]

GRIDS: dict[str, dict[str, list]] = {
    "full": {
        "models": ["1b", "8b"],
        "prompts": [128, 512, 1024],
        "gens": [256, 512, 1024],
        "batches": [1, 8, 32],
        "ks": [1, 2, 4, 8],
    },
    "quick": {
        "models": ["1b", "8b"],
        "prompts": [512],
        "gens": [256],
        "batches": [1],
        "ks": [1, 2, 4, 8],
    },
    "cpu": {
        "models": ["tiny"],
        "prompts": [32, 128],
        "gens": [64],
        "batches": [1, 4],
        "ks": [1, 2, 4, 8],
    },
    "smoke": {"models": ["tiny"], "prompts": [16], "gens": [32], "batches": [2], "ks": [2, 4]},
}
DEFAULT_REPEATS = {"full": 5, "quick": 3, "cpu": 5, "smoke": 3}
TIMING_NOTE = (
    "interleaved rounds: per grid point every runner once per round, the order rotated by "
    "the round; statistics over the rounds (median, q1/q3 inclusive quartiles, min/max); "
    "vs_ar = AR baseline time / method time of the same round"
)


EPILOG = (
    "Grids: --cpu (tiny model, float32, CPU), --quick (1b/8b dims, batch 1, prompt 512, gen "
    "256), default full (prompt 128/512/1024 x gen 256/512/1024 x batch 1/8/32). "
    "--models/--prompts/--gens/--batches/--ks override the grid's lists. Every method of a "
    "grid point is timed in the same interleaved rounds; figures are the median over the "
    "rounds with the interquartile range, ratios vs AR are paired per round."
)


def _add_grid_options(ap: argparse.ArgumentParser) -> None:
    """The grid: --cpu / --quick / --smoke and the lists that override it."""
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cpu", action="store_true", help="CPU grid: tiny model, float32")
    g.add_argument("--quick", action="store_true", help="short GPU grid (< 10 min on one GPU)")
    ap.add_argument(
        "--smoke", action="store_true", help="with --cpu: a few-second grid for CI smoke tests"
    )
    ap.add_argument("--models", nargs="+", choices=["tiny", "1b", "8b"])
    ap.add_argument("--prompts", nargs="+", type=int, help="prompt lengths")
    ap.add_argument("--gens", nargs="+", type=int, help="answer lengths")
    ap.add_argument("--batches", nargs="+", type=int, help="batch sizes")
    ap.add_argument("--ks", nargs="+", type=int, help="tokens per step")


def _add_run_options(ap: argparse.ArgumentParser) -> None:
    """What runs and how: methods, block length, rounds, device, dtype, compilation."""
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=list(AR_METHODS + DIFFUSION_METHODS),
        help="methods to run (default: all that apply to the device)",
    )
    ap.add_argument(
        "--block-length",
        type=int,
        default=32,
        help="semi-autoregressive block length (default 32; k must divide it)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved timed rounds per grid point; every runner runs once per round "
        "(default 5; 3 with --quick and --smoke)",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu with --cpu, else cuda")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    ap.add_argument(
        "--no-compile", action="store_true", help="AR baseline without torch.compile / CUDA graphs"
    )
    ap.add_argument(
        "--no-graphs", action="store_true", help="skip the CUDA-graph diffusion variants"
    )


def _add_output_options(ap: argparse.ArgumentParser, default_out: Path) -> None:
    """Plots, the output folder, the report's note and tracebacks."""
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument(
        "--attention-json",
        type=Path,
        default=None,
        help="attention benchmark JSON to plot (default: the newest attention_cuda*.json "
        "in --out or benchmarks/results)",
    )
    add_out_argument(ap, default_out)
    ap.add_argument("--note", default=None, help="a line for the markdown report's header")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed points")


def build_parser(
    prog: str = "throughput.py", default_out: Path = RESULTS_DIR
) -> argparse.ArgumentParser:
    """The command-line options; ``prog`` and ``default_out`` as in :func:`main`."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_grid_options(ap)
    _add_run_options(ap)
    _add_output_options(ap, default_out)
    return ap


def _grid(args: argparse.Namespace) -> tuple[str, dict[str, list]]:
    grid_name = "cpu" if args.cpu else "quick" if args.quick else "full"
    if args.smoke:
        grid_name = "smoke"
    grid = {k: list(v) for k, v in GRIDS[grid_name].items()}
    for key in ("models", "prompts", "gens", "batches", "ks"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    return grid_name, grid


def _usage_error(args: argparse.Namespace, device: torch.device, ks: list[int]) -> Optional[str]:
    """Why the options cannot run here, or None."""
    if args.smoke and not args.cpu:
        return "--smoke goes with --cpu"
    if args.repeats is not None and args.repeats < 1:
        return "--repeats must be at least 1"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible to torch: use --cpu for the CPU grid"
    if device.type == "cuda" and not lx.has_cuda_kernels():
        return "llada_ext was built without its CUDA kernels (rebuild with LLADA_CUDA=1)"
    bad = [k for k in ks if args.block_length % k]
    if bad:
        return f"tokens per step {bad} do not divide the block length {args.block_length}"
    return None


def _methods(args: argparse.Namespace, device: torch.device) -> list[str]:
    methods = list(args.methods or (AR_METHODS + DIFFUSION_METHODS))
    if args.no_graphs or device.type != "cuda":
        methods = [m for m in methods if not m.endswith("-graphs")]
    if device.type != "cuda" and args.methods is None:
        methods = [m for m in methods if m != "ar-eager"]  # "ar" is already eager on a CPU
    return methods


def _write(result: dict[str, Any], args: argparse.Namespace, stem: str) -> list[str]:
    """Plots, JSON and markdown into ``args.out``; returns the plot paths."""
    out: Path = args.out
    plots: list[str] = []
    note = None
    if not args.no_plots:
        att = args.attention_json or latest_attention_json(out)
        plots, note = make_plots(result, out, stem, att)
        if note:
            print(note)
    result["plots"] = [Path(p).name for p in plots]
    result["plot_note"] = note
    write_result_files(out, stem, result, render_markdown(result))
    return plots


def _run_grid(
    args: argparse.Namespace,
    grid: dict[str, list],
    methods: list[str],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    copy_gbps: float,
) -> list[dict[str, Any]]:
    """Every record of the grid, printed as it comes."""
    records: list[dict[str, Any]] = []
    for name in grid["models"]:
        recs = run_model(
            name,
            grid,
            methods,
            device,
            dtype,
            repeats=repeats,
            block_length=args.block_length,
            compile_ar=device.type == "cuda" and not args.no_compile,
            copy_gbps=copy_gbps,
            log=lambda r: print(record_line(r), flush=True),
            verbose=args.verbose,
        )
        wbytes = next((r["weight_bytes_per_step"] for r in recs if r["status"] == "ok"), None)
        if wbytes:
            print(ceiling_line(name, wbytes, copy_gbps))
        records += recs
    return records


def main(
    argv: Optional[list[str]] = None,
    *,
    prog: str = "throughput.py",
    default_out: Path = RESULTS_DIR,
) -> int:
    """Run the throughput grid; returns the process exit status (0 unless nothing ran).

    ``prog`` and ``default_out`` let ``llada-ext bench`` name itself in --help and write to a
    folder of the user's instead of the checkout's tracked results.
    """
    args = build_parser(prog, default_out).parse_args(argv)
    grid_name, grid = _grid(args)
    device = torch.device(args.device or ("cpu" if args.cpu else "cuda"))
    why = _usage_error(args, device, grid["ks"])
    if why:
        print(why, file=sys.stderr)
        return 2
    cpu = device.type == "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32 if cpu else torch.bfloat16
    repeats = args.repeats or DEFAULT_REPEATS[grid_name]
    methods = _methods(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    meta = run_metadata(device)
    print(f"device: {meta['device']}\ncommit: {meta['commit']}  torch {meta['torch']}")
    print(RANDOM_WEIGHTS_NOTE)
    copy_gbps = measure_copy_gbps(device)
    mm_dtype = torch.float32 if cpu else dtype
    tflops = measure_matmul_tflops(device, mm_dtype)
    print(f"copy {copy_gbps:.1f} GB/s, matmul {tflops:.2f} TFLOP/s ({dtype_name(mm_dtype)})")
    print(f"grid {grid_name}: {grid}; methods {methods}; {repeats} interleaved rounds per point")
    records = _run_grid(args, grid, methods, device, dtype, repeats, copy_gbps)
    result = {
        "meta": meta,
        "grid": grid_name,
        "grid_lists": grid,
        "methods": methods,
        "dtype": dtype_name(dtype),
        "block_length": args.block_length,
        "repeats": repeats,
        "timing": TIMING_NOTE,
        "copy_gbps": copy_gbps,
        "matmul_tflops": tflops,
        "matmul_dtype": dtype_name(mm_dtype),
        "weights": RANDOM_WEIGHTS_NOTE,
        "note": args.note,
        "records": records,
        "targets": target_ratios(records),
        "wall_s": time.perf_counter() - t_start,
    }
    stem = f"throughput_{grid_name}_{device.type}"
    plots = _write(result, args, stem)
    print("\n".join(target_lines(result["targets"])))
    n_ok = sum(r["status"] == "ok" for r in records)
    print(
        f"\n{n_ok}/{len(records)} points ok; wrote {args.out / (stem + '.json')}, .md"
        + (f" and {len(plots)} plot(s)" if plots else "")
        + f" ({result['wall_s']:.0f} s)"
    )
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
