"""benchmarks/gpu_check.sh as a dry run: the stage runner, the time budget, skipping and
failure handling, the summary files and the exit status, on a CPU and without building
anything (every stage's commands are replaced by stand-ins that print them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = [
    "preflight",
    "build",
    "cuda_tests",
    "memcheck",
    "racecheck",
    "bench_attention",
    "bench_ce_remask",
    "throughput",
]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def dry_env(**extra: str) -> dict:
    """The environment of a dry run: GPU_CHECK_DRY_RUN=1 always (a real run would build the
    extension in place), none of the caller's GPU_CHECK_* settings, this interpreter."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    e.update(PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", **extra)
    return e


def run_check(
    out: Path, *args: str, env: Optional[dict] = None
) -> tuple[subprocess.CompletedProcess, Optional[dict]]:
    """Run the script as a dry run with results in ``out``; returns the process and the
    parsed summary.json (None when it was not written)."""
    p = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out), *args],
        env=dry_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else None
    assert summary is None or summary["dry_run"] is True
    return p, summary


def by_name(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["stages"]}


def test_all_stages_pass_and_summary_is_written(tmp_path):
    before = sorted(p.name for p in (ROOT / "build").glob("gpu-check-*"))
    out = tmp_path / "res"
    p, summary = run_check(out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert summary is not None
    # every stage, in order, passed, with its own log holding the stand-in
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "passed" for s in summary["stages"]), summary["stages"]
    for name in STAGES:
        log = (out / f"{name}.log").read_text()
        assert "dry run: stand-in" in log, name
    assert "+ env LLADA_CUDA=1 LLADA_EMU=0" in (out / "build.log").read_text()
    assert " -x" not in (out / "cuda_tests.log").read_text()
    # the printed table names every stage with its status
    table = p.stdout[p.stdout.index("summary (") :]
    for name in STAGES:
        assert any(line.split()[:2] == [name, "passed"] for line in table.splitlines()), name
    # the fields the summary promises
    assert summary["dry_run"] is True
    assert summary["passed"] is True and summary["exit_status"] == 0
    assert set(summary["device"]) >= {"name", "compute_capability"}
    assert set(summary["driver"]) >= {"version", "cuda", "ok_for_runtime"}
    assert set(summary["cuda"]) >= {"toolkit", "runtime_linked", "torch"}
    assert summary["date"][:4].isdigit() and summary["date"].endswith("Z")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if head:
        assert summary["commit"].startswith(head)
    md = (out / "summary.md").read_text()
    for word in ("device", "driver", "CUDA", "commit", "date", *STAGES):
        assert word in md, word
    # a dry run builds nothing
    assert sorted(p.name for p in (ROOT / "build").glob("gpu-check-*")) == before


def test_forced_failure_fails_the_run_and_later_stages_still_run(tmp_path):
    out = tmp_path / "res"
    p, summary = run_check(out, env={"GPU_CHECK_DRY_FAIL": "cuda_tests"})
    assert p.returncode == 1, p.stdout + p.stderr
    stages = by_name(summary)
    assert stages["cuda_tests"]["status"] == "failed"
    assert "exit status 1" in stages["cuda_tests"]["note"]
    assert "cuda_tests: failed" in p.stdout
    assert "forced failure of stage cuda_tests" in (out / "cuda_tests.log").read_text()
    # the stages before and after it ran and passed
    for name in STAGES:
        if name != "cuda_tests":
            assert stages[name]["status"] == "passed", name
    assert summary["passed"] is False and summary["exit_status"] == 1
    assert "FAILED" in (out / "summary.md").read_text()


def test_failed_build_skips_the_stages_that_need_it(tmp_path):
    p, summary = run_check(tmp_path / "res", env={"GPU_CHECK_DRY_FAIL": "build"})
    assert p.returncode == 1
    stages = by_name(summary)
    assert stages["preflight"]["status"] == "passed"
    assert stages["build"]["status"] == "failed"
    for name in STAGES[2:]:
        assert stages[name]["status"] == "skipped", name
        assert "build failed" in stages[name]["note"], name


def test_tiny_budget_skips_later_stages(tmp_path):
    out = tmp_path / "res"
    p, summary = run_check(out, env={"GPU_CHECK_BUDGET": "20"})
    # everything that ran passed: skipping for time is not a failure
    assert p.returncode == 0, p.stdout + p.stderr
    stages = by_name(summary)
    assert summary["budget_s"] == 20
    assert stages["preflight"]["status"] == "passed"
    for name in STAGES[1:]:
        assert stages[name]["status"] == "skipped", name
        assert not (out / f"{name}.log").exists(), name
    assert stages["build"]["note"].startswith("out of time")
    assert "build: skipped: out of time" in p.stdout


