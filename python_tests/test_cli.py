"""Tests of the ``llada-ext`` command line: help, plain errors, a tiny train / resume / SFT
run, sampling and log-likelihood from the saved folder."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TorchThreads

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


# ------------------------------------------------------------------------------------------
# sample / loglik options, on one tiny model trained once for the module
# ------------------------------------------------------------------------------------------
# 8 answer tokens in 2 blocks, one token per step: after step n, 8 - n masks are left
SAMPLE = ["--gen-length", "8", "--steps", "8", "--block-length", "4", "--device", "cpu"]
SPEED_KEYS = (
    "cache",
    "cache_refresh",
    "threshold",
    "factor",
    "cuda_graphs",
    "eos_early_stop",
    "forbid_eos",
    "zero_eos_confidence",
    "callback",
    "attention_mask",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Folder of a tiny byte-level model trained for a few steps (saved once per module)."""
    root = tmp_path_factory.mktemp("trained")
    out = root / "run"
    argv = train_argv(
        "train",
        write_corpus(root / "corpus.jsonl"),
        out,
        *("--model-config", str(write_small_config(root / "small.json"))),
        *("--seq-len", "24", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1"),
        *("--steps", "120"),  # enough for answers that depend on the prompt
    )
    with TorchThreads(1):
        assert main(argv) == 0
    return str(out)


class _Stdin(io.StringIO):
    """Standard input replacement that says whether it is a terminal."""

    def __init__(self, text: str, tty: bool = False) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def sampler_calls(monkeypatch):
    """Records the arguments of every ``generate`` call the CLI makes (and runs it)."""
    import llada_ext.sampling as sampling

    real = sampling.generate
    calls = []

    def spy(model, prompt_ids, **kwargs):
        calls.append({"prompt_ids": prompt_ids.clone(), **kwargs})
        return real(model, prompt_ids, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    return calls


def _sample_json(argv, capsys) -> list[dict]:
    assert main(["sample", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_sample_reads_prompts_from_stdin(trained, monkeypatch, capsys) -> None:
    base = ["--model", trained, *SAMPLE]
    monkeypatch.setattr(sys, "stdin", _Stdin("the cat\n\n  \na dog\n"))
    recs = _sample_json(base, capsys)
    assert [r["prompt"] for r in recs] == ["the cat", "a dog"]
    monkeypatch.setattr(sys, "stdin", _Stdin("unused\n"))
    direct = _sample_json(base + ["--prompt", "the cat", "--prompt", "a dog"], capsys)
    assert direct == recs  # stdin is not read when --prompt is given
    assert sys.stdin.tell() == 0

    # '-' reads standard input in place, for --prompt and --prompt-file alike
    monkeypatch.setattr(sys, "stdin", _Stdin("the cat\n"))
    recs = _sample_json(base + ["--prompt", "-", "--prompt", "a dog"], capsys)
    assert [r["prompt"] for r in recs] == ["the cat", "a dog"] and recs == direct
    monkeypatch.setattr(sys, "stdin", _Stdin("a dog\nthe cat\n"))
    recs = _sample_json(base + ["--prompt-file", "-"], capsys)
    assert [r["prompt"] for r in recs] == ["a dog", "the cat"]

    # a terminal is never read; an empty pipe gives the plain "no prompt" error
    for stdin in (_Stdin("the cat\n", tty=True), _Stdin("")):
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["sample", *base]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: no prompt") and err.count("\n") == 1
    assert sys.stdin.tell() == 0


def test_sample_show_steps(trained, capsys) -> None:
    assert main(["sample", "--model", trained, *SAMPLE, "--prompt", "the cat", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # nothing without --show-steps
    answer = json.loads(captured.out)["answer"]
    argv = ["sample", "--model", trained, *SAMPLE, "--prompt", "the cat", "--show-steps"]
    assert main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["answer"] == answer
    legend, *lines = captured.err.splitlines()
    assert "<eos>" in legend and "masked" in legend
    assert len(lines) == 8
    canvases = []
    for n, line in enumerate(lines, start=1):
        head = f"step {n}/8: "
        assert line.startswith(head), line
        canvases.append(line[len(head) :])
    assert [c.count("_") for c in canvases] == [7, 6, 5, 4, 3, 2, 1, 0]
    # the second block stays masked while the first fills
    assert all(c.endswith("____") for c in canvases[:3])
    # the last frame is the answer, then nothing or its end tokens, each marked
    assert canvases[-1].startswith(answer)
    rest = canvases[-1][len(answer) :]
    assert rest == "" or rest.startswith(("<eos>", "<eot>")), canvases[-1]

    # several prompts sampled together: one line per step and prompt, numbered
    argv = ["sample", "--model", trained, *SAMPLE, "--prompt", "the cat", "--prompt", "a"]
    assert main(argv + ["--show-steps", "--batch-size", "2"]) == 0
    _, *lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 16
    assert lines[0].startswith("step 1/8 [1]: ") and lines[1].startswith("step 1/8 [2]: ")
    assert lines[-1].startswith("step 8/8 [2]: ") and "_" not in lines[-1]


def test_sample_batches_match_one_at_a_time(trained, sampler_calls, capsys) -> None:
    prompts = ["the cat", "a", "the bird sat on", "fox"]
    argv = ["--model", trained, *SAMPLE]
    for p in prompts:
        argv += ["--prompt", p]
    single = _sample_json(argv, capsys)
    assert len({r["answer"] for r in single}) > 1  # a prompt-blind model would prove nothing
    assert len(sampler_calls) == 4
    assert all("attention_mask" not in c for c in sampler_calls)
    sampler_calls.clear()
    for bs in (2, 3):
        assert _sample_json(argv + ["--batch-size", str(bs)], capsys) == single
    assert [tuple(c["prompt_ids"].shape) for c in sampler_calls] == [
        (2, 7),
        (2, 15),
        (3, 15),
        (1, 3),
    ]
    # left padding with EOS, hidden by the attention mask
    first = sampler_calls[0]
    assert first["prompt_ids"][1].tolist() == [SMALL["eos_token_id"]] * 6 + [ord("a")]
    assert first["attention_mask"].tolist() == [[1] * 7, [0] * 6 + [1]]
    assert "attention_mask" not in sampler_calls[-1]  # a lone prompt needs no padding


def test_sample_chat_modes(trained, sampler_calls, capsys) -> None:
    from llada_ext.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    argv = ["sample", "--model", trained, *SAMPLE, "--prompt", "hi"]
    for extra, chat in (
        ([], False),  # auto: the byte tokenizer has no template of its own
        (["--chat"], True),
        (["--chat", "on"], True),
        (["--chat", "off"], False),
        (["--no-chat"], False),
        (["--chat", "auto"], False),
    ):
        sampler_calls.clear()
        assert main(argv + extra) == 0, extra
        out = capsys.readouterr().out.strip()
        ids = sampler_calls[0]["prompt_ids"][0].tolist()
        if chat:
            assert ids == tok.apply_chat_template([{"role": "user", "content": "hi"}])
            assert not out.startswith("hi")
        else:
            assert ids == tok.encode("hi") and out.startswith("hi")


def test_chat_auto_follows_the_tokenizer_template(tmp_path) -> None:
    from llada_ext.cli import _chat_enabled
    from llada_ext.tokenizer import ByteTokenizer

    class Tok:  # an HF-style tokenizer
        chat_template = None

    assert not _chat_enabled("auto", Tok(), str(tmp_path))
    assert _chat_enabled("on", Tok(), str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert _chat_enabled("auto", Tok(), str(tmp_path))
    assert not _chat_enabled("off", Tok(), str(tmp_path))
    assert not _chat_enabled("auto", ByteTokenizer(), str(tmp_path))
    Tok.chat_template = "{{ x }}"
    assert _chat_enabled("auto", Tok(), str(tmp_path / "elsewhere"))


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], {}),
        (["--cache", "prefix"], {"cache": "prefix"}),
        (["--cache", "dual", "--cache-refresh", "2"], {"cache": "dual", "cache_refresh": 2}),
        (["--threshold", "0.9"], {"threshold": 0.9}),
        (["--factor", "1.0"], {"factor": 1.0}),
        (["--eos-early-stop"], {"eos_early_stop": True, "eos_id": 257, "eot_id": 259}),
        (["--forbid-eos"], {"forbid_eos": True, "eos_id": 257, "eot_id": 259}),
        (["--zero-eos-confidence"], {"zero_eos_confidence": True, "eos_id": 257, "eot_id": 259}),
    ],
)
def test_sample_speed_options_reach_the_sampler(
    trained, sampler_calls, capsys, extra, expected
) -> None:
    recs = _sample_json(["--model", trained, *SAMPLE, "--prompt", "the cat", *extra], capsys)
    assert len(recs) == 1 and isinstance(recs[0]["answer"], str)
    (call,) = sampler_calls
    # options left at their defaults are not passed at all
    passed = {k: call[k] for k in (*SPEED_KEYS, "eos_id", "eot_id") if k in call}
    assert passed == expected


def test_sample_bad_options_are_one_line_errors(trained, monkeypatch, capsys) -> None:
    base = ["sample", "--model", trained, *SAMPLE, "--prompt", "the cat"]
    cases = [
        (["--threshold", "nan"], "threshold"),
        (["--factor", "0"], "factor"),
        (["--threshold", "0.9", "--factor", "1"], "pick one"),
        (["--factor", "1", "--remasking", "random"], "factor"),
        (["--cache-refresh", "2"], "--cache prefix"),
        (["--cache", "prefix", "--cache-refresh", "0"], "--cache-refresh"),
        (["--batch-size", "0"], "--batch-size"),
        (["--cuda-graphs"], "CUDA device"),
        (["--steps", "3"], "steps"),
        (["--prompt", ""], "prompt number 2 is empty"),
        (["--gen-length", "1000000000", "--block-length", "1000000000"], "gen_length"),
        (["--steps", "1000000000000"], "steps"),
    ]
    for extra, words in cases:
        assert main(base + extra) == 1, extra
        captured = capsys.readouterr()
        assert captured.out == ""
        err = captured.err
        assert err.startswith("error:") and words in err, (extra, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (extra, err)
    assert main(base + ["--cache", "bogus"]) == 2
    capsys.readouterr()

    # a sampler message spread over several lines still prints as one
    import llada_ext.sampling as sampling

    def broken(*args, **kwargs):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(sampling, "generate", broken)
    assert main(base) == 1
    assert capsys.readouterr().err == "error: first line second line\n"


def test_loglik_ranks_several_answers(trained, capsys) -> None:
    base = ["loglik", "--model", trained, "--prompt", "the cat", "--device", "cpu"]
    base += ["--mc-num", "4", "--batch-size", "2", "--seed", "5"]
    answers = [" sat", " on the mat", " sat on"]
    single = {}
    for a in answers:
        assert main(base + ["--answer", a]) == 0
        single[a] = capsys.readouterr().out.strip()
    values = [float(single[a]) for a in answers]
    assert len(set(values)) == 3

    argv = base + [x for a in answers for x in ("--answer", a)]
    assert main(argv) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    # common random numbers: each score is the one-answer estimate with the same seed
    assert [r[0] for r in rows] == [single[a] for a in answers]
    assert [r[1] for r in rows] == answers
    best = values.index(max(values))
    assert [r[2:] for r in rows] == [["*"] if i == best else [] for i in range(3)]

    assert main(argv + ["--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["answer"] for r in recs] == answers
    assert [r["best"] for r in recs] == [i == best for i in range(3)]
    assert [r["loglik"] for r in recs] == pytest.approx(values, abs=1e-6)

    # per-token scores: divided by the answer's length in (byte) tokens
    assert main(argv + ["--normalize", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    per_token = [v / len(a.encode()) for v, a in zip(values, answers)]
    assert [r["loglik"] for r in recs] == pytest.approx(per_token, abs=1e-6)
    assert [r["best"] for r in recs] == [i == per_token.index(max(per_token)) for i in range(3)]

    # one answer: a single number, also with --normalize; --json gives a one-item list
    assert main(base + ["--answer", " sat", "--normalize"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(per_token[0], abs=1e-6)
    assert main(base + ["--answer", " sat", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert recs == [{"answer": " sat", "loglik": pytest.approx(values[0], abs=1e-6), "best": True}]

    assert main(base + ["--answer", " sat", "--answer", ""]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --answer number 2 is empty") and err.count("\n") == 1


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


def test_run_folders_describe_their_sampling(trained, tmp_path, capsys) -> None:
    """train writes a generation_config.json that fits its rows; sample takes its defaults
    from it, and explicit options still win."""
    import shutil

    from llada_ext.generation_config import fitting

    settings = json.loads((Path(trained) / "generation_config.json").read_text())
    ids = {"mask_id": 258, "eos_id": 257, "eot_id": 259}  # the tiny preset's special ids
    assert settings == {**fitting(24), **ids}  # the --seq-len the fixture trained with
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    bad = {**settings, "gen_length": 6, "block_length": 4}  # 4 does not divide 6
    (folder / "generation_config.json").write_text(json.dumps(bad))
    argv = ["sample", "--model", str(folder), "--prompt", "the cat", "--device", "cpu"]
    assert main(argv) == 1
    assert "gen_length (6) must be a multiple of block_length (4)" in capsys.readouterr().err
    assert main([*argv, "--gen-length", "8", "--steps", "4"]) == 0
    capsys.readouterr()


def test_demo_refuses_to_overwrite_a_finished_run(tmp_path, capsys) -> None:
    run = tmp_path / "demo"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["demo", "--out", str(run), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "already holds a trained model; pass --overwrite" in err
