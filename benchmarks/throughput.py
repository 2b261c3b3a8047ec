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

Weights are random (decoding speed does not depend on their values at a fixed number of
tokens per step). Every run also names the physical ceiling: a step must read every weight
once, so ``max steps/s = copy bandwidth / weight bytes`` (bandwidth measured in this run) and
``ceiling tokens/s = max steps/s * tokens per step * batch``; the fraction reached is reported.

Output (``benchmarks/results/`` or ``--out``): ``throughput_<grid>_<device>.json`` (device,
commit, torch version, every figure), a markdown table next to it, and PNG plots
(throughput vs tokens per step, one line per method, the AR baseline as a horizontal line;
attention TFLOP/s vs sequence length when ``attention_cuda.json`` is present).

Examples::

    python benchmarks/throughput.py --cpu            # tiny model, float32, < 2 minutes
    python benchmarks/throughput.py --quick          # 1b and 8b dims, bf16, < 10 minutes
    python benchmarks/throughput.py                  # the full grid (hours on one GPU)
    llada-ext bench --quick                          # the same script
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ar_baseline import (  # noqa: E402
    RANDOM_WEIGHTS_NOTE,
    ARDecoder,
    build_ar_model,
    default_dtype,
    hf_baseline,
    hf_generate,
    weight_bytes_per_step,
)
from bench_common import (  # noqa: E402
    RESULTS_DIR,
    markdown_table,
    measure_copy_gbps,
    measure_matmul_tflops,
    run_metadata,
    write_json,
)

import llada_ext as lx  # noqa: E402
from llada_ext.model import LLaDAConfig, LLaDAModel  # noqa: E402
from llada_ext.sampling import SamplerGraphs, generate, get_num_transfer_tokens  # noqa: E402

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
AR_METHODS = ("ar", "ar-eager", "hf")
DIFFUSION_METHODS = (
    "diffusion-none",
    "diffusion-prefix",
    "diffusion-dual",
    "diffusion-none-graphs",
    "diffusion-prefix-graphs",
    "diffusion-dual-graphs",
    "reference",
)
# the configuration and the targets of the issue
TARGET_CONFIG = {"model": "8b", "batch": 1, "prompt": 512, "gen": 256}
TARGET_K = 4
TARGET_VS_AR = 3.0
TARGET_VS_REFERENCE = 10.0


