"""What the README and examples/python show, run as written on the model the demo trains.

The README's first command is ``bash scripts/demo.sh``, which runs ``llada-ext demo`` (the
``demo_run`` fixture runs exactly that); the test command is ``.ci/run`` itself. Here: the
``sample`` command the demo prints, every Python snippet of the README, every line of its
command-line block, and ``examples/python/quickstart.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llada_ext as lx

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _python_blocks() -> list[str]:
    return [code for lang, code in BLOCKS if lang == "python"]


def _checkout(demo_run) -> Path:
    """The demo's folder with the checkout's files the README commands name."""
    for name in ("README.md", "llada_ext", "examples"):
        link = demo_run.cwd / name
        if not link.exists():
            link.symlink_to(REPO / name)
    return demo_run.cwd


def _env(demo_run) -> dict[str, str]:
    bin_dir = str(Path(demo_run.exe[0]).parent) if len(demo_run.exe) == 1 else None
    env = dict(os.environ)
    if bin_dir:
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def test_readme_starts_with_its_two_commands():
    first = BLOCKS[0]
    assert first[0] == "bash"
    commands = [line.split("#")[0].strip() for line in first[1].splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    assert "llada-ext demo" in (REPO / "scripts" / "demo.sh").read_text()


def test_the_demo_prints_a_sample_command_that_answers_as_shown(demo_run):
    lines = demo_run.stdout.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("try it: "))
    command = shlex.split(lines[i][len("try it: ") :])
    shown = lines[i + 1].strip()
    assert shown.startswith("it prints: ")
    proc = subprocess.run(
        command, cwd=demo_run.cwd, capture_output=True, text=True, timeout=300, env=_env(demo_run)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == shown[len("it prints: ") :]
    # and the demo's model has learned its task: that answer is right
    prompt = command[command.index("--prompt") + 1]
    task, word = prompt.split(": ")[0], prompt.split(": ")[1].split(" =")[0]
    from llada_ext import demo

    assert proc.stdout.strip() == prompt + demo.DEMO_TASKS[task](word)


def test_readme_kernel_snippet():
    code = _python_blocks()[0]
    assert "lx.attention" in code
    exec(compile(code, "README.md", "exec"), {})


def test_readme_model_snippet(demo_run, capsys):
    code = _python_blocks()[1]
    assert 'from_pretrained("runs/demo")' in code
    cwd = os.getcwd()
    os.chdir(_checkout(demo_run))
    try:
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.strip() == "['dcba']"  # what the snippet's comment says
    assert ns["out"].shape == (1, 16 + ns["settings"]["gen_length"])
    assert ns["ll"] < 0


def test_readme_hugging_face_snippet(monkeypatch):
    """The snippet as written, with the hub download replaced by a small model of the
    reference code carrying LLaDA's vocabulary and special ids."""
    hf_test = pytest.importorskip("test_hf_llada")  # skips without the reference code
    code = _python_blocks()[2]
    assert "patch_hf_llada" in code and "from_hf" in code
    import transformers

    def small(name, **kw):
        assert name == "GSAI-ML/LLaDA-8B-Instruct" and kw["trust_remote_code"] is True
        model = hf_test.hf_llada.LLaDAModelLM(
            hf_test.hf_config(
                d_model=32,
                n_heads=2,
                n_kv_heads=2,
                mlp_hidden_size=48,
                vocab_size=126464,
                embedding_size=126464,
                mask_token_id=126336,
                eos_token_id=126081,
                pad_token_id=126081,
            ),
            init_params=True,
        )
        return model.to(kw["torch_dtype"]).eval()

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", small)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["out"].shape == (1, 4 + 32) and not (ns["out"] == 126336).any()
    assert ns["model"].model.transformer.wte.weight is ns["hf"].model.transformer.wte.weight


def _command_lines(marker: str = "The command line") -> list[str]:
    """The lines of the first bash block after `marker` (trailing comments dropped)."""
    i = README.index(marker)
    block = re.search(r"```bash\n(.*?)```", README[i:], flags=re.S).group(1)
    lines = [line.split("   #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_command_lines(demo_run):
    cwd = _checkout(demo_run)
    lines = _command_lines()
    assert lines[0] == "llada-ext demo"  # ran by the fixture, exactly so
    # then the token-shard block, and the memory plan of the multi-node block (the torchrun
    # and export lines there need several machines and a finished 8B run)
    shard_lines = _command_lines("Large corpora are tokenized")
    dry_run = [ln for ln in _command_lines("### Training on several machines") if "--dry-run" in ln]
    assert len(shard_lines) == 4 and len(dry_run) == 1
    outputs = {}
    for line in lines[1:] + shard_lines + dry_run:  # in order: later lines use earlier runs
        proc = subprocess.run(
            ["bash", "-c", line],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            env=_env(demo_run),
        )
        assert proc.returncode == 0, (line, proc.stdout[-1500:], proc.stderr[-1500:])
        outputs[line] = proc.stdout
    first = outputs[lines[1]].strip()
    assert first == "reverse: abcd = dcba"  # what the README's comment says
    assert (cwd / "runs" / "sft" / "config.json").is_file()
    assert lx.__version__ in outputs["llada-ext --version"]
    assert (cwd / "runs" / "sft-shards" / "config.json").is_file()
    assert "GiB" in outputs[dry_run[0]]  # the dry run's memory plan


def test_python_quickstart_example(demo_run):
    script = REPO / "examples" / "python" / "quickstart.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(demo_run.folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "generate: reverse: abcd = dcba"
    scores = [float(line.rsplit("~ ", 1)[1]) for line in out[1:3]]
    assert scores[0] > scores[1]  # the right answer is the more likely one
    loss = float(out[3].rsplit(" ", 1)[1])
    assert out[3].startswith("one SFT step: loss") and torch.isfinite(torch.tensor(loss))
