"""Sampler speed options on the trained demo model: tokens/s, steps, agreement, accuracy.

Runs :func:`llada_ext.generate` on the 200 held-out prompts of the demo task (one left-padded
batch) with block caching off / prefix / dual, and with a fixed number of tokens per step
(one token per step, or 4 steps for 6 tokens) against the confidence-threshold and factor
rules. For every variant it reports

- tokens/s (answer tokens of the whole batch per second, best of ``--repeats`` runs),
- the sampling steps run (threshold and factor finish blocks early),
- the token agreement with the exact sampler (no cache, k = 1): the fraction of answer tokens
  equal to it, which measures what the approximations cost in tokens,
- the held-out exact-match accuracy (answer cut at the first EOS),
- the speedup against the exact sampler in the same run.

``prefix, refresh=1`` refreshes the cache at every step and must agree 100% (it checks the
cache machinery). The model comes from ``--model`` (a saved folder, e.g. the output of
``llada-ext demo``), else ``runs/demo`` when it holds one, else it is trained first like the
demo does (about 3 minutes on 2 CPU cores); ``--untrained`` uses random weights (smoke runs).

Usage::

    python benchmarks/sampler_speed.py                 # CPU, writes benchmarks/results/
    python benchmarks/sampler_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import git_commit, timed_call  # noqa: E402
from bench_tables import markdown_lines, write_result_files  # noqa: E402

import llada_ext as lx  # noqa: E402
from llada_ext.demo import load_demo_corpus  # noqa: E402
from llada_ext.model import LLaDAConfig, LLaDAModel  # noqa: E402
from llada_ext.sampling import left_pad  # noqa: E402
from llada_ext.tokenizer import ByteTokenizer  # noqa: E402

GEN_LENGTH = 6  # longest prompt (17) + 6 stays inside the demo's 24-token rows
BLOCK_LENGTH = 3

# name, generate() keyword arguments; 6 steps = one token per step (k = 1), 4 steps = two
# steps per block of 3 (2 then 1 tokens)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("none, k=1", {"cache": "none", "steps": 6}),
    ("prefix, k=1", {"cache": "prefix", "steps": 6}),
    ("dual, k=1", {"cache": "dual", "steps": 6}),
    ("prefix, refresh=1, k=1", {"cache": "prefix", "steps": 6, "cache_refresh": 1}),
    ("none, 4 steps", {"cache": "none", "steps": 4}),
    ("prefix, 4 steps", {"cache": "prefix", "steps": 4}),
    ("dual, 4 steps", {"cache": "dual", "steps": 4}),
    ("none, threshold 0.9", {"cache": "none", "steps": 6, "threshold": 0.9}),
    ("prefix, threshold 0.9", {"cache": "prefix", "steps": 6, "threshold": 0.9}),
    ("dual, threshold 0.9", {"cache": "dual", "steps": 6, "threshold": 0.9}),
    ("none, factor 1.0", {"cache": "none", "steps": 6, "factor": 1.0}),
    ("dual, factor 1.0", {"cache": "dual", "steps": 6, "factor": 1.0}),
]


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[LLaDAModel, str]:
    """The demo model: given folder, ``runs/demo``, freshly trained, or random."""
    if args.untrained:
        torch.manual_seed(0)
        return LLaDAModel(LLaDAConfig.preset("tiny")).to(device).eval(), "untrained (random)"
    folder = Path(args.model) if args.model else Path("runs/demo")
    if not (folder / "config.json").is_file():
        if args.model:
            raise SystemExit(f"error: no saved model in {folder}")
        from llada_ext.demo import run_demo

        print(f"no model in {folder}: training the demo model first ({args.train_steps} steps)")
        run_demo(
            steps=args.train_steps,
            device=str(device),
            out=folder,
            eval_size=20,
            throughput=False,
            progress=False,
        )
    return LLaDAModel.from_pretrained(folder, device=device).eval(), str(folder)


def padded_prompts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The held-out prompts of the demo task, left-padded into one batch: (ids, attention
    mask, the records)."""
    tok = ByteTokenizer()
    records = load_demo_corpus("test")
    ids, mask = left_pad([tok.encode(r["prompt"]) for r in records], tok.eos_token_id)
    return ids.to(device), mask.to(device), records