def test_stage_overrunning_its_limit_is_stopped_and_the_rest_is_skipped(tmp_path):
    # Budget 38 s, 5 s of it kept for the summary. preflight gets its 5 s minimum; its
    # stand-in wants 12 s and is stopped at that limit. The build then has under 30 s left
    # (its minimum) only if the 5 s spent are counted, so it is skipped for time; the stages
    # after it are skipped too (for time, or for want of the build).
    t0 = time.monotonic()
    p, summary = run_check(
        tmp_path / "res", "--budget", "38", env={"GPU_CHECK_DRY_SLEEP": "preflight=12"}
    )
    wall = time.monotonic() - t0
    assert p.returncode == 1, p.stdout + p.stderr
    stages = by_name(summary)
    assert stages["preflight"]["status"] == "failed"
    assert stages["preflight"]["note"].startswith("timeout after 5s")
    assert stages["preflight"]["seconds"] <= 7
    assert stages["build"]["status"] == "skipped"
    assert stages["build"]["note"].startswith("out of time")
    for name in STAGES[2:]:
        assert stages[name]["status"] == "skipped", name
    assert summary["total_s"] <= 38
    assert wall < 12, "the stand-in was not stopped at its limit"


@pytest.mark.parametrize(
    "driver, toolkit, ok, words",
    [
        ("12.8", "13.0", "no", "DRIVER TOO OLD"),
        ("13.0", "13.1", "yes", "minor-version compatibility"),
        ("13.0", "13.0", "yes", ">= toolkit CUDA 13.0"),
    ],
)
def test_driver_verdict(tmp_path, driver, toolkit, ok, words):
    p, summary = run_check(
        tmp_path / "res",
        "--stages",
        "preflight",
        env={"GPU_CHECK_DRIVER_CUDA": driver, "GPU_CHECK_TOOLKIT_CUDA": toolkit},
    )
    assert summary["driver"]["cuda"] == driver
    assert summary["cuda"]["toolkit"] == toolkit
    assert summary["driver"]["ok_for_runtime"] == ok
    assert words in summary["driver"]["note"]
    # said before any stage runs
    assert words in p.stdout[: p.stdout.index("preflight: running")]
    stages = by_name(summary)
    assert [s for s in STAGES if stages[s]["note"] == "not requested"] == STAGES[1:]
    if ok == "no":
        assert p.returncode == 1
        assert stages["preflight"]["status"] == "failed"
        assert "driver too old" in stages["preflight"]["note"]
    else:
        assert p.returncode == 0, p.stdout + p.stderr
        assert stages["preflight"]["status"] == "passed"


def test_dry_run_flag_and_results_folder_from_the_environment(tmp_path):
    # --dry-run alone (no GPU_CHECK_DRY_RUN) and the results folder from GPU_CHECK_OUT; only
    # the preflight stage, which builds nothing even in a real run.
    out = tmp_path / "env-res"
    env = dry_env(GPU_CHECK_OUT=str(out))
    del env["GPU_CHECK_DRY_RUN"]
    p = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--stages", "preflight"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert summary["stages"][0] == {**summary["stages"][0], "name": "preflight", "status": "passed"}


@pytest.mark.parametrize(
    "args", [["--budget", "soon"], ["--stages", "preflight,nosuchstage"], ["--frobnicate"]]
)
def test_usage_errors(tmp_path, args):
    p, summary = run_check(tmp_path / "res", *args)
    assert p.returncode == 2
    assert summary is None


def test_selections_exist(tmp_path):
    """The pytest selections (CUDA tests, sanitizer cases) collect on a CPU and the benchmark
    and throughput options parse: a renamed test or option fails here, not on the GPU."""
    out = tmp_path / "res"
    stages = "cuda_tests,memcheck,bench_attention,bench_ce_remask,throughput"
    p, summary = run_check(out, "--stages", stages, env={"GPU_CHECK_DRY_VALIDATE": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert all(by_name(summary)[s]["status"] == "passed" for s in stages.split(","))
    assert " tests collected" in (out / "cuda_tests.log").read_text()
    assert " tests collected" in (out / "memcheck.log").read_text()
    assert "throughput options parse" in (out / "throughput.log").read_text()
    assert "takes --out-dir" in (out / "bench_attention.log").read_text()