# ---------------------------------------------------------------------------------------
# the reference sampler (public LLaDA generate.py, temperature 0, no CFG)
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def reference_generate(
    model: LLaDAModel,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
) -> torch.Tensor:
    """The public LLaDA sampling loop written in plain torch (the "reference path")."""
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        start, end = plen + nb * block_length, plen + (nb + 1) * block_length
        num_transfer = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(x).logits
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            ks = num_transfer[:, i].tolist()
            for j in range(b):
                _, select = torch.topk(confidence[j], k=int(ks[j]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "max_memory_allocated"
    # Linux reports kB; this is the process's high-water mark, not per run
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "process peak RSS"


def measure(
    fn: Callable[[], Any], warmup: Callable[[], Any], device: torch.device, repeats: int
) -> dict[str, Any]:
    """Median wall seconds of ``fn`` after ``warmup`` (device-synced), and peak memory."""
    warmup()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    peak, kind = _peak_memory(device)
    return {
        "wall_s": times[len(times) // 2],
        "wall_s_all": times,
        "peak_mem_bytes": peak,
        "peak_mem_kind": kind,
        "output": out,
    }


def build_llada(
    cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> LLaDAModel:
    """Random-weight LLaDA model allocated directly in ``dtype`` on ``device``."""
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        model = LLaDAModel(cfg, backend="kernels")
    return model.eval().requires_grad_(False)


def _status_of(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _record(
    base: dict[str, Any],
    *,
    method: str,
    k: int,
    steps: int,
    m: dict[str, Any],
    weight_bytes: int,
    copy_gbps: float,
    extra: Optional[dict] = None,
) -> dict[str, Any]:
    b, gen = base["batch"], base["gen"]
    wall = m["wall_s"]
    tps = b * gen / wall
    max_steps_per_s = copy_gbps * 1e9 / weight_bytes
    ceiling = max_steps_per_s * k * b
    rec = dict(
        base,
        method=method,
        tokens_per_step=k,
        steps=steps,
        status="ok",
        wall_s=wall,
        wall_s_all=m["wall_s_all"],
        tokens_per_s=tps,
        ms_per_step=1e3 * wall / steps,
        peak_mem_bytes=m["peak_mem_bytes"],
        peak_mem_kind=m["peak_mem_kind"],
        weight_bytes_per_step=weight_bytes,
        ceiling_steps_per_s=max_steps_per_s,
        ceiling_tokens_per_s=ceiling,
        fraction_of_ceiling=tps / ceiling,
    )
    if extra:
        rec.update(extra)
    return rec


def _failed(base: dict[str, Any], method: str, k: int, steps: int, status: str) -> dict:
    return dict(base, method=method, tokens_per_step=k, steps=steps, status=status)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _diffusion_point(
    model: LLaDAModel,
    method: str,
    prompt: torch.Tensor,
    gen_length: int,
    k: int,
    block_length: int,
    device: torch.device,
    repeats: int,
) -> tuple[dict, dict]:
    """Time one diffusion method at k tokens per step; returns (measurement, extra fields)."""
    mask_id = model.config.mask_token_id
    full = {"gen_length": gen_length, "steps": gen_length // k, "block_length": block_length}
    # eager paths warm up on one block; graphs are captured by a full warm-up run
    short = {"gen_length": block_length, "steps": block_length // k, "block_length": block_length}
    if method == "reference":
        model.backend = "torch"
        try:
            m = measure(
                lambda: reference_generate(model, prompt, mask_id=mask_id, **full),
                lambda: reference_generate(model, prompt, mask_id=mask_id, **short),
                device,
                repeats,
            )
        finally:
            model.backend = "kernels"
        return m, {
            "backend": "torch (SDPA)",
            "remask": "torch step",
            "cache": "none",
            "cuda_graphs": False,
        }
    model.backend = "kernels"
    cache = method.split("-")[1]
    if method.endswith("-graphs"):
        # one recorder per point (graphs recorded in the warm-up run, replayed in the timed
        # runs); its static buffers and graph pool are freed right after
        graphs = SamplerGraphs()
        try:
            m = measure(
                lambda: generate(model, prompt, cache=cache, cuda_graphs=graphs, **full),
                lambda: generate(model, prompt, cache=cache, cuda_graphs=graphs, **full),
                device,
                repeats,
            )
        finally:
            graphs.release()
            del graphs
            _free(device)
        # the graphs must decode exactly what the eager sampler decodes
        try:
            matches = bool(torch.equal(m["output"], generate(model, prompt, cache=cache, **full)))
        except torch.OutOfMemoryError:
            matches = None
        return m, {
            "backend": "kernels",
            "remask": "lx.remask",
            "cache": cache,
            "cuda_graphs": True,
            "matches_eager_sampler": matches,
        }
    m = measure(
        lambda: generate(model, prompt, cache=cache, **full),
        lambda: generate(model, prompt, cache=cache, **short),
        device,
        repeats,
    )
    return m, {"backend": "kernels", "remask": "lx.remask", "cache": cache, "cuda_graphs": False}


def run_model(
    name: str,
    grid: dict[str, list],
    methods: list[str],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    copy_gbps: float,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every grid point of one model preset; the AR twin first, then the diffusion model (one
    model in memory at a time)."""
    cfg = LLaDAConfig.preset(name)
    records: list[dict[str, Any]] = []
    points = [(b, p, g) for b in grid["batches"] for p in grid["prompts"] for g in grid["gens"]]
    gen = torch.Generator().manual_seed(1234)
    high = min(cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id)
    prompts = {
        (b, p): torch.randint(0, high, (b, p), generator=gen).to(device) for b, p, _ in points
    }
    bases = {
        (b, p, g): {
            "model": name,
            "batch": b,
            "prompt": p,
            "gen": g,
            "dtype": str(dtype).replace("torch.", ""),
        }
        for b, p, g in points
    }
    reps = args.repeats

    ar_methods = [mt for mt in methods if mt in AR_METHODS]
    if ar_methods:
        ar = build_ar_model(cfg, device, dtype)
        wbytes = weight_bytes_per_step(ar, cfg.vocab_size, cfg.d_model)
        log(_ceiling_line(name, wbytes, copy_gbps))
        decoders: dict[str, ARDecoder] = {}
        if "ar" in ar_methods:
            decoders["ar"] = ARDecoder(ar, compile=device.type == "cuda" and not args.no_compile)
        if "ar-eager" in ar_methods:
            decoders["ar-eager"] = ARDecoder(ar, compile=False)
        for (b, p, g), base in bases.items():
            prompt = prompts[(b, p)]
            for mt, dec in decoders.items():
                try:
                    run = functools.partial(dec.generate, prompt, g)
                    m = measure(run, run, device, reps)
                    rec = _record(
                        base,
                        method=mt,
                        k=1,
                        steps=g,
                        m=m,
                        weight_bytes=wbytes,
                        copy_gbps=copy_gbps,
                        extra={
                            "compiled": dec.compiled,
                            "cuda_graphs": dec.compiled and device.type == "cuda",
                        },
                    )
                except Exception as e:  # noqa: BLE001 - record and go on with the grid
                    rec = _failed(base, mt, 1, g, _status_of(e))
                    if args.verbose:
                        traceback.print_exc()
                records.append(rec)
                log(_line(rec))
                _free(device)
        del decoders, ar
        _free(device)
        if "hf" in ar_methods:
            try:
                hf, why = hf_baseline(cfg, device, dtype)
            except Exception as e:  # noqa: BLE001 - an incompatible transformers version
                hf, why = None, f"{type(e).__name__}: {e}"[:160]
            for (b, p, g), base in bases.items():
                if hf is None:
                    rec = _failed(base, "hf", 1, g, f"skipped: {why}")
                else:
                    try:
                        run = functools.partial(hf_generate, hf, prompts[(b, p)], g)
                        m = measure(run, run, device, reps)
                        rec = _record(
                            base,
                            method="hf",
                            k=1,
                            steps=g,
                            m=m,
                            weight_bytes=wbytes,
                            copy_gbps=copy_gbps,
                        )
                    except Exception as e:  # noqa: BLE001
                        rec = _failed(base, "hf", 1, g, _status_of(e))
                records.append(rec)
                log(_line(rec))
            del hf
            _free(device)

    diff_methods = [mt for mt in methods if mt in DIFFUSION_METHODS]
    if not diff_methods:
        return records
    model = build_llada(cfg, device, dtype)
    wbytes = weight_bytes_per_step(model, cfg.vocab_size, cfg.d_model)
    log(_ceiling_line(name, wbytes, copy_gbps))
    bl = args.block_length
    for (b, p, g), base in bases.items():
        for k in grid["ks"]:
            if bl % k or g % bl:
                continue
            for mt in diff_methods:
                if mt.endswith("-graphs") and device.type != "cuda":
                    continue  # CUDA graphs need a GPU
                try:
                    m, extra = _diffusion_point(
                        model, mt, prompts[(b, p)], g, k, bl, device, args.repeats
                    )
                    rec = _record(
                        base,
                        method=mt,
                        k=k,
                        steps=g // k,
                        m=m,
                        weight_bytes=wbytes,
                        copy_gbps=copy_gbps,
                        extra=extra,
                    )
                except Exception as e:  # noqa: BLE001 - record and go on with the grid
                    rec = _failed(base, mt, k, g // k, _status_of(e))
                    if args.verbose:
                        traceback.print_exc()
                records.append(rec)
                log(_line(rec))
                _free(device)
    model.backend = "kernels"
    del model
    _free(device)
    return records


def _ceiling_line(name: str, weight_bytes: int, copy_gbps: float) -> str:
    steps = copy_gbps * 1e9 / weight_bytes
    return (
        f"{name}: physical ceiling = {weight_bytes / 1e9:.3g} GB of weights read per step / "
        f"{copy_gbps:.1f} GB/s copy bandwidth = {steps:.1f} steps/s; x tokens per step x "
        "batch = ceiling tokens/s"
    )


def _line(r: dict[str, Any]) -> str:
    head = (
        f"{r['model']:>4} B={r['batch']:<2} P={r['prompt']:<4} G={r['gen']:<4} "
        f"{r['method']:<24} k={r['tokens_per_step']}"
    )
    if r["status"] != "ok":
        return f"{head}  {r['status']}"
    return (
        f"{head}  {r['tokens_per_s']:10.1f} tok/s  {r['ms_per_step']:8.2f} ms/step  "
        f"{100 * r['fraction_of_ceiling']:5.1f}% of ceiling"
    )


# ---------------------------------------------------------------------------------------
# summaries: targets, markdown, plots
# ---------------------------------------------------------------------------------------


def _ok(records: list[dict], **match: Any) -> list[dict]:
    return [
        r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())
    ]


def target_ratios(records: list[dict]) -> list[dict[str, Any]]:
    """At k = 4: diffusion (prefix cache, CUDA graphs when measured) vs the AR baseline and vs
    the reference path, for every (model, batch, prompt, gen) of the run."""
    out = []
    configs = sorted({(r["model"], r["batch"], r["prompt"], r["gen"]) for r in records})
    for model, b, p, g in configs:
        sel = {"model": model, "batch": b, "prompt": p, "gen": g}
        ours = _ok(
            records, method="diffusion-prefix-graphs", tokens_per_step=TARGET_K, **sel
        ) or _ok(records, method="diffusion-prefix", tokens_per_step=TARGET_K, **sel)
        ar = _ok(records, method="ar", **sel)
        ref = _ok(records, method="reference", tokens_per_step=TARGET_K, **sel)
        row: dict[str, Any] = dict(
            sel,
            k=TARGET_K,
            is_target_config=sel == TARGET_CONFIG,
            ours=ours[0]["method"] if ours else None,
        )
        if ours and ar:
            row["vs_ar"] = ours[0]["tokens_per_s"] / ar[0]["tokens_per_s"]
        if ours and ref:
            row["vs_reference"] = ours[0]["tokens_per_s"] / ref[0]["tokens_per_s"]
        out.append(row)
    return out


def render_markdown(result: dict[str, Any]) -> str:
    meta, recs = result["meta"], result["records"]
    lines = [
        f"# Decoding throughput ({result['grid']} grid, {meta['device_type']})",
        "",
        f"- device: {meta['device']}",
        f"- commit: `{meta['commit']}`, date: {meta['date']}, torch {meta['torch']}",
        f"- dtype {result['dtype']}, block length {result['block_length']}, "
        f"median of {result['repeats']} timed run(s) after a warm-up",
        f"- {RANDOM_WEIGHTS_NOTE}",
        f"- copy bandwidth measured in this run: {result['copy_gbps']:.1f} GB/s; "
        f"matmul: {result['matmul_tflops']:.2f} TFLOP/s ({result['matmul_dtype']})",
        "- physical ceiling: every step reads all weights once (the embedding table "
        "excepted), so max steps/s = copy bandwidth / weight bytes, and ceiling tokens/s = "
        "max steps/s x tokens per step x batch",
        "- tokens/s counts answer tokens of the whole batch over the whole generation "
        "(prefill included)",
        "",
    ]
    rows = []
    for r in recs:
        if r["status"] != "ok":
            rows.append(
                [
                    r["model"],
                    r["batch"],
                    r["prompt"],
                    r["gen"],
                    r["method"],
                    r["tokens_per_step"],
                    r["steps"],
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    r["status"],
                ]
            )
            continue
        rows.append(
            [
                r["model"],
                r["batch"],
                r["prompt"],
                r["gen"],
                r["method"],
                r["tokens_per_step"],
                r["steps"],
                r["tokens_per_s"],
                r["ms_per_step"],
                r["peak_mem_bytes"] / 2**20,
                r["ceiling_tokens_per_s"],
                f"{100 * r['fraction_of_ceiling']:.1f}%",
                "ok",
            ]
        )
    lines.append(
        markdown_table(
            [
                "model",
                "B",
                "prompt",
                "gen",
                "method",
                "tok/step",
                "steps",
                "tokens/s",
                "ms/step",
                "peak MiB",
                "ceiling tok/s",
                "of ceiling",
                "status",
            ],
            rows,
        )
    )
    lines += [
        "## Targets",
        "",
        f"Target configuration: {TARGET_CONFIG['model']} dims, batch "
        f"{TARGET_CONFIG['batch']}, prompt {TARGET_CONFIG['prompt']}, gen "
        f"{TARGET_CONFIG['gen']}, bf16 on H100/H200, k = {TARGET_K} tokens/step: "
        f"diffusion with prefix cache + CUDA graphs >= {TARGET_VS_AR:g}x the AR baseline "
        f"and >= {TARGET_VS_REFERENCE:g}x the reference path.",
        "",
    ]
    trows = []
    for t in result["targets"]:
        vs_ar, vs_ref = t.get("vs_ar"), t.get("vs_reference")
        trows.append(
            [
                f"{t['model']} B={t['batch']} P={t['prompt']} G={t['gen']}"
                + (" (target)" if t["is_target_config"] else ""),
                t["ours"] or "-",
                "-"
                if vs_ar is None
                else f"{vs_ar:.2f}x " + ("(met)" if vs_ar >= TARGET_VS_AR else "(below 3x)"),
                "-"
                if vs_ref is None
                else f"{vs_ref:.2f}x "
                + ("(met)" if vs_ref >= TARGET_VS_REFERENCE else "(below 10x)"),
            ]
        )
    lines.append(
        markdown_table(["configuration", "diffusion method", "vs AR", "vs reference"], trows)
    )
    if not any(t["is_target_config"] for t in result["targets"]):
        lines.append(
            "The target configuration is not part of this grid; the ratios above are "
            "informational.\n"
        )
    if result.get("plots"):
        lines += (
            ["## Plots", ""]
            + [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]]
            + [""]
        )
    if result.get("plot_note"):
        lines += [result["plot_note"], ""]
    return "\n".join(lines)


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


def _latest_attention_json(out: Path) -> Optional[Path]:
    """Newest ``attention_cuda*.json`` (written by bench_attention_cuda.py) in ``out`` or in
    the default results folder."""
    found = [p for d in dict.fromkeys((out, RESULTS_DIR)) for p in d.glob("attention_cuda*.json")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


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
    configs = sorted({(r["model"], r["batch"], r["prompt"], r["gen"]) for r in recs})
    for model, b, p, g in configs:
        sel = {"model": model, "batch": b, "prompt": p, "gen": g}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drew = False
        for mt in DIFFUSION_METHODS:
            pts = sorted(
                (r["tokens_per_step"], r["tokens_per_s"]) for r in _ok(recs, method=mt, **sel)
            )
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=mt)
                drew = True
        for mt, style in (("ar", "--"), ("ar-eager", ":"), ("hf", "-.")):
            rr = _ok(recs, method=mt, **sel)
            if rr:
                ax.axhline(
                    rr[0]["tokens_per_s"],
                    color="k",
                    linestyle=style,
                    label=f"{mt} (1 token/step, KV cache)",
                )
                drew = True
        ceil = sorted(
            {
                (r["tokens_per_step"], r["ceiling_tokens_per_s"])
                for r in _ok(recs, **sel)
                if r["method"] in DIFFUSION_METHODS
            }
        )
        if ceil:
            ax.plot(
                [x for x, _ in ceil],
                [y for _, y in ceil],
                color="0.6",
                linestyle="--",
                label="weight-read ceiling",
            )
        if not drew:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ks = sorted({r["tokens_per_step"] for r in _ok(recs, **sel)})
        ax.set_xticks(ks, labels=[str(k) for k in ks])
        ax.set_yscale("log")
        ax.set_xlabel("tokens per step (k)")
        ax.set_ylabel("tokens/s (answer tokens of the batch)")
        ax.set_title(
            f"{model} dims, batch {b}, prompt {p}, gen {g} "
            f"({result['meta']['device_type']}, {result['dtype']})",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"{stem}_{model}_b{b}_p{p}_g{g}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    if attention_json is not None and attention_json.is_file():
        try:
            series = _load_attention_json(attention_json)
        except (OSError, ValueError) as e:
            series = []
            print(f"could not read {attention_json}: {e}")
        if series:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for lab, xs, ys in series:
                ax.plot(xs, ys, marker="o", label=lab)
            ax.set_xscale("log", base=2)
            seqs = sorted({int(x) for _, xs, _ in series for x in xs})
            ax.set_xticks(seqs, labels=[str(x) for x in seqs])
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"attention kernel vs SDPA ({attention_json.name})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            path = out / f"attention_tflops_vs_seqlen_{stem}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(str(path))
    return paths, None


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def build_parser(
    prog: str = "throughput.py", default_out: Path = RESULTS_DIR
) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="Grids: --cpu (tiny model, float32, CPU), --quick (1b/8b dims, batch 1, prompt "
        "512, gen 256), default full (prompt 128/512/1024 x gen 256/512/1024 x batch "
        "1/8/32). --models/--prompts/--gens/--batches/--ks override the grid's lists.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        help="timed runs per point, median reported (default 1)",
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
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument(
        "--attention-json",
        type=Path,
        default=None,
        help="attention benchmark JSON to plot (default: the newest attention_cuda*.json "
        "in --out or benchmarks/results)",
    )
    ap.add_argument(
        "--out", type=Path, default=default_out, help=f"output folder (default {default_out})"
    )
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed points")
    return ap


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
    grid_name = "cpu" if args.cpu else "quick" if args.quick else "full"
    if args.smoke:
        if not args.cpu:
            print("--smoke goes with --cpu", file=sys.stderr)
            return 2
        grid_name = "smoke"
    grid = {k: list(v) for k, v in GRIDS[grid_name].items()}
    for key, attr in (
        ("models", "models"),
        ("prompts", "prompts"),
        ("gens", "gens"),
        ("batches", "batches"),
        ("ks", "ks"),
    ):
        if getattr(args, attr):
            grid[key] = getattr(args, attr)
    device = torch.device(args.device or ("cpu" if args.cpu else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: use --cpu for the CPU grid", file=sys.stderr)
        return 2
    if device.type == "cuda" and not lx.has_cuda_kernels():
        print(
            "llada_ext was built without its CUDA kernels (rebuild with LLADA_CUDA=1)",
            file=sys.stderr,
        )
        return 2
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    )
    repeats = args.repeats or 1
    args.repeats = repeats
    methods = list(args.methods or (AR_METHODS + DIFFUSION_METHODS))
    if args.no_graphs or device.type != "cuda":
        methods = [m for m in methods if not m.endswith("-graphs")]
    if device.type != "cuda" and args.methods is None:
        methods = [m for m in methods if m != "ar-eager"]  # "ar" is already eager on a CPU
    bad = [k for k in grid["ks"] if args.block_length % k]
    if bad:
        print(
            f"tokens per step {bad} do not divide the block length {args.block_length}",
            file=sys.stderr,
        )
        return 2

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    meta = run_metadata(device)
    print(f"device: {meta['device']}\ncommit: {meta['commit']}  torch {meta['torch']}")
    print(RANDOM_WEIGHTS_NOTE)
    copy_gbps = measure_copy_gbps(device)
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    tflops = measure_matmul_tflops(device, mm_dtype)
    print(
        f"copy bandwidth {copy_gbps:.1f} GB/s, matmul {tflops:.2f} TFLOP/s "
        f"({str(mm_dtype).replace('torch.', '')})"
    )
    print(f"grid {grid_name}: {grid}; methods {methods}")

    records: list[dict[str, Any]] = []
    for name in grid["models"]:
        records += run_model(
            name, grid, methods, device, dtype, args, copy_gbps, lambda s: print(s, flush=True)
        )
    for r in records:
        r.pop("output", None)
    result = {
        "meta": meta,
        "grid": grid_name,
        "grid_lists": grid,
        "methods": methods,
        "dtype": str(dtype).replace("torch.", ""),
        "block_length": args.block_length,
        "repeats": repeats,
        "copy_gbps": copy_gbps,
        "matmul_tflops": tflops,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "weights": RANDOM_WEIGHTS_NOTE,
        "records": records,
        "targets": target_ratios(records),
    }
    stem = f"throughput_{grid_name}_{device.type}"
    plots: list[str] = []
    note = None
    if not args.no_plots:
        att = args.attention_json or _latest_attention_json(out)
        plots, note = make_plots(result, out, stem, att)
        if note:
            print(note)
    result["plots"] = [Path(p).name for p in plots]
    result["plot_note"] = note
    result["wall_s"] = time.perf_counter() - t_start
    write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(render_markdown(result))

    print("\nk = 4 tokens/step, diffusion (prefix cache, + CUDA graphs when run):")
    for t in result["targets"]:
        cfg = f"  {t['model']} B={t['batch']} P={t['prompt']} G={t['gen']}" + (
            " [target config]" if t["is_target_config"] else ""
        )
        vs_ar = "n/a" if t.get("vs_ar") is None else f"{t['vs_ar']:.2f}x"
        vs_ref = "n/a" if t.get("vs_reference") is None else f"{t['vs_reference']:.2f}x"
        print(
            f"{cfg}: {t['ours']} vs AR {vs_ar} (target >= {TARGET_VS_AR:g}x), "
            f"vs reference {vs_ref} (target >= {TARGET_VS_REFERENCE:g}x)"
        )
    n_ok = sum(r["status"] == "ok" for r in records)
    print(
        f"\n{n_ok}/{len(records)} points ok; wrote {out / (stem + '.json')}, .md"
        + (f" and {len(plots)} plot(s)" if plots else "")
        + f" ({result['wall_s']:.0f} s)"
    )
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
