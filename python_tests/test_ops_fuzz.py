"""Fuzzing the public ops: any shapes, dtypes, strides, values and argument types give either a
result of the documented shape or a ValueError/TypeError, never a crash or another exception.

Hypothesis draws 1,000 calls per op (sizes including 0, every dtype torch has, transposed and
sliced views, NaN/inf/huge values, wrong argument types, out-of-range ids). They run in a
child process, so a crash (a segfault in the kernels) is caught and counted rather than
taking the test run down with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = 1000
OPS = ["attention", "masked_cross_entropy", "linear_masked_cross_entropy", "remask", "remask_"]


def _call_strategies() -> dict:
    """Hypothesis strategies, one per op, each drawing a zero-argument call of that op.

    Mostly valid choices, so that most calls reach the kernels; the rest probe validation.
    Imported lazily: only the child process needs torch, hypothesis and the extension.
    """
    import torch
    from hypothesis import strategies as st

    import llada_ext as lx

    f32, bf16 = torch.float32, torch.bfloat16
    dtypes = st.sampled_from([f32] * 4 + [bf16] * 3 + [torch.float16, torch.float64, torch.int64])
    size = st.integers(0, 5)
    special = st.sampled_from([0.0, 1.0, -3.0, 1e30, -1e30, float("nan"), float("inf")])

    def tensor(draw, shape, dtype):
        t = torch.randn(*shape) * draw(st.sampled_from([1.0, 30.0]))
        if t.numel() and draw(st.booleans()):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(special)
        t = t.to(dtype) if dtype.is_floating_point else (t.abs() * 3).to(dtype)
        if t.dim() >= 2 and draw(st.booleans()):  # a non-contiguous view of the same values
            t = t.transpose(0, 1).contiguous().transpose(0, 1)
        return t

    @st.composite
    def attention_call(draw):
        b, sq, sk, hkv, d = (draw(size) for _ in range(5))
        hq = hkv * draw(st.integers(1, 3)) if draw(st.booleans()) else draw(size)
        dt = draw(dtypes)
        q, k, v = (tensor(draw, s, dt) for s in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))
        mask = None
        if draw(st.booleans()):
            mask = torch.rand(b, sk + draw(st.sampled_from([0, 0, 1]))) > 0.3
        scale = draw(st.sampled_from([None] * 6 + [0.3, -2.0, float("nan"), "x"]))
        return lambda: lx.attention(q, k, v, mask, scale=scale, return_lse=True)

    @st.composite
    def ce_call(draw, fused):
        n, v, d = draw(size), draw(size), draw(size)
        dt = draw(dtypes)
        hi = max(v, 1) + draw(st.sampled_from([0, 0, 0, 2]))
        targets = torch.randint(-1, hi, (n,))
        targets[torch.rand(n) < 0.3] = -100
        weights = tensor(draw, (n,), draw(st.sampled_from([torch.float32] * 5 + [torch.float64])))
        red = draw(st.sampled_from(["sum", "mean", "none"] * 3 + ["avg"]))
        ign = draw(st.sampled_from([-100] * 6 + [0, 3, None]))
        if fused:
            h, w = tensor(draw, (n, d), dt), tensor(draw, (v, d), dt)
            return lambda: lx.linear_masked_cross_entropy(
                h, w, targets, weights, reduction=red, ignore_index=ign
            )
        logits = tensor(draw, (n, v), dt)
        return lambda: lx.masked_cross_entropy(
            logits, targets, weights, reduction=red, ignore_index=ign
        )

    @st.composite
    def remask_call(draw, inplace):
        b, w, v = draw(size), draw(size), draw(size)
        length = w + draw(st.integers(0, 3))
        logits = tensor(draw, (b, w, v), draw(dtypes))
        x = torch.randint(0, v + 1, (b, length))
        x[torch.rand(b, length) < 0.5] = v
        if draw(st.booleans()) and b > 1:
            x = x[:1].expand(b, length)
        k = draw(st.sampled_from([0, 1, 2, 3, 10, 2**70, -1, 1.5]))
        strategies = ["low_confidence", "random", "margin", "entropy"]
        kw = dict(
            mask_id=draw(st.sampled_from([v, 0, 1, 2, -3, 2**63])),
            offset=draw(st.integers(0, length - w) if draw(st.booleans()) else st.integers(-1, 5)),
            strategy=draw(st.sampled_from(strategies * 2 + ["bogus"])),
            temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 1.5, -1.0, float("nan")])),
            threshold=draw(st.sampled_from([None, None, 0.5, float("inf")])),
        )
        fn = lx.remask_ if inplace else lx.remask
        return lambda: fn(logits, x, k, **kw)

    return {
        "attention": attention_call(),
        "masked_cross_entropy": ce_call(False),
        "linear_masked_cross_entropy": ce_call(True),
        "remask": remask_call(False),
        "remask_": remask_call(True),
    }


def _outcome(call) -> str:
    """ "ok", the name of a ValueError/TypeError, or "UNEXPECTED ..." for anything else."""
    try:
        call()
        return "ok"
    except (ValueError, TypeError) as e:
        return type(e).__name__
    except Exception as e:  # noqa: BLE001 - anything else is a finding
        return f"UNEXPECTED {type(e).__name__}: {str(e)[:120]}"


def _fuzz_main(op: str, cases: int) -> dict:
    """Runs `cases` hypothesis examples of one op; returns outcome counts (child process)."""
    import torch
    from hypothesis import HealthCheck, given, settings

    counts: dict[str, int] = {}

    @settings(
        max_examples=cases,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_call_strategies()[op])
    def run(call):
        key = _outcome(call)
        counts[key] = counts.get(key, 0) + 1

    torch.manual_seed(0)
    run()
    return counts


@pytest.mark.parametrize("op", OPS)
def test_fuzz_op_in_a_child_process(op: str) -> None:
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import test_ops_fuzz as t; "
        f"print(json.dumps(t._fuzz_main({op!r}, {CASES})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=900,
        env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert proc.returncode == 0, f"{op}: the fuzz process died ({proc.returncode}): {proc.stderr}"
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(counts.values()) >= CASES, counts
    unexpected = {k: n for k, n in counts.items() if k.startswith("UNEXPECTED")}
    assert not unexpected, f"{op}: {unexpected}"
    assert counts.get("ok", 0) > 0 and counts.get("ValueError", 0) + counts.get("TypeError", 0) > 0
