"""Tests of the ``llada-ext`` command line: help, plain errors, a tiny train / resume / SFT
run, sampling and log-likelihood from the saved folder."""

from __future__ import annotations

import json
import sys

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


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: one thread is fastest and avoids OpenMP spin-waits on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_config(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(SMALL))
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"text": f"the {w} sat on the mat number {i}."})
        for i, w in enumerate(["cat", "dog", "bird", "fox", "owl"] * 4)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


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
    base = [
        "train",
        "--data",
        str(corpus),
        "--model-config",
        str(small_config),
        "--out",
        str(out),
        "--seq-len",
        "24",
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]
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

    assert (
        main(
            [
                "sample",
                "--model",
                str(out),
                "--prompt",
                "the cat",
                "--prompt",
                "a",
                "--gen-length",
                "8",
                "--steps",
                "4",
                "--block-length",
                "4",
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["prompt"] == "the cat" and isinstance(rec["answer"], str)

    assert (
        main(
            [
                "loglik",
                "--model",
                str(out),
                "--prompt",
                "the cat",
                "--answer",
                " sat",
                "--mc-num",
                "4",
                "--batch-size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ll = float(capsys.readouterr().out.strip())
    assert ll < 0.0


def test_sft_command(tmp_path, small_config, capsys) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"q{i} ", "response": f"a{i}"}) for i in range(9)) + "\n"
    )
    out = tmp_path / "sft"
    argv = [
        "sft",
        "--data",
        str(data),
        "--model-config",
        str(small_config),
        "--out",
        str(out),
        "--seq-len",
        "12",
        "--batch-size",
        "3",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert "sft:" in capsys.readouterr().out
    # Continue from the pre-trained weights of the first run.
    out2 = tmp_path / "sft2"
    argv2 = [
        "sft",
        "--data",
        str(data),
        "--init-from",
        str(out),
        "--out",
        str(out2),
        "--seq-len",
        "12",
        "--batch-size",
        "3",
        "--steps",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
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
