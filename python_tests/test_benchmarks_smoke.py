"""Smoke tests of the benchmark scripts: the CPU throughput grid runs end to end and writes
finite, positive figures; the plain-torch reference paths the benchmarks compare against
compute what the library computes; ``llada-ext bench`` forwards to the throughput script."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

lx = pytest.importorskip("llada_ext")


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_common
        import throughput

        yield bench_common, throughput
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    env = dict(os.environ)
    # one thread: a busy 2-core CI box otherwise spends its time in OpenMP spin-waits
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--cpu", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cpu_smoke_writes_json_markdown_png(smoke_run):
    out, stdout = smoke_run
    data = json.loads((out / "throughput_smoke_cpu.json").read_text())
    for key in ("device", "commit", "date", "torch"):
        assert data["meta"][key], key
    assert _positive_finite(data["copy_gbps"]) and _positive_finite(data["matmul_tflops"])
    ok = [r for r in data["records"] if r["status"] == "ok"]
    methods = {r["method"] for r in ok}
    assert {"ar", "diffusion-none", "diffusion-prefix", "diffusion-dual", "reference"} <= methods
    assert data["repeats"] == 3 and "interleaved" in data["timing"]
    (ar,) = [r for r in ok if r["method"] == "ar"]
    for r in ok:
        for key in (
            "tokens_per_s",
            "ms_per_step",
            "wall_s",
            "peak_mem_bytes",
            "ceiling_tokens_per_s",
            "fraction_of_ceiling",
            "weight_bytes_per_step",
            "vs_ar",
        ):
            assert _positive_finite(r[key]), (r["method"], key, r[key])
        # every runner of the point was timed in each of the interleaved rounds
        rounds = r["wall_s_rounds"]
        assert len(rounds) == r["repeats"] == 3 and all(_positive_finite(t) for t in rounds)
        for key in ("wall_s_stats", "tokens_per_s_stats", "vs_ar_stats"):
            st = r[key]
            assert st["min"] <= st["q1"] <= st["median"] <= st["q3"] <= st["max"], (key, st)
        # tokens/s and ms/step describe the same wall times
        assert r["wall_s"] == pytest.approx(statistics.median(rounds), rel=1e-12)
        tps = statistics.median(r["batch"] * r["gen"] / t for t in rounds)
        assert r["tokens_per_s"] == pytest.approx(tps, rel=1e-12)
        assert r["ms_per_step"] == pytest.approx(1e3 * r["wall_s"] / r["steps"], rel=1e-9)
        assert r["steps"] * r["tokens_per_step"] == r["gen"]
        # the ratio vs AR is paired round by round
        assert r["vs_ar_baseline"] == "ar"
        paired = statistics.median(a / t for a, t in zip(ar["wall_s_rounds"], rounds))
        assert r["vs_ar"] == pytest.approx(paired, rel=1e-12)
    assert ar["vs_ar_stats"]["min"] == ar["vs_ar_stats"]["max"] == 1.0
    # the ceiling grows linearly with tokens per step and batch
    for r in ok:
        per = r["ceiling_tokens_per_s"] / (r["tokens_per_step"] * r["batch"])
        assert per == pytest.approx(r["ceiling_steps_per_s"], rel=1e-9)
    assert any(t.get("vs_ar_stats") and t.get("vs_reference_stats") for t in data["targets"])
    md = (out / "throughput_smoke_cpu.md").read_text()
    assert "| model |" in md and "diffusion-prefix" in md and "ceiling" in md
    assert "| vs AR IQR |" in md and "3 interleaved rounds" in md
    pngs = sorted(out.glob("*.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert data["plot_note"] and "matplotlib" in data["plot_note"]
    else:
        assert pngs, "no plot written"
        for p in pngs:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vs AR" in stdout


def test_reference_step_matches_lx_remask(bench_modules):
    """The plain-torch step the kernel benchmark times does what lx.remask does."""
    bench_common, _ = bench_modules
    g = torch.Generator().manual_seed(0)
    B, P, W, V, mask_id = 3, 5, 37, 101, 100
    logits = torch.randn(B, W, V, generator=g)
    x = torch.randint(0, V - 1, (B, P + W), generator=g)
    x[:, P:][torch.rand(B, W, generator=g) < 0.7] = mask_id
    nt = torch.tensor([1, 4, 9])
    ref = bench_common.torch_remask_step(logits, x, nt, mask_id=mask_id, offset=P)
    ours = lx.remask(logits, x, nt, mask_id=mask_id, offset=P)
    assert torch.equal(ref, ours)
    assert not torch.equal(ref, x)  # something was unmasked


def test_reference_sampler_matches_generate(bench_modules):
    """The benchmark's reference loop is the public sampler: same tokens as lx.generate."""
    _, throughput = bench_modules
    from llada_ext.model import LLaDAConfig, LLaDAModel

    torch.manual_seed(0)
    model = LLaDAModel(LLaDAConfig.preset("tiny"), backend="torch").eval()
    prompt = torch.randint(0, 256, (2, 7))
    kw = {"gen_length": 16, "steps": 8, "block_length": 8}
    ref = throughput.reference_generate(model, prompt, mask_id=258, **kw)
    ours = lx.generate(model, prompt, **kw) if hasattr(lx, "generate") else None
    if ours is None:
        from llada_ext.sampling import generate

        ours = generate(model, prompt, **kw)
    assert (ref[:, 7:] != 258).all()
    assert torch.equal(ref, ours)


