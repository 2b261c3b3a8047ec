"""Tests of the ``llada-ext`` command line: help, usage and plain one-line errors, a tiny
train / resume / SFT run with sampling and log-likelihood from the saved folder, ``bench``,
training inputs and presets refused in one line, the thread rule, and ``demo`` refusing to
overwrite a finished run. The options of ``sample`` and ``loglik`` are in test_cli_sample.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import llada_ext
from llada_ext.cli import main
from llada_ext.model import LLaDAModel

SMALL = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 1,
    "mlp_hidden_size": 48,
    "vocab_size": 260,
    "max_sequence_length": 64,
    "rope_theta": 10000.0,
    "mask_token_id": 258,
    "eos_token_id": 257,
    "bos_token_id": 256,
    "pad_token_id": 257,
    "eot_token_id": 259,
}


# one torch thread per test (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def write_small_config(path: Path) -> Path:
    """The ``SMALL`` architecture as a config.json file at ``path``."""
    path.write_text(json.dumps(SMALL))
    return path


def write_corpus(path: Path) -> Path:
    """A JSONL file of 20 short documents at ``path``."""
    lines = [
        json.dumps({"text": f"the {w} sat on the mat number {i}."})
        for i, w in enumerate(["cat", "dog", "bird", "fox", "owl"] * 4)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_argv(command: str, data: Path, out: Path, *options: str) -> list[str]:
    """``train`` / ``sft`` on ``data`` into ``out`` on the CPU without a progress bar."""
    quiet = ("--no-progress", "--device", "cpu")
    return [command, "--data", str(data), "--out", str(out), *options, *quiet]


@pytest.fixture
def small_config(tmp_path):
    return write_small_config(tmp_path / "small.json")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


def test_help_for_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sft", "sample", "loglik", "bench", "demo"):
        assert cmd in out
    for cmd in ("train", "sft", "sample", "loglik", "demo"):
        assert main([cmd, "--help"]) == 0
        text = capsys.readouterr().out
        assert "default" in text and "--device" in text
    text = (main(["train", "--help"]), capsys.readouterr().out)[1]
    for opt in (
        "--batch-size",
        "--grad-accum",
        "--lr",
        "--warmup-steps",
        "--resume",
        "--seq-len",
        "--gradient-checkpointing",
        "--fsdp",
        "--keep-last",
    ):
        assert opt in text


def test_usage_errors_exit_2(capsys) -> None:
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["train", "--steps", "many"]) == 2
    capsys.readouterr()
    # a mistyped sub-command flag shows that sub-command's usage, not the top level's
    assert main(["sample", "--model", "m", "--gen-lenght", "8"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("usage: llada-ext sample") and "unrecognized arguments: --gen-lenght" in err
    )


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llada-ext {llada_ext.__version__}"


def test_user_errors_are_plain_lines(tmp_path, small_config, capsys) -> None:
    cases = [
        (
            ["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
            "not found",
        ),
        (["train", "--out", str(tmp_path / "o")], "no training data"),
        (["sample", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"], "not found"),
        (
            ["loglik", "--model", str(tmp_path / "nowhere"), "--prompt", "a", "--answer", "b"],
            "not found",
        ),
    ]
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text("{oops")
    data = tmp_path / "d.txt"
    data.write_text("some text for training")
    cases.append(
        (
            [
                "train",
                "--data",
                str(data),
                "--model-config",
                str(bad_cfg),
                "--out",
                str(tmp_path / "o"),
            ],
            "bad JSON",
        )
    )
    cases.append(
        (
            [
                "train",
                "--data",
                str(data),
                "--model-config",
                str(small_config),
                "--out",
                str(tmp_path / "o"),
                "--steps",
                "0",
            ],
            "steps",
        )
    )
    for argv, words in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert words in err, (argv, err)
        assert "Traceback" not in err
        assert err.startswith("error:")


def test_train_resume_sample_loglik(tmp_path, small_config, corpus, capsys) -> None:
    out = tmp_path / "run"
    base = train_argv(
        "train",
        corpus,
        out,
        *("--model-config", str(small_config), "--seq-len", "24", "--batch-size", "2"),
        *("--warmup-steps", "1", "--seed", "3"),
    )
    assert main(base + ["--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "step 3/3" in text
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step-00000003.pt").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3

    assert main(base + ["--steps", "5", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "step 5/5" in text
    model = LLaDAModel.from_pretrained(out)
    assert model.config.d_model == 32

    sample = ["sample", "--model", str(out), "--prompt", "the cat", "--prompt", "a", "--json"]
    sample += ["--gen-length", "8", "--steps", "4", "--block-length", "4", "--device", "cpu"]
    assert main(sample) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["prompt"] == "the cat" and isinstance(rec["answer"], str)

    loglik = ["loglik", "--model", str(out), "--prompt", "the cat", "--answer", " sat"]
    loglik += ["--mc-num", "4", "--batch-size", "2", "--device", "cpu"]
    assert main(loglik) == 0
    ll = float(capsys.readouterr().out.strip())
    assert ll < 0.0


def test_sft_command(tmp_path, small_config, capsys) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"q{i} ", "response": f"a{i}"}) for i in range(9)) + "\n"
    )
    out = tmp_path / "sft"
    argv = train_argv(
        "sft",
        data,
        out,
        *("--model-config", str(small_config), "--seq-len", "12", "--batch-size", "3"),
        *("--steps", "2", "--warmup-steps", "1"),
    )
    assert main(argv) == 0
    assert "sft:" in capsys.readouterr().out
    # Continue from the pre-trained weights of the first run.
    out2 = tmp_path / "sft2"
    argv2 = train_argv(
        "sft",
        data,
        out2,
        *("--init-from", str(out), "--seq-len", "12", "--batch-size", "3", "--steps", "1"),
    )
    assert main(argv2) == 0
    assert (out2 / "model.safetensors").is_file()


def test_bench_missing_module_exits_2(monkeypatch, capsys) -> None:
    monkeypatch.delattr(llada_ext, "bench", raising=False)
    monkeypatch.setitem(sys.modules, "llada_ext.bench", None)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_bench_forwards_arguments(monkeypatch) -> None:
    import types

    seen = {}
    fake = types.ModuleType("llada_ext.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "llada_ext.bench", fake)
    monkeypatch.setattr(llada_ext, "bench", fake, raising=False)
    assert main(["bench", "--cpu", "--quick"]) == 0
    assert seen["argv"] == ["--cpu", "--quick"]


def test_hostile_training_inputs_are_one_line_errors(tmp_path, corpus, capsys) -> None:
    """A JSONL line nested 100,000 deep, an absurd --seq-len, an unknown --device and an
    unexpected internal error: one plain line each, exit code 1, no traceback."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    out = ["--out", str(tmp_path / "o"), "--preset", "tiny", "--steps", "1"]
    cases = [
        (["train", "--data", str(deep), *out], "nested too deeply"),
        (["train", "--data", str(corpus), "--seq-len", "1000000000", *out], "--seq-len"),
        (["train", "--data", str(corpus), "--device", "bogus", *out], "bogus"),
    ]
    for argv, words in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_cpu_out_of_memory_is_one_line(monkeypatch, tmp_path, corpus, capsys) -> None:
    """torch's CPU allocator failure ("DefaultCPUAllocator: can't allocate memory") gets the
    out-of-memory advice, not a traceback."""
    import llada_ext.training as training

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried")

    monkeypatch.setattr(training, "build_pretrain_dataset", no_memory)
    argv = ["train", "--data", str(corpus), "--out", str(tmp_path / "o"), "--preset", "tiny"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of CPU memory") and err.count("\n") == 1


def test_8b_preset_on_a_small_cpu_machine_is_refused_up_front(tmp_path, corpus) -> None:
    """--preset 8b on the CPU needs ~120 GiB to train: said and refused before allocating.
    Run in a child limited to 8 GiB of address space, so a regression fails cleanly."""
    import os
    import resource
    import subprocess

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total > 120 * 2**30:
        pytest.skip("this machine could hold it")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    argv = ["train", "--data", str(corpus), "--out", str(tmp_path / "o"), "--preset", "8b"]
    proc = subprocess.run(
        [sys.executable, "-m", "llada_ext.cli", *argv, "--device", "cpu"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr
    assert err.startswith("error: training this model on the CPU needs at least 119 GiB"), err
    assert err.count("\n") == 1


def test_one_thread_default_for_small_models(tmp_path, corpus) -> None:
    """Every sub-command shares the thread rule: a small model runs on one thread unless
    --threads says otherwise."""
    base = ["train", "--data", str(corpus), "--out", str(tmp_path / "o"), "--preset", "tiny"]
    base += ["--steps", "1", "--no-progress"]
    torch.set_num_threads(2)
    assert main(base) == 0
    assert torch.get_num_threads() == 1
    assert main([*base, "--threads", "2", "--out", str(tmp_path / "p")]) == 0
    assert torch.get_num_threads() == 2


def test_demo_refuses_to_overwrite_a_finished_run(tmp_path, capsys) -> None:
    run = tmp_path / "demo"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["demo", "--out", str(run), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "already holds a trained model; pass --overwrite" in err
