"""``llada-ext demo``: train the tiny model on a built-in task and check that it learned.

The built-in corpus (``llada_ext/data/demo_*.jsonl``, made by :func:`make_demo_corpus`) holds
string tasks whose answers can be checked exactly::

    reverse: hbcad = dacbh
    copy: gfa = gfa

The demo fine-tunes a freshly initialised tiny byte-level model on it with the SFT objective
(Alg. 2: the prompt is never masked, the answer is padded with EOS to a fixed length), saves
the run, reloads it with ``LLaDAModel.from_pretrained``, generates the answers of held-out
prompts with :func:`llada_ext.generate` and prints the exact-match accuracy per task (chance is
about 0%: a random 3-5 letter answer over 8 letters). Finally it times a few training steps
with the library kernels and with plain PyTorch and prints the two throughputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .generation_config import write_generation_config

__all__ = [
    "DEMO_SEQ_LEN",
    "add_demo_arguments",
    "demo_corpus_path",
    "evaluate_exact_match",
    "load_demo_corpus",
    "make_demo_corpus",
    "measure_throughput",
    "run_demo",
]

#: Tasks of the built-in corpus and how their answers are computed.
DEMO_TASKS = {
    "reverse": lambda s: s[::-1],
    "copy": lambda s: s,
}
#: Letters the task strings are made of, and the string lengths.
DEMO_ALPHABET = "abcdefgh"
DEMO_MIN_LEN, DEMO_MAX_LEN = 3, 5
#: Sequence length of the SFT rows: the longest prompt ("reverse: abcde = ", 17 bytes) plus
#: room for the answer and its EOS padding.
DEMO_SEQ_LEN = 24
_CORPUS_SEED = 20240229
_N_TRAIN, _N_TEST = 6000, 200


def make_demo_corpus(
    seed: int = _CORPUS_SEED, n_train: int = _N_TRAIN, n_test: int = _N_TEST
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Generate the demo corpus: disjoint train and held-out test records.

    Parameters
    ----------
    seed : int
        Generator seed (the shipped files use the default).
    n_train, n_test : int
        Number of records of each split.

    Returns
    -------
    tuple of (list of dict, list of dict)
        Records ``{"task", "prompt", "response"}``; no (task, string) pair is in both splits.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    records: list[dict[str, str]] = []
    tasks = sorted(DEMO_TASKS)
    while len(records) < n_train + n_test:
        task = rng.choice(tasks)
        n = rng.randint(DEMO_MIN_LEN, DEMO_MAX_LEN)
        s = "".join(rng.choice(DEMO_ALPHABET) for _ in range(n))
        if (task, s) in seen:
            continue
        seen.add((task, s))
        records.append({"task": task, "prompt": f"{task}: {s} = ", "response": DEMO_TASKS[task](s)})
    return records[:n_train], records[n_train:]


def demo_corpus_path(split: str) -> Path:
    """Path of the shipped corpus file of ``split`` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return Path(__file__).resolve().parent / "data" / f"demo_{split}.jsonl"