def test_time_interleaved_rotates_and_drops_failures(bench_modules):
    """Round r runs every callable once in the order rotated by r; one that raises is left
    out of the later rounds and reported, the others keep one time per round."""
    bench_common, _ = bench_modules
    calls: list[str] = []

    def fn(name: str, fail_at: int = -1):
        def run() -> None:
            calls.append(name)
            if calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")

        return run

    res = bench_common.time_interleaved(
        {"a": fn("a"), "b": fn("b"), "c": fn("c", fail_at=3)}, torch.device("cpu"), 4, warmup=1
    )
    assert res.orders == [["a", "b", "c"], ["b", "c", "a"], ["a", "b"], ["b", "a"]]
    # warm-up round (rotated by -1), then the timed rounds; c fails on its third call
    assert "".join(calls) == "cab" + "abc" + "bca" + "ab" + "ba"
    assert set(res.times) == {"a", "b"} and all(len(t) == 4 for t in res.times.values())
    assert str(res.errors["c"]) == "c broke"
    st = bench_common.spread_stats([4.0, 1.0, 3.0, 2.0])
    assert (st["median"], st["q1"], st["q3"], st["min"], st["max"]) == (2.5, 1.75, 3.25, 1.0, 4.0)
    assert bench_common.paired_speedups([2.0, 3.0], [1.0, 6.0]) == [2.0, 0.5]
    with pytest.raises(ValueError):
        bench_common.paired_speedups([1.0], [1.0, 2.0])


def test_measure_point_pairs_runners_and_checks_graphs(tmp_path):
    """A grid point measured in this process: the graphs runner's logic (static buffers,
    recorded on its warm-up, compared with the eager sampler) runs on the CPU without
    capture; a runner that fails is a record, not a crash; ratios are paired with ``ar``."""
    sys.path.insert(0, str(BENCH))
    try:
        import throughput_measure as tm
        import throughput_setup as ts
    finally:
        sys.path.remove(str(BENCH))
    dev = torch.device("cpu")
    ms = ts.build_models("tiny", ["ar", "diffusion-prefix"], dev, torch.float32, False)
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    runners, skipped = ts.point_runners(ms, ["ar", "diffusion-prefix"], prompt, 32, [4], 32, False)
    assert [r.name for r in runners] == ["ar k=1", "diffusion-prefix k=4"] and not skipped
    runners.append(
        ts.diffusion_runner(ms.llada, "diffusion-prefix-graphs", prompt, 32, 4, 32, False)
    )

    def broken() -> None:
        raise RuntimeError("no kernel")

    runners.append(ts.Runner("diffusion-dual", 4, 8, broken, lambda: None))
    base = {"model": "tiny", "batch": 2, "prompt": 8, "gen": 32, "dtype": "float32"}
    recs = tm.measure_point(base, runners, dev, 3, ms.weight_bytes, 10.0)
    assert [(r["method"], r["status"]) for r in recs] == [
        ("ar", "ok"),
        ("diffusion-prefix", "ok"),
        ("diffusion-prefix-graphs", "ok"),
        ("diffusion-dual", "error: RuntimeError: no kernel"),
    ]
    ar, eager, graphs = recs[:3]
    assert graphs["matches_eager_sampler"] is True and "matches_eager_sampler" not in eager
    for r in (eager, graphs):
        assert r["vs_ar_baseline"] == "ar" and len(r["wall_s_rounds"]) == 3
        ratios = [a / t for a, t in zip(ar["wall_s_rounds"], r["wall_s_rounds"])]
        assert r["vs_ar_stats"]["min"] == pytest.approx(min(ratios), rel=1e-12)


