"""The executor's checks fire: each deliberately broken kernel of csrc/emu/selftest.cpp must be
reported (kernel, block, thread and what went wrong), and each correct control must pass with
the right values. If a checker stops reporting, the executor tests of the real kernels would
pass without checking anything; this file is what notices.
"""

from __future__ import annotations

import pytest
import torch

from llada_ext import emu

pytestmark = pytest.mark.skipif(not emu.available(), reason="built without the executor")


def selftest(name: str) -> tuple[str, list[float]]:
    return emu._load().selftest(name)


# name -> phrases the report must contain
BROKEN = {
    "race": ["race_kernel", "thread (1,0,0)", "read after write", "with thread 0"],
    "warp_race": ["warp_sync_kernel", "thread (1,0,0)", "read after write", "with thread 0"],
    "oob_global": ["oob_global_kernel", "thread (31,0,0)", "out-of-bounds read", "'in'"],
    "oob_shared": ["oob_shared_kernel", "thread (32,0,0)", "dynamic shared array"],
    "uninit": [
        "uninit_kernel",
        "thread (1,0,0)",
        "byte 4 (shared address 0x",
        "nothing has written",
    ],
    "cp_async_unwaited": ["cp_async_kernel", "cp.async", "still in flight"],
    "barrier_divergence": ["barrier_divergence_kernel", "different __syncthreads"],
    "barrier_after_exit": ["barrier_after_exit_kernel", "exited threads never reach"],
    "warp_divergence": ["warp_divergence_kernel", "warp divergence", "different collective"],
    "block_too_large": ["invalid block (2048,1,1)"],
    "global_race": ["blocks_kernel", "block (1,0,0)", "global race", "which block 0 wrote"],
    "ldg_written": ["ldg_kernel", "read-only load (__ldg)", "which this launch writes"],
    "smem_without_optin": ["65536 bytes of dynamic shared memory", "cudaFuncSetAttribute"],
}


def test_every_selftest_is_covered() -> None:
    covered = set(BROKEN) | {
        "race_synced",
        "warp_synced",
        "cp_async_waited",
        "reduce",
        "mma",
        "global_atomics",
        "shuffles",
    }
    assert set(emu._load().selftest_names()) == covered


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_kernel_is_reported(name: str) -> None:
    report, _ = selftest(name)
    assert report, f"{name}: the executor reported nothing"
    assert report.startswith("llada-emu:")
    for phrase in BROKEN[name]:
        assert phrase in report, f"{name}: {phrase!r} missing from: {report}"


def test_block_barrier_orders_shared_accesses() -> None:
    report, out = selftest("race_synced")
    assert report == "" and out == [42.0]


def test_syncwarp_orders_lanes_of_a_warp() -> None:
    report, out = selftest("warp_synced")
    assert report == ""
    assert out == [float(max(i - 1, 0)) for i in range(32)]


def test_waited_cp_async_lands() -> None:
    report, out = selftest("cp_async_waited")
    assert report == ""
    assert out == [float(4 * ((i + 1) % 32)) for i in range(32)]


def test_atomics_of_several_blocks_meet() -> None:
    report, out = selftest("global_atomics")
    assert report == "" and out == [3.0]


def test_legal_shuffles_are_not_reported() -> None:
    """Lanes that exited are left out of a full-mask shuffle; source lanes may differ per lane;
    an xor into a later segment of `width` returns the lane's own value."""
    report, out = selftest("shuffles")
    assert report == ""
    assert out[:16] == [float(i ^ 1) for i in range(16)] and out[16:32] == [0.0] * 16
    assert out[32:64] == [float((i + 1) % 32) for i in range(32)]
    assert out[64:96] == [float(i if i < 16 else i - 16) for i in range(32)]


def test_shuffle_and_shared_reduction() -> None:
    report, out = selftest("reduce")
    assert report == "" and out == [float(sum(range(256)))]


def test_ldmatrix_mma_tile() -> None:
    """One bf16 tile through ldmatrix and mma.sync: D(m, n) = sum_k (m - k)(k + n)."""
    report, out = selftest("mma")
    assert report == ""
    m = torch.arange(16, dtype=torch.float64)[:, None, None]
    k = torch.arange(16, dtype=torch.float64)[None, :, None]
    n = torch.arange(8, dtype=torch.float64)[None, None, :]
    expect = ((m - k) * (k + n)).sum(1)
    assert torch.equal(torch.tensor(out, dtype=torch.float64).view(16, 8), expect)