def load_demo_corpus(split: str) -> list[dict[str, str]]:
    """Read the shipped corpus file of ``split`` (regenerated if the file is missing).

    Parameters
    ----------
    split : {"train", "test"}

    Returns
    -------
    list of dict
        Records ``{"task", "prompt", "response"}``.
    """
    path = demo_corpus_path(split)
    if not path.is_file():
        train, test = make_demo_corpus()
        return train if split == "train" else test
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_demo_corpus(folder: str | Path | None = None) -> None:
    """(Re)write the shipped corpus files from :func:`make_demo_corpus`."""
    train, test = make_demo_corpus()
    for split, recs in (("train", train), ("test", test)):
        path = (
            Path(folder) / f"demo_{split}.jsonl" if folder is not None else demo_corpus_path(split)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def _kernels_available(device: torch.device) -> bool:
    """True when the compiled kernels run on ``device`` (CPU always, CUDA if built)."""
    try:
        import llada_ext
    except ImportError:
        return False
    if device.type == "cuda":
        return bool(getattr(llada_ext, "has_cuda_kernels", lambda: False)())
    return True


def build_demo_dataset(seq_len: int = DEMO_SEQ_LEN) -> Any:
    """The demo's SFT training rows (prompt + answer + EOS padding, byte tokens).

    Returns
    -------
    SequenceDataset
    """
    from .tokenizer import ByteTokenizer
    from .training.data import build_sft_dataset, records_to_pairs

    tok = ByteTokenizer()
    ds, _ = build_sft_dataset(
        records_to_pairs(load_demo_corpus("train"), tok), seq_len=seq_len, eos_id=tok.eos_token_id
    )
    return ds


@torch.no_grad()
def evaluate_exact_match(
    model: torch.nn.Module,
    records: Sequence[dict[str, str]],
    *,
    seq_len: int = DEMO_SEQ_LEN,
    batch_size: int = 64,
) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Generate answers for ``records`` and score exact matches.

    The answer of a prompt of ``P`` tokens is ``seq_len - P`` masks (the layout the model was
    fine-tuned on), decoded in that many steps with low-confidence remasking at temperature 0
    and cut at the first EOS.

    Parameters
    ----------
    model : nn.Module
        A tiny-preset :class:`llada_ext.LLaDAModel`.
    records : sequence of dict
        ``{"task", "prompt", "response"}`` records.
    seq_len : int
        Row length used in training.
    batch_size : int
        Prompts generated together (prompts are grouped by length, no padding needed).

    Returns
    -------
    tuple of (dict, list)
        Accuracy per task plus ``"all"``, and ``(prompt, expected, got)`` for every record.
    """
    from .sampling import generate, truncate_at_eos
    from .tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model.eval()
    by_len: dict[int, list[int]] = {}
    encoded = [tok.encode(r["prompt"]) for r in records]
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    answers: dict[int, str] = {}
    for plen, idx in sorted(by_len.items()):
        gen_len = seq_len - plen
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            x = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=model.device)
            out = generate(model, x, gen_length=gen_len, steps=gen_len, block_length=gen_len)
            rows = truncate_at_eos(out, eos_id=tok.eos_token_id, prompt_length=plen)
            for i, row in zip(chunk, rows):
                answers[i] = tok.decode(row)
    hits: dict[str, list[bool]] = {}
    examples = []
    for i, r in enumerate(records):
        ok = answers[i] == r["response"]
        hits.setdefault(r.get("task", "all"), []).append(ok)
        examples.append((r["prompt"], r["response"], answers[i]))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["all"] = sum(sum(v) for v in hits.values()) / max(len(records), 1)
    return acc, examples


def measure_throughput(
    model: torch.nn.Module,
    dataset: Any,
    *,
    backend: str,
    steps: int = 6,
    warmup: int = 2,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> float:
    """Training tokens per second of a copy of ``model`` with ``backend``.

    Runs ``warmup + steps`` SFT optimizer steps on the first sequences of ``dataset`` (same
    batches and masks for every backend) and times the last ``steps``.

    Returns
    -------
    float
        Tokens per second.
    """
    from .training.losses import build_sft_batch, keyed_noise, masked_token_loss

    m = copy.deepcopy(model).to(device)
    m.backend = backend
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    n = len(dataset)
    tokens = 0
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = 0
        idx = [(step * batch_size + j) % n for j in range(batch_size)]
        ids = dataset.tokens[idx].to(device)
        pl = dataset.prompt_lengths[idx]
        noise = keyed_noise(idx, ids.shape[1], seed=step)
        mb = build_sft_batch(ids, pl, mask_id=m.config.mask_token_id, noise=noise)
        loss = masked_token_loss(m, mb.noisy, mb.targets, mb.weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return tokens / max(time.perf_counter() - t0, 1e-9)


def run_demo(
    *,
    steps: int = 1000,
    device: str | torch.device = "auto",
    out: str | Path = "runs/demo",
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1.5e-3,
    eval_size: int = 200,
    throughput: bool = True,
    progress: bool = True,
    backend: str | None = None,
) -> dict[str, Any]:
    """Train, save, reload, evaluate and time the tiny model on the built-in corpus.

    Parameters
    ----------
    steps, batch_size : int
        Optimizer steps, and sequences per step.
    device : str or torch.device
        "auto" (CUDA when available), "cpu" or "cuda".
    out : str or Path
        Output folder of the run (weights, checkpoints, metrics).
    seed : int
        Seed of the initialisation, data order and masks.
    lr : float
        Peak learning rate.
    eval_size : int
        Held-out prompts to evaluate (at most the size of the test split).
    throughput, progress : bool
        Also time kernels vs torch training steps; show the progress bar.
    backend : {"kernels", "torch"}, optional
        Training backend; default kernels when they run on the device.

    Returns
    -------
    dict
        ``accuracy`` (per task and "all"), ``initial_loss``, ``final_loss``, ``train_seconds``,
        ``tokens_per_s`` ({"kernels", "torch"} when timed) and ``out``.
    """
    from .training.distributed import resolve_device

    dev = resolve_device(device)
    if backend is None:
        backend = "kernels" if _kernels_available(dev) else "torch"
    dataset = build_demo_dataset()
    test = load_demo_corpus("test")[: max(1, eval_size)]
    first = load_demo_corpus("train")[0]
    print(
        f"llada-ext demo: {len(dataset)} training examples like "
        f"{first['prompt']!r} -> {first['response']!r}; device {dev}, backend {backend}"
    )
    cfg = _train_config(out, steps, batch_size, lr, seed, progress)
    run = _train(dataset, cfg, backend=backend, device=dev)
    if run.result.interrupted:
        return {"interrupted": True, "out": str(out)}
    gen = _write_sampling_settings(out, run.model.config)
    acc, examples = _evaluate_saved_run(out, test, device=dev, backend=backend)
    _print_try_it(out, examples, gen)
    rates = _time_backends(run.init_state, dataset, dev) if throughput else {}
    return {
        "accuracy": acc,
        "initial_loss": run.initial_loss,
        "final_loss": run.final_loss,
        "train_seconds": run.seconds,
        "out": str(out),
        "tokens_per_s": rates,
    }


class _TrainedRun(NamedTuple):
    model: torch.nn.Module  # the trained model
    init_state: torch.nn.Module  # a copy of the model before training
    result: Any  # the Trainer's result
    seconds: float
    initial_loss: float
    final_loss: float


def _train_config(
    out: str | Path, steps: int, batch_size: int, lr: float, seed: int, progress: bool
) -> Any:
    """The demo's SFT run into ``out``: a short warm-up, the learning rate decaying over the
    last 30% of the steps, no weight decay, no intermediate checkpoints."""
    from .training import TrainConfig

    return TrainConfig(
        objective="sft",
        out_dir=str(out),
        steps=steps,
        micro_batch_size=batch_size,
        lr=lr,
        warmup_steps=min(50, max(steps // 10, 1)),
        decay_frac=0.3,
        weight_decay=0.0,
        seed=seed,
        save_every=0,
        keep_last=1,
        progress=progress,
    )


def _train(dataset: Any, cfg: Any, *, backend: str, device: torch.device) -> _TrainedRun:
    """Fine-tune a freshly initialised tiny model on the demo rows with ``cfg`` and print
    the loss at the start and at the end."""
    from .model import LLaDAConfig, LLaDAModel
    from .training import Trainer

    torch.manual_seed(cfg.seed)
    model = LLaDAModel(LLaDAConfig.preset("tiny"), backend=backend)
    init_state = copy.deepcopy(model)
    trainer = Trainer(model, dataset, cfg, device=device)
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    k = min(20, max(len(result.losses) // 10, 1))
    initial = sum(result.losses[:k]) / k if result.losses else float("nan")
    final = sum(result.losses[-k:]) / k if result.losses else float("nan")
    print(
        f"trained {result.step} steps in {train_s:.0f} s: loss {initial:.3f} -> {final:.3f}; "
        f"saved to {cfg.out_dir} (checkpoint {result.checkpoint})"
    )
    return _TrainedRun(model, init_state, result, train_s, initial, final)


def _write_sampling_settings(out: str | Path, config: Any) -> int:
    """Write the run's ``generation_config.json``; return its answer length.

    The settings fit the task (the longest prompt plus the answer fill the trained rows), so
    ``llada-ext sample --model <out>`` works on the folder as it is.
    """
    gen = DEMO_SEQ_LEN - max(len(r["prompt"]) for r in load_demo_corpus("train"))
    write_generation_config(out, {"gen_length": gen, "steps": gen, "block_length": gen}, config)
    return gen


def _evaluate_saved_run(
    out: str | Path, test: list[dict[str, str]], *, device: torch.device, backend: str
) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Evaluate the saved run, loaded as a user would load it, and print the accuracy."""
    from .model import LLaDAModel

    loaded = LLaDAModel.from_pretrained(out, device=device, backend=backend)
    acc, examples = evaluate_exact_match(loaded, test)
    print(f"held-out exact match over {len(test)} prompts (chance ~0%):")
    for task, a in acc.items():
        if task != "all":
            print(f"  {task:8s} {100 * a:5.1f}%")
    print(f"  {'all':8s} {100 * acc['all']:5.1f}%")
    for prompt, want, got in examples[:6]:
        mark = "ok " if want == got else "err"
        print(f"  [{mark}] {prompt}{got!r:10s} (expected {want!r})")
    return acc, examples


def _print_try_it(out: str | Path, examples: list[tuple[str, str, str]], gen: int) -> None:
    """Print a ``llada-ext sample`` command on the run and the answer it gives."""
    # A held-out prompt whose evaluation ran with the folder's own settings (prompt and
    # answer fill the trained rows), so the printed command answers exactly as shown.
    fits = [e for e in examples if len(e[0]) + gen == DEMO_SEQ_LEN] or examples
    prompt, _, got = fits[0]
    # the very executable that ran the demo (scripts/demo.sh runs .venv/bin/llada-ext)
    exe = sys.argv[0] if os.path.basename(sys.argv[0]) == "llada-ext" else "llada-ext"
    print(f"try it: {exe} sample --model {shlex.quote(str(out))} --prompt {shlex.quote(prompt)}")
    print(f"  it prints: {prompt}{got}")


def _time_backends(
    init_state: torch.nn.Module, dataset: Any, device: torch.device
) -> dict[str, float]:
    """Training tokens per second with each backend that runs on ``device``; printed."""
    rates = {}
    for b in ("kernels", "torch"):
        if b == "kernels" and not _kernels_available(device):
            continue
        rates[b] = measure_throughput(init_state, dataset, backend=b, device=device)
    line = ", ".join(f"{b} {r:,.0f} tokens/s" for b, r in rates.items())
    if "kernels" in rates and "torch" in rates:
        line += f"; kernels / torch = {rates['kernels'] / rates['torch']:.2f}x"
    print(f"training throughput (tiny model, batch 64 x {DEMO_SEQ_LEN}, {device}): {line}")
    return rates


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Add the demo options to a parser (used by ``llada-ext demo``)."""
    p.add_argument(
        "--steps",
        type=int,
        default=1000,
        help="optimizer steps of 32 sequences each (default: %(default)s; about 2-3 minutes on "
        "a 2-core CPU)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA if available, else CPU), 'cpu' or 'cuda' (default: %(default)s)",
    )
    p.add_argument(
        "--out", default="runs/demo", help="output folder of the run (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--eval-size",
        type=int,
        default=200,
        help="held-out prompts to evaluate (default: %(default)s)",
    )
    p.add_argument("--no-throughput", action="store_true", help="skip the kernels-vs-torch timing")
    p.add_argument(
        "--overwrite", action="store_true", help="train again into an --out that holds a model"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1, the fastest for the tiny model on a shared CPU)",
    )


def run_demo_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``llada-ext demo`` (returns the exit status)."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    from .cli import apply_threads
    from .model import LLaDAConfig

    apply_threads(args.threads, LLaDAConfig.preset("tiny").d_model)  # the rule of every command
    if (Path(args.out) / "config.json").exists() and not args.overwrite:
        raise ValueError(
            f"{args.out} already holds a trained model; pass --overwrite to train it again, "
            "or --out for another folder"
        )
    res = run_demo(
        steps=args.steps,
        device=args.device,
        out=args.out,
        seed=args.seed,
        eval_size=args.eval_size,
        throughput=not args.no_throughput,
        progress=not args.no_progress,
    )
    return 130 if res.get("interrupted") else 0