def test_bench_cli_forwards_to_throughput(capsys):
    from llada_ext import bench

    assert bench.find_benchmarks_dir() == BENCH
    assert bench.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--cpu" in text and text.startswith("usage: llada-ext bench")
    # results default to the user's folder, not the checkout's tracked benchmarks/results
    assert "llada_bench_results" in text and "benchmarks/results)" not in text.split("--out")[-1]
    assert bench.main(["--no-such-option"]) == 2


def test_ar_baseline_cache_matches_recompute():
    """The AR baseline's static-cache decoding equals greedy decoding that recomputes the
    whole causal prefix each step (so the cache is read and written at the right places)."""
    sys.path.insert(0, str(BENCH))
    try:
        import ar_baseline
    finally:
        sys.path.remove(str(BENCH))
    from llada_ext.model import LLaDAConfig

    cfg = LLaDAConfig.preset("tiny")
    model = ar_baseline.build_ar_model(cfg, torch.device("cpu"), torch.float32, seed=3)
    # random weights give near-uniform logits; sharpen them so greedy picks are well separated
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    out, _ = ar_baseline.ARDecoder(model, compile=False).generate(prompt, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            model.setup_cache(2, seq.shape[1])
            logits = model(seq, torch.arange(seq.shape[1]))
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampler_speed_script_runs_and_checks_the_cache(tmp_path):
    """benchmarks/sampler_speed.py end to end on random weights: every variant reports
    finite figures, the exact sampler is its own baseline, and the cache refreshed at every
    step agrees with it token for token."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "sampler_speed.py"),
            "--untrained",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "sampler_cpu_untrained.json").read_text())
    rows = {r["name"]: r for r in result["variants"]}
    assert rows["none, k=1"]["agreement"] == 1.0 and rows["none, k=1"]["speedup"] == 1.0
    assert rows["prefix, refresh=1, k=1"]["agreement"] == 1.0
    assert rows["none, 4 steps"]["steps"] == 4 and rows["dual, k=1"]["steps"] == 6
    for r in rows.values():
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert 0.0 <= r["agreement"] <= 1.0 and 0.0 <= r["exact_match"] <= 1.0
        assert 1 <= r["steps"] <= 6
    assert "| variant |" in (tmp_path / "sampler_cpu_untrained.md").read_text()


@pytest.fixture(scope="module")
def install_paths():
    sys.path.insert(0, str(BENCH))
    try:
        import install_paths

        yield install_paths
    finally:
        sys.path.remove(str(BENCH))


TINY = {"batch": 1, "heads": 2, "seq": 64, "dim": 16}


def test_install_paths_measure_in_this_environment(install_paths):
    """benchmarks/install_paths.py's timing, in this process at a tiny size: lx.attention and
    SDPA agree and every statistic is a finite positive number in order."""
    m = install_paths.measure(**TINY, repeats=3, warmup=1, threads=1)
    assert m["repeats"] == 3 and m["torch_threads"] == 1 and m["max_abs_diff"] < 1e-4
    for key in ("lx_ms", "sdpa_ms", "ratio"):
        s = m[key]
        assert all(_positive_finite(s[k]) for k in ("median", "q1", "q3", "min", "max")), s
        assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"], s
    assert m["build_info"] == lx.build_info()
    assert Path(m["module"]) == Path(lx.__file__).resolve().parent


def test_install_paths_table_for_the_current_environment(install_paths, tmp_path):
    """The script end to end without creating environments (--paths current): the table has
    its columns and a row per thread setting; a path whose step fails is a row, not a crash."""
    out = tmp_path / "paths.md"
    env_before = dict(os.environ)
    rc = install_paths.main(
        ["--paths", "current", "--threads", "1", "--repeats", "3", "--out", str(out)]
        + [f"--{k}={v}" for k, v in TINY.items()]
    )
    assert dict(os.environ) == env_before
    assert rc == 0
    md = out.read_text()
    header = "| " + " | ".join(install_paths.TABLE_COLUMNS) + " |"
    assert header in md
    for col in ("path", "install s", "threads", "lx ms", "SDPA ms", "lx/SDPA speed", "IQR", "BLAS"):
        assert col in install_paths.TABLE_COLUMNS
    rows = [ln for ln in md.splitlines() if ln.startswith("| current |")]
    assert len(rows) >= 2 and "| ok |" in rows[0], md  # the timing row and the build_info row
    data = json.loads(out.with_suffix(".json").read_text())
    (rec,) = data["records"]
    assert rec["status"] == "ok" and set(rec["measurements"]) == {"1"}
    assert rec["build_info"]["commit"] == lx.build_info()["commit"]
    for key in ("machine", "date", "commit", "torch"):
        assert data["meta"][key], key

    broken = install_paths.InstallPath(
        "broken",
        "(a build that fails)",
        lambda c: [
            install_paths.Step("install", [sys.executable, "-c", "raise SystemExit('no compiler')"])
        ],
        uses_venv=False,
    )
    rec_bad = install_paths.run_path(
        broken, tmp_path, threads=[1], size=TINY, repeats=3, keep=False, commit="unknown", echo=str
    )
    assert rec_bad["status"] == "failed" and rec_bad["failed_step"] == "install"
    (row,) = install_paths.table_rows([rec_bad])
    assert row[0] == "broken" and row[1].startswith("FAILED at install: no compiler")
    assert len(row) == len(install_paths.TABLE_COLUMNS)


@pytest.fixture(scope="module")
def gpu_scripts():
    """The scripts that measure on a GPU, and ptxas_report.py, imported without running."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_attention_cuda
        import bench_ce_remask_cuda
        import bench_tables
        import ptxas_report

        yield bench_attention_cuda, bench_ce_remask_cuda, ptxas_report, bench_tables
    finally:
        sys.path.remove(str(BENCH))


def test_markdown_lines_align_and_format(gpu_scripts):
    """Table lines: one alignment letter per column, rows of text as given; markdown_table
    formats every cell."""
    tables = gpu_scripts[3]
    lines = tables.markdown_lines(["a", "b"], [["1", "x"], ["2"]], "rl")
    assert lines == ["| a | b |", "|---:|---|", "| 1 | x |", "| 2 |"]
    assert tables.markdown_table(["v", "w"], [[0.5, None]]) == "| v | w |\n|---|---|\n| 0.5 | - |\n"
    with pytest.raises(ValueError):
        tables.markdown_lines(["a"], [], "rl")


def test_attention_benchmark_report(gpu_scripts, tmp_path):
    """bench_attention_cuda.py's options and markdown from made-up figures (a backend that
    cannot run is a short row); without a GPU it measures nothing and exits 1."""
    att = gpu_scripts[0]
    args = att.build_parser().parse_args(["--out-dir", str(tmp_path), "--iters", "3"])
    assert (args.iters, args.warmup, args.tokens, args.dtype) == (3, 5, 16384, "bfloat16")
    meta = {
        "dtype": "bfloat16",
        "head_dim": 128,
        "device": "GPU",
        "date": "2026-01-01",
        "git_commit": "abc",
        "torch": "2",
        "cuda": "12",
        "tokens": 16384,
        "heads": 16,
        "matmul_peak_tflops": 700.0,
    }
    ok = {"seq": 512, "batch": 32, "impl": "llada_ext", "fwd_ms": 1.23456, "bwd_ms": 3.4567}
    ok.update(fwd_tflops=300.12, bwd_tflops=250.5, fwd_frac_peak=0.4213, bwd_frac_peak=0.35)
    bad = {"seq": 512, "batch": 32, "impl": "sdpa[X]", "error": "no kernel"}
    lines = att.to_markdown(meta, [ok, bad]).splitlines()
    assert "|---:|---:|---|---:|---:|---:|---:|---:|---:|" in lines
    assert "| 512 | 32 | llada_ext | 1.235 | 300.1 | 42% | 3.457 | 250.5 | 35% |" in lines
    assert lines[-1] == "| 512 | 32 | sdpa[X] | skipped: no kernel |"
    if not torch.cuda.is_available():
        assert att.main(["--out-dir", str(tmp_path / "none")]) == 1
        assert not (tmp_path / "none").exists()


def test_ce_remask_benchmark_on_the_cpu(gpu_scripts, tmp_path, monkeypatch):
    """bench_ce_remask_cuda.py's measurements run on the CPU too (small shapes, two
    repetitions) and give every figure its result files name; the shapes of --quick."""
    ce_mod = gpu_scripts[1]
    monkeypatch.setattr(ce_mod, "_free_bytes", lambda device: 1 << 40)
    cpu = torch.device("cpu")
    ce = ce_mod.bench_masked_ce(lx, cpu, 64, 1000, 0.5, 2, 10.0)
    assert ce["active_rows"] > 0 and all(_positive_finite(ce[k]) for k in ce_mod.CE_KEYS[3:])
    rows = [ce_mod.bench_remask(lx, cpu, 2, 32, 1000, t, 2, 10.0) for t in (0.0, 1.0)]
    for r in rows:
        assert all(_positive_finite(r[k]) for k in ce_mod.REMASK_KEYS if k != "temperature")
    assert len(ce_mod.remask_shapes(True)) == 10 and len(ce_mod.remask_shapes(False)) == 18
    meta = {"device": "CPU", "commit": "abc", "date": "2026-01-01", "torch": "2"}
    ce_mod.write_results(tmp_path, meta, 10.0, ce, rows, True)
    data = json.loads((tmp_path / "ce_remask_cuda.json").read_text())
    assert data["masked_ce"]["N"] == 64 and len(data["remask"]) == 2 and data["quick"]
    md = (tmp_path / "ce_remask_cuda.md").read_text()
    assert "| " + " | ".join(ce_mod.CE_COLUMNS) + " |" in md
    assert "| " + " | ".join(ce_mod.REMASK_COLUMNS) + " |" in md
    if not torch.cuda.is_available():
        assert ce_mod.main(["--out", str(tmp_path / "none")]) == 0
        assert not (tmp_path / "none").exists()


def test_ptxas_report_render(gpu_scripts):
    """ptxas_report.py's markdown from parsed ptxas output: the kernel row, the spill section
    and the compile-time table."""
    ptx = gpu_scripts[2]
    log = "\n".join(
        [
            "ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'",
            "ptxas info    : Function properties for _Z1kv",
            "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads",
            "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem",
        ]
    )
    (k,) = ptx.parse_ptxas(log, "csrc/cuda/x.cu", "80")
    assert (k.registers, k.spill_stores, k.spill_loads, k.smem, k.stack) == (255, 8, 4, 1024, 16)
    k.name = "k()"
    compiles = [ptx.Compile("csrc/cuda/x.cu", "80", 1.25, 0, [k])]
    meta = {"archs": ["80"], "argv": "", "nvcc_version": "13", "commit": "abc", "date": "2026"}
    meta.update(flags="-O3", flags_from="CMakeLists.txt", host_cpus=2, jobs=1, dyn_smem_note="")
    lines = ptx.render(compiles, meta).splitlines()
    assert "| x.cu | `k()` | sm_80 | 255 | 8 | 4 | 1024 |  | 16 |" in lines
    assert "|---|---|---|---:|---:|---:|---:|---:|---:|" in lines
    assert any(ln.startswith("- `k()` on sm_80: 255 registers, 8 B spill stores") for ln in lines)
    assert lines[-1] == "| x.cu | sm_80 | 1.2 | 1 | ok |"