def run_variant(
    model: LLaDAModel,
    prompt: torch.Tensor,
    mask: torch.Tensor,
    opts: dict[str, Any],
    repeats: int,
    device: torch.device,
) -> tuple[torch.Tensor, int, float]:
    """(output, steps run, best seconds) of one sampler configuration."""
    kw = dict(opts, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, attention_mask=mask)
    steps_run = []
    out = lx.generate(model, prompt, callback=lambda i, x, c: steps_run.append(i), **kw)
    best = float("inf")
    again: list[torch.Tensor] = []
    for _ in range(repeats):
        again.clear()
        best = min(best, timed_call(lambda: again.append(lx.generate(model, prompt, **kw)), device))
        if not torch.equal(again[0], out):
            raise RuntimeError(f"non-deterministic output for {opts}")
    return out, len(steps_run), best


def exact_match(out: torch.Tensor, plen: int, records: list[dict]) -> float:
    """The fraction of records whose decoded answer equals the expected response."""
    answers = lx.decode_answers(ByteTokenizer(), out, plen)
    return sum(a == r["response"] for a, r in zip(answers, records)) / len(records)


TABLE_HEADERS = ["variant", "steps", "tokens/s", "speedup", "agreement", "exact match"]


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report: the run's header and one table row per variant."""
    lines = [
        f"# Sampler speed options on the demo model ({result['device_name']})",
        "",
        f"Model: {result['model']}; {result['batch']} held-out prompts in one left-padded "
        f"batch; gen_length {result['gen_length']}, block_length {result['block_length']}; "
        f"torch threads {result['threads']}; commit {result['commit']}; {result['date']}.",
        "Agreement: answer tokens equal to the exact sampler (no cache, k = 1). Speedup: "
        "against the exact sampler in the same run.",
        "",
    ]
    rows = (
        [
            r["name"],
            str(r["steps"]),
            f"{r['tokens_per_s']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{100 * r['agreement']:.1f}%",
            f"{100 * r['exact_match']:.1f}%",
        ]
        for r in result["variants"]
    )
    lines += markdown_lines(TABLE_HEADERS, rows, "lrrrrr")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="saved model folder (default: runs/demo, trained if absent)")
    p.add_argument("--untrained", action="store_true", help="random weights (smoke runs)")
    p.add_argument("--train-steps", type=int, default=1000, help="steps when training first")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    return p


def measure_variants(
    model: LLaDAModel,
    prompts: tuple[torch.Tensor, torch.Tensor, list[dict]],
    repeats: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One row per variant of :data:`VARIANTS`, each against the first (the exact sampler),
    printed as it comes."""
    prompt, mask, records = prompts
    plen = prompt.shape[1]
    base_out = base_time = None
    rows = []
    for name, opts in VARIANTS:
        out, steps, secs = run_variant(model, prompt, mask, opts, repeats, device)
        if base_out is None:
            base_out, base_time = out, secs
        answer, base_answer = out[:, plen:], base_out[:, plen:]
        r = {
            "name": name,
            "options": opts,
            "steps": steps,
            "seconds": secs,
            "tokens_per_s": prompt.shape[0] * GEN_LENGTH / secs,
            "speedup": base_time / secs,
            "agreement": float((answer == base_answer).float().mean()),
            "exact_match": exact_match(out, plen, records),
        }
        rows.append(r)
        print(
            f"{name:26s} steps {steps:3d}  {r['tokens_per_s']:9.0f} tok/s  "
            f"{r['speedup']:5.2f}x  agreement {100 * r['agreement']:5.1f}%  "
            f"exact match {100 * r['exact_match']:5.1f}%",
            flush=True,
        )
    return rows


def run_result(
    device: torch.device, source: str, batch: int, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The content of the JSON file: the run's description and every variant's row."""
    return {
        "device": device.type,
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "model": source,
        "batch": batch,
        "gen_length": GEN_LENGTH,
        "block_length": BLOCK_LENGTH,
        "threads": torch.get_num_threads(),
        "commit": git_commit(short=True),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "variants": rows,
    }


def main(argv: Optional[list[str]] = None) -> int:
    """Measure every variant and write ``sampler_<device>[_untrained].{json,md}``."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, source = load_model(args, device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    prompts = padded_prompts(device)
    rows = measure_variants(model, prompts, args.repeats, device)
    result = run_result(device, source, prompts[0].shape[0], rows)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    stem = f"sampler_{device.type}" + ("_untrained" if args.untrained else "")
    written = write_result_files(out_dir, stem, result, render_markdown(result))
    print(f"wrote {written}.json and .md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
