"""The Philox uniform stays inside the open interval (0, 1) at its extreme bit patterns.

(bits + 0.5) * 2**-53 with all 53 bits set rounds to exactly 1.0 in double precision, which
would give an infinite Gumbel key. The shared header (csrc/common/philox.h, compiled for the
CPU kernels and for CUDA alike) clamps it; this compiles the header on the host and checks the
extreme words, and the Gumbel bound the remask pruning relies on.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <math.h>
#include <stdio.h>
#include "common/philox.h"
#include "common/remask_row.h"
int main() {
  const double top = llada::philox_to_unit_double(0xffffffffu, 0xffffffffu);
  const double bottom = llada::philox_to_unit_double(0u, 0u);
  const double gmax = -log(-log(top));
  printf("top=%.17g bottom=%.17g gumbel_max=%.17g\n", top, bottom, gmax);
  int bad = 0;
  if (!(top < 1.0) || top != nextafter(1.0, 0.0)) bad |= 1;
  if (!(bottom > 0.0)) bad |= 2;
  if (!(gmax <= llada::kRemaskGumbelMax) || isinf(gmax)) bad |= 4;
  return bad;
}
"""


def test_uniform_extremes_stay_open(tmp_path: Path) -> None:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler on PATH")
    src = tmp_path / "philox_bounds.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "philox_bounds"
    subprocess.run(
        [
            cxx,
            "-std=c++17",
            "-O2",
            f"-I{ROOT / 'csrc'}",
            f"-I{ROOT / 'csrc' / 'include'}",
            str(src),
            "-o",
            str(exe),
            "-lm",
        ],
        check=True,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stdout}{run.stderr}"
