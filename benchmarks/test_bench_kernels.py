"""Kernel microbenchmarks (pytest-benchmark): ours vs the plain-torch baselines.

Run with::

    pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-group-by=group

(not part of the main suite, which runs ``pytest python_tests``). Every benchmark records in
``extra_info`` its TFLOP/s or GB/s and the fraction of this device's ceiling measured in the
same session (a large matmul, a large copy). CUDA cases are skipped without a GPU.
``bench_kernels_cpu.py`` runs the same cases as a script and writes the result files.
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_common import measure_peaks
from kernel_cases import BUILDERS, Case

CASE_KEYS = ["remask", "masked_ce", "attention_fwd", "attention_fwd_bwd", "linear_ce"]
IMPL_SLOTS = range(4)  # ours, the baseline, up to two extra baselines
DEVICES = ["cpu", "cuda"]


def _device_or_skip(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        import llada_ext as lx

        if not lx.has_cuda_kernels():
            pytest.skip("llada_ext was built without its CUDA kernels")
    return torch.device(name)


@functools.cache
def _peaks(device: str) -> dict[str, float]:
    return measure_peaks(torch.device(device))


@functools.lru_cache(maxsize=2)
def _case(key: str, device: str) -> Case | None:
    # cached: the inputs (e.g. 0.5 GB of remask logits) are built once for all impls
    return BUILDERS[key](torch.device(device))


@pytest.mark.parametrize("slot", IMPL_SLOTS)
@pytest.mark.parametrize("key", CASE_KEYS)
@pytest.mark.parametrize("device", DEVICES)
def test_kernel(benchmark, device: str, key: str, slot: int) -> None:
    dev = _device_or_skip(device)
    case = _case(key, device)
    if case is None:
        pytest.skip(f"{key}: not available on {device} (optional dependency missing)")
    if slot >= len(case.impls):
        pytest.skip(f"{key}: no implementation #{slot}; unavailable: {case.skipped or 'none'}")
    impl = case.impls[slot]
    benchmark.group = f"{device} {case.title}"
    benchmark.name = f"{device}:{impl.name}"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run() -> None:
        impl.fn()
        sync()

    rounds = 20 if dev.type == "cuda" else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    peaks = _peaks(device)
    rate = case.rate(median)
    benchmark.extra_info.update(
        {
            "impl": impl.name,
            "unit": case.unit,
            "rate": rate,
            "peak": peaks[case.peak_key],
            "peak_key": case.peak_key,
            "fraction_of_peak": rate / peaks[case.peak_key],
            "target": case.target_text,
            "shape": case.shape,
        }
    )
    assert median > 0
