"""The ``sample`` and ``loglik`` commands of ``llada-ext``, on one tiny model trained once for
the module: prompts from standard input, ``--show-steps``, batches that match one prompt at a
time, the chat modes, the speed options reaching the sampler, bad options as one-line errors,
several answers ranked by ``loglik``, and the sampling defaults a run folder carries.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from conftest import TorchThreads
from test_cli import SMALL, train_argv, write_corpus, write_small_config

from llada_ext.cli import main

# one torch thread per test (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


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
