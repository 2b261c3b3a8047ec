"""The C ABI refuses sizes, strides and offsets whose arithmetic would overflow.

Hosts call the C entry points directly, so the library validates every view itself. A shape
whose element count or byte span does not fit in int64, a stride of INT64_MIN, or a remask
offset near 2^63 must give LLADA_ERROR_INVALID_ARGUMENT with a message and leave the outputs
untouched, never wrap around into a check that passes and a kernel that writes through a
null or wild pointer. The fuzz runs in a child process, so a crash is caught and counted.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_embedding import CE, RM, _attn_arrays, _attn_fwd, _expect, _load, tv

import llada_ext as lx

INVALID = 1
LIB = Path(lx.__file__).parent / "libllada_kernels.so"
HERE = Path(__file__).resolve().parent

# Sizes two of which overflow int64 when multiplied; strides whose reach overflows beside any
# size > 1; sizes that are invalid alone. (A huge size that does not overflow is not an
# error the library can see: only the caller knows how large its buffer is.)
HUGE = [2**32 + 1, 2**40, 2**62, 2**63 - 1]
HUGE_STRIDE = [2**62, 2**63 - 1]
BAD = [-1, -(2**63)]


@pytest.fixture(scope="module")
def lib():
    if not LIB.exists():
        pytest.skip("no in-place libllada_kernels.so")
    return _load(LIB)


def overflowing(a: np.ndarray, rng: np.random.Generator) -> object:
    """A view of `a` (same data pointer) whose shape/strides overflow or are invalid."""
    t = tv(a)
    kind = rng.integers(0, 4)
    i = int(rng.integers(0, a.ndim))
    if kind == 0 or a.ndim == 1:  # a negative size, or a huge stride beside a huge size
        if rng.random() < 0.5:
            t.shape[i] = int(rng.choice(BAD))
        else:
            t.shape[i] = int(rng.choice(HUGE))
            t.strides[i] = int(rng.choice(HUGE_STRIDE))
    elif kind == 1:  # two huge sizes: the element count overflows
        j = (i + 1) % a.ndim
        t.shape[i], t.shape[j] = int(rng.choice(HUGE)), int(rng.choice(HUGE))
    elif kind == 2:  # INT64_MIN stride on a dimension of size > 1
        t.shape[i] = max(2, t.shape[i])
        t.strides[i] = -(2**63)
    else:  # a stride whose reach overflows
        t.shape[i] = max(3, t.shape[i])
        t.strides[i] = int(rng.choice(HUGE_STRIDE))
    return t


def test_overflowing_element_count_is_refused(lib):
    """The issue's case: [2^31, 2^31, 4, 1] wrapped the element count to 0 and skipped the
    null-data check, then a kernel wrote through a null pointer."""
    ce = CE(np.random.default_rng(1))
    t = tv(ce.logits)
    t.shape[0], t.shape[1] = 2**32, 2**32
    msg = _expect(lib, ce.fwd(lib, logits=t), INVALID)
    assert "logits" in msg and "overflow" in msg
    a = _attn_arrays(np.random.default_rng(2))
    q = tv(a["q"])
    q.shape[0], q.shape[1], q.shape[2], q.shape[3] = 2**31, 2**31, 4, 1
    q.data = None
    msg = _expect(lib, _attn_fwd(lib, a, q=q), INVALID)
    assert "q" in msg


def test_remask_offset_near_int64_max_is_refused(lib):
    """offset = 2^63 - 2 passed `offset + W > L` by wrapping; it must be refused."""
    rm = RM(np.random.default_rng(3))
    for offset in (2**63 - 2, 2**63 - 1, 2**62):
        rm.params.offset = offset
        msg = _expect(lib, rm.run(lib), INVALID)
        assert "offset" in msg
        assert rm.untouched()


def _fuzz_main(lib_path: str, cases: int, seed: int) -> dict:
    """Runs `cases` overflowing calls per op; returns the status counts (child process)."""
    lib = _load(Path(lib_path))
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {}
    ce, rm = CE(rng), RM(rng)
    attn = _attn_arrays(rng)
    ops = {
        "masked_ce_fwd": (ce, ["logits", "targets", "weights", "loss", "lse"], ce.fwd),
        "masked_ce_bwd": (
            ce,
            ["logits", "targets", "weights", "lse", "grad_loss", "grad"],
            ce.bwd,
        ),
        "remask": (rm, ["logits", "x", "nt", "x_out", "x0", "conf"], rm.run),
        "attention_fwd": (attn, ["q", "k", "v", "out", "lse"], None),
    }
    arrays = {"masked_ce_fwd": vars(ce), "masked_ce_bwd": vars(ce), "remask": vars(rm)}
    arrays["attention_fwd"] = attn
    for name, (_, fields, run) in ops.items():
        seen = counts.setdefault(name, {})
        for _ in range(cases):
            field = fields[int(rng.integers(0, len(fields)))]
            view = overflowing(arrays[name][field], rng)
            if name == "attention_fwd":
                status = _attn_fwd(lib, attn, **{field: view})
            else:
                status = run(lib, **{field: view})
            msg = lib.llada_last_error().decode()
            key = "invalid" if status == INVALID and msg else f"status {status}: {msg[:80]}"
            seen[key] = seen.get(key, 0) + 1
    return counts


def test_fuzz_overflowing_views_in_a_child_process(lib):
    """1,000 overflowing views per op, in a child process: every call is refused with a
    message, and the process survives."""
    cases = 1000
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import test_capi_fuzz as t; "
        f"print(json.dumps(t._fuzz_main({str(LIB)!r}, {cases}, 7)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=600
    )
    assert proc.returncode == 0, f"the fuzz process died ({proc.returncode}): {proc.stderr}"
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    for op, seen in counts.items():
        assert seen == {"invalid": cases}, f"{op}: {seen}"


def test_fuzz_helpers_reach_every_op(lib):
    """The valid arguments the fuzz starts from are accepted (the refusals above are the
    overflow's doing, not a broken baseline)."""
    rng = np.random.default_rng(9)
    ce, rm = CE(rng), RM(rng)
    assert ce.fwd(lib) == 0 and ce.bwd(lib) == 0 and rm.run(lib) == 0
    assert _attn_fwd(lib, _attn_arrays(rng)) == 0
    assert ctypes.sizeof(tv(ce.logits)) > 0


def test_remask_output_rows_sharing_memory_are_refused(lib):
    """x_out whose rows share memory (stride 0) would have its windows written several
    times over: refused, naming x_out, before any kernel runs."""
    rm = RM(np.random.default_rng(4))
    out = tv(rm.x_out)
    out.strides[0] = 0
    msg = _expect(lib, rm.run(lib, x_out=out), INVALID)
    assert "x_out" in msg and "share memory" in msg
    assert rm.untouched()
