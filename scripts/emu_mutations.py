"""Shows that the executor tests catch broken kernels: mutation runs on a scratch copy.

Each mutation edits one line of a CUDA kernel source in a scratch copy of the repository,
rebuilds the executor module (llada_ext._C_emu) from that copy, and runs the executor tests
against it (LLADA_EMU_MODULE). A mutation is caught when at least one test fails; the script
prints, per mutation, the failing tests and the first executor report, and exits 1 if any
mutation survives. The checkout itself is never modified.

    python scripts/emu_mutations.py [--only NAME ...] [--keep DIR]

Needs the set-up of scripts/setup.sh (the .venv with torch, pybind11, cmake and ninja).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTN = "python_tests/test_emu_attention.py"
CE_REMASK = "python_tests/test_emu_ce_remask.py"


@dataclass
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: str


MUTATIONS = [
    Mutation(
        "ldmatrix-lane",
        "forward: a wrong lane in the ldmatrix row address of the K fragments",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "const T* src = tK + (nt2 * 16 + (lane % 8) + (lane / 16) * 8) * kPitch + kk * 16 +",
        "const T* src = tK + (nt2 * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + kk * 16 +",
        ATTN,
    ),
    Mutation(
        "no-syncthreads",
        "forward: the __syncthreads that ends a key tile (before its buffer is refilled) removed",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "    __syncthreads();  // buffer `buf` is refilled at iteration j + 1",
        "    // (barrier removed)",
        ATTN,
    ),
    Mutation(
        "cp-async-wait",
        "forward: cp.async.wait_group waits for one group too few",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "    cp_async_wait<1>();  // everything but the group just committed",
        "    cp_async_wait<2>();  // one group too few",
        ATTN,
    ),
    Mutation(
        "key-tile-edge",
        "forward: off-by-one at the key-tile edge (key <= Sk)",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "            valid = key < Sk && (kpm == nullptr || kpm[key * p.kpm_ss] != 0);",
        "            valid = key <= Sk && (kpm == nullptr || kpm[key * p.kpm_ss] != 0);",
        ATTN,
    ),
    Mutation(
        "no-rescale",
        "forward: the online-softmax rescale of the O accumulators removed",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "            o[mt][dt][2 * r] *= corr;\n            o[mt][dt][2 * r + 1] *= corr;",
        "",
        ATTN,
    ),
    Mutation(
        "dq-scale",
        "backward: dQ accumulated with the log2-domain scale instead of the softmax scale",
        "csrc/cuda/attention_bwd_kernel.cuh",
        "              const float v0 = acc[dt][2 * r] * scale;\n"
        "              const float v1 = acc[dt][2 * r + 1] * scale;",
        "              const float v0 = acc[dt][2 * r] * scale_log2;\n"
        "              const float v1 = acc[dt][2 * r + 1] * scale_log2;",
        ATTN,
    ),
    Mutation(
        "bwd-shared-p-column",
        "backward d256: the shared P^T / dS^T tiles are read back at query column 0 every step",
        "csrc/cuda/attention_bwd_kernel.cuh",
        "const int a_off = (kw * 16 + (lane % 16)) * kSPitch + kk * 16 + (lane / 16) * 8;",
        "const int a_off = (kw * 16 + (lane % 16)) * kSPitch + (lane / 16) * 8;",
        ATTN,
    ),
    Mutation(
        "bwd-shared-p-barrier",
        "backward d256: the barrier between writing P^T / dS^T and reading them back removed",
        "csrc/cuda/attention_bwd_kernel.cuh",
        "      __syncthreads();  // P^T, dS^T of every query column are in",
        "      // (barrier removed)",
        ATTN,
    ),
    Mutation(
        "bwd-split-reduce-last",
        "backward split steps: the dK/dV reduce leaves out the last step range",
        "csrc/cuda/attention_bwd.cu",
        "for (int s = 0; s < splits; ++s, part += 2 * plane) {",
        "for (int s = 0; s + 1 < splits; ++s, part += 2 * plane) {",
        ATTN,
    ),
    Mutation(
        "bwd-split-range-overlap",
        "backward split steps: each step range runs one step into the next",
        "csrc/cuda/attention_bwd_kernel.cuh",
        "  const int it_end = min(group * n_mblocks, it0 + pl.steps_per_split);",
        "  const int it_end = min(group * n_mblocks, it0 + pl.steps_per_split + 1);",
        ATTN,
    ),
    Mutation(
        "store-past-end",
        "forward epilogue: one output row too many stored (out-of-bounds global write)",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "stage + wrow0 * kPitch, rows_total - m0 - wrow0, D,",
        "stage + wrow0 * kPitch, rows_total - m0 - wrow0 + 1, D,",
        ATTN,
    ),
    Mutation(
        "reduce-unwritten-slot",
        "block reduction: warp 0 reads every lane's slot, not only the kWarps written ones",
        "csrc/cuda/cuda_utils.cuh",
        "    State t = smem[lane < kWarps ? lane : 0];",
        "    State t = smem[lane < kWarps + 1 ? lane : 0];",
        CE_REMASK,
    ),
    Mutation(
        "select-no-barrier",
        "remask selection: the barrier after the keys are written removed",
        "csrc/cuda/remask.cu",
        "    __syncthreads();  // keys complete; x fully read before any candidate slot is written",
        "    // (barrier removed)",
        CE_REMASK,
    ),
    Mutation(
        "fwd-combine-rescale",
        "forward split-KV: the merge adds the ranges' sums without rescaling them to one max",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "      l += w * part_ml[2 * (part0 + i) + 1];",
        "      l += part_ml[2 * (part0 + i) + 1];",
        ATTN,
    ),
    Mutation(
        "fwd-split-overlap",
        "forward split-KV: key ranges start one tile early and overlap",
        "csrc/cuda/attention_fwd_kernel.cuh",
        "  const int kv0 = split * pl.tiles_per_split * kBlockN;",
        "  const int kv0 = split * (pl.tiles_per_split - 1) * kBlockN;",
        ATTN,
    ),
    Mutation(
        "fwd-packed-head",
        "forward GQA packing: a packed tile's rows all read the queries of its first head",
        "csrc/cuda/attention_common.cuh",
        "    return static_cast<int64_t>(i % seq) * ss + static_cast<int64_t>(i / seq) * sh;",
        "    return static_cast<int64_t>(i % seq) * ss;",
        ATTN,
    ),
    Mutation(
        "gumbel-pretest-margin",
        "remask: the float pre-test of the Gumbel key skips tokens that could still win",
        "csrc/cuda/remask_acc.cuh",
        "    return lb >= expf(-gap_lo) * 1.0001f;  // NaN (an infinite l / T) never skips",
        "    return lb >= expf(-gap_lo) * 0.9f;",
        CE_REMASK,
    ),
    Mutation(
        "gumbel-pretest-word",
        "remask: the float pre-test bounds u with the wrong Philox word",
        "csrc/cuda/remask_acc.cuh",
        "  return (index & 1) ? r.x[2] : r.x[0];",
        "  return (index & 1) ? r.x[3] : r.x[1];",
        CE_REMASK,
    ),
    Mutation(
        "split-merge-last-slice",
        "remask: the merge of a row's vocabulary slices leaves out the last slice",
        "csrc/cuda/remask.cu",
        "    for (int64_t s = 1; s < splits; ++s) st.merge(parts[row * splits + s]);",
        "    for (int64_t s = 1; s + 1 < splits; ++s) st.merge(parts[row * splits + s]);",
        CE_REMASK,
    ),
    Mutation(
        "split-slice-edge",
        "remask: a vocabulary slice ends one item early",
        "csrc/cuda/remask.cu",
        "  *hi = *lo + per < n ? *lo + per : n;",
        "  *hi = *lo + per < n ? *lo + per - 1 : n;",
        CE_REMASK,
    ),
]


def copy_tree(dst: Path) -> None:
    for name in ("csrc", "cmake"):
        shutil.copytree(ROOT / name, dst / name)
    shutil.copy2(ROOT / "CMakeLists.txt", dst / "CMakeLists.txt")


def build(src: Path, build_dir: Path) -> Path:
    if not (build_dir / "build.ninja").exists():
        subprocess.run(
            [
                "cmake",
                "-S",
                str(src),
                "-B",
                str(build_dir),
                "-G",
                "Ninja",
                f"-DPython_EXECUTABLE={sys.executable}",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLADA_CUDA=OFF",
                "-DLLADA_EMU=ON",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", "_C_emu"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return next(build_dir.glob("_C_emu*.so"))


def run_tests(module: Path, tests: str) -> tuple[list[str], str]:
    env = dict(os.environ, LLADA_EMU_MODULE=str(module))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", tests, "-q", "-rf", "--tb=line", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    report = next((ln for ln in out.splitlines() if "llada-emu:" in ln), "")
    return failed, report.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="run only these mutations")
    ap.add_argument("--keep", help="scratch directory to use and keep (default: a temp dir)")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="llada-mut-"))
    src, build_dir = scratch / "src", scratch / "build"
    if src.exists():
        shutil.rmtree(src)
    copy_tree(src)
    survived = []
    for m in chosen:
        path = src / m.path
        original = path.read_text()
        if original.count(m.old) != 1:
            print(f"[{m.name}] the text to mutate is not found exactly once in {m.path}")
            return 2
        path.write_text(original.replace(m.old, m.new))
        try:
            module = build(src, build_dir)
            failed, report = run_tests(module, m.tests)
        finally:
            path.write_text(original)
        status = f"caught: {len(failed)} failing tests" if failed else "SURVIVED"
        print(f"[{m.name}] {m.what}\n    {status}")
        for t in failed[:6]:
            print(f"      {t}")
        if len(failed) > 6:
            print(f"      ... and {len(failed) - 6} more")
        if report:
            print(f"    first report: {report[:400]}")
        if not failed:
            survived.append(m.name)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    print("all mutations caught" if not survived else f"survived: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
