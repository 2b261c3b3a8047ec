"""lm-evaluation-harness end to end on the demo's run folder: a ``generate_until`` task and a
multiple-choice task, written as local files (no hub), scored through the ``llada_ext``
model with no model argument but the folder. Both must beat chance by a wide margin."""

from __future__ import annotations

import json
import os
import random

import pytest

# local files only: the harness's dataset library must not look for a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llada_ext import demo  # noqa: E402

N_DOCS = 40


def _distractors(task: str, s: str, rng: random.Random) -> list[str]:
    """Three wrong answers of the right length for a demo prompt."""
    right = demo.DEMO_TASKS[task](s)
    out: list[str] = []
    candidates = [s[::-1] if task == "copy" else s, right[1:] + right[0]]
    while len(out) < 3:
        c = candidates.pop() if candidates else "".join(rng.sample(demo.DEMO_ALPHABET, len(s)))
        if c != right and c not in out:
            out.append(c)
    return out


def _write_tasks(folder) -> list[str]:
    rng = random.Random(0)
    docs = demo.load_demo_corpus("test")[:N_DOCS]
    gen, mc = [], []
    for d in docs:
        s = d["prompt"].split(": ", 1)[1].split(" =", 1)[0]
        gen.append({"prompt": d["prompt"], "response": d["response"]})
        choices = [d["response"], *_distractors(d["task"], s, rng)]
        rng.shuffle(choices)
        mc.append(
            {
                "question": d["prompt"].rstrip(),
                "choices": choices,
                "label": choices.index(d["response"]),
            }
        )
    for name, rows in (("gen", gen), ("mc", mc)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "demo_gen.yaml").write_text(
        f"""task: demo_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response}}}}"
generation_kwargs:
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    (folder / "demo_mc.yaml").write_text(
        f"""task: demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    return ["demo_gen", "demo_mc"]


def test_local_tasks_score_above_chance_on_the_demo_model(demo_run, tmp_path):
    pytest.importorskip("lm_eval.api.model")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llada_ext.eval_harness  # noqa: F401  (registers the "llada_ext" model)

    tasks = _write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model="llada_ext",
        model_args=f"pretrained={demo_run.folder}",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tmp_path)),
        device="cpu",
    )["results"]
    gen_em = results["demo_gen"]["exact_match,none"]
    mc_acc = results["demo_mc"]["acc,none"]
    # chance: ~0 for a 3-5 letter answer over 8 letters, 1/4 for four choices
    assert gen_em >= 0.15, results["demo_gen"]
    assert mc_acc >= 0.5, results["demo_mc"]
