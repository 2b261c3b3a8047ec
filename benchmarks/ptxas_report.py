#!/usr/bin/env python
"""Register, spill, shared-memory and stack figures of every CUDA kernel, from ``ptxas -v``.

Each ``csrc/cuda/*.cu`` is compiled once per target architecture with ``nvcc -Xptxas -v``
and the flags CMakeLists.txt gives the kernel library (its CUDA compile options, defines and
include paths; read from CMakeLists.txt so the two cannot drift apart), machine code only
(``-gencode arch=compute_XX,code=sm_XX``), output discarded. No GPU is needed.

For every kernel (``__global__`` entry) ptxas reports the registers per thread, the bytes of
local memory written and read because registers ran out (spill stores / loads), the static
shared memory and the per-thread stack frame. Shared memory a kernel takes dynamically at
launch (the attention kernels' tiles) is not part of ptxas' figure; the report says so.

The result is a markdown table (``benchmarks/results/ptxas-sm80-sm90.md`` for the default
architectures) with the kernel names demangled, followed by the kernels that spill and the
compile time of every file.

Usage::

    python benchmarks/ptxas_report.py                       # sm_80 and sm_90, 2 compiles at once
    python benchmarks/ptxas_report.py --archs 90 --jobs 8 --out /tmp/ptxas.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tables import markdown_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
# What the kernel sources include: a change elsewhere does not make the figures "-dirty".
KERNEL_DIRS = ["csrc/cuda", "csrc/common", "csrc/include"]

# Used when CMakeLists.txt cannot be read or parsed (the values it held when this was written).
FALLBACK_OPTIONS = [
    "-O3",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-Xcompiler=-fvisibility=hidden",
]
FALLBACK_DEFINES = ["LLADA_WITH_CUDA=1"]


@dataclass
class Kernel:
    """ptxas' figures for one entry function on one architecture."""

    source: str
    arch: str
    mangled: str
    name: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    stack: int = 0
    barriers: int = 0
    dynamic_smem: Optional[int] = None  # bytes the launcher asks for, where fixed per kernel


@dataclass
class Compile:
    """One nvcc run (a source file for one architecture)."""

    source: str
    arch: str
    seconds: float
    returncode: int
    kernels: list[Kernel] = field(default_factory=list)
    log: str = ""


def cmake_cuda_flags(cmakelists: Path) -> tuple[list[str], list[str], str]:
    """The CUDA compile options and the defines of the llada_kernels target in CMakeLists.txt.

    Returns ``(options, defines, where)``; ``where`` says whether they were read from the file
    or are the built-in fallback.
    """
    try:
        text = cmakelists.read_text()
    except OSError:
        return FALLBACK_OPTIONS, FALLBACK_DEFINES, "built-in (CMakeLists.txt unreadable)"
    opts = re.search(r"\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", text)
    defs = re.search(r"target_compile_definitions\(llada_kernels\s+PRIVATE\s+([^)]*)\)", text)
    if not opts or not defs:
        return FALLBACK_OPTIONS, FALLBACK_DEFINES, "built-in (CMakeLists.txt not understood)"
    return opts.group(1).split(), defs.group(1).split(), "CMakeLists.txt"


def nvcc_command(nvcc: str, source: Path, arch: str, options: list[str], defines: list[str]):
    """The nvcc command line for one source and architecture (CMake's Release flags)."""
    return [
        nvcc,
        "-O3",
        "-DNDEBUG",
        "-std=c++17",
        "-Xcompiler=-fPIC",
        *options,
        *(f"-D{d}" for d in defines),
        "-Dllada_kernels_EXPORTS",
        f"-I{ROOT / 'csrc' / 'include'}",
        f"-I{ROOT / 'csrc'}",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        "-c",
        str(source),
        "-o",
        os.devnull,
    ]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(text: str, source: str, arch: str) -> list[Kernel]:
    """Entry functions and their figures from ``nvcc -Xptxas -v`` output.

    ptxas prints, per function, ``Compiling entry function 'X' for 'sm_NN'`` (entries only),
    ``Function properties for X`` followed by the stack/spill line, and ``Used N registers,
    ... N bytes smem, ...``. Device functions that were not inlined get properties too but no
    ``Compiling entry`` line; they are left out.
    """
    kernels: dict[str, Kernel] = {}
    current: Optional[Kernel] = None  # the entry being compiled (owns the "Used" line)
    props_of: Optional[str] = None  # the function the next stack/spill line belongs to
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(source, m.group(2), m.group(1)))
            continue
        m = _PROPS.search(line)
        if m:
            props_of = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and props_of in kernels:
            k = kernels[props_of]
            k.stack, k.spill_stores, k.spill_loads = (int(x) for x in m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            s = _SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
            b = _BARRIERS.search(line)
            current.barriers = int(b.group(1)) if b else 0
    return list(kernels.values())


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names through cu++filt or c++filt (identity when neither exists)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def short_name(demangled: str) -> str:
    """``void ns::k<T, 64>(Params, int)`` -> ``ns::k<T, 64>``: drop the return type and the
    argument list (the template arguments are what tells instantiations apart)."""
    s = demangled.strip()
    if s.startswith("void "):
        s = s[len("void ") :]
    depth = 0
    for i in range(len(s) - 1, -1, -1):  # the '(' that opens the trailing argument list
        c = s[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                return s[:i]
    return s


def compile_one(nvcc: str, source: Path, arch: str, options, defines) -> Compile:
    """Compile ``source`` for ``arch`` with ``nvcc -Xptxas -v``; its time, status and kernels."""
    cmd = nvcc_command(nvcc, source, arch, options, defines)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    log = p.stdout + p.stderr
    rel = source.relative_to(ROOT).as_posix()
    return Compile(rel, arch, dt, p.returncode, parse_ptxas(log, rel, arch), log)


# The attention launchers take their tiles as dynamic shared memory, sized by constexpr
# functions of the head dim; a host-only program built from the same headers prints them.
_DYN_SMEM_FUNCS = {
    "attention_fwd_kernel": "fwd_smem_bytes",
    "attention_bwd_kernel": "bwd_smem_bytes",
}


def attention_smem_key(name: str) -> Optional[tuple[str, str]]:
    """``(kernel, template arguments after the dtype)`` of an attention main kernel, e.g.
    ``("attention_fwd_kernel", "128, true")``; None for any other kernel."""
    m = re.search(r"(attention_(?:fwd|bwd)_kernel)<[^,<>]+, (\d+(?:, (?:true|false))?)>", name)
    return (m.group(1), m.group(2)) if m else None


def attention_dynamic_smem(
    nvcc: str, kernels: list[Kernel], options: list[str], defines: list[str]
) -> tuple[dict[tuple[str, str], int], str]:
    """Dynamic shared memory (bytes) of the attention kernels by ``attention_smem_key``.

    Returns the figures and "" on success, or ``{}`` and the reason they are missing.
    """
    wanted = {key for key in map(attention_smem_key, (k.name for k in kernels)) if key}
    if not wanted:
        return {}, ""
    body = "".join(
        f'  std::printf("{name}|{args}|%zu\\n", '
        f"llada::cuda::attn::{_DYN_SMEM_FUNCS[name]}<{args}>());\n"
        for name, args in sorted(wanted)
    )
    src = (
        "#include <cstdio>\n"
        '#include "cuda/attention_fwd_kernel.cuh"\n'
        '#include "cuda/attention_bwd_kernel.cuh"\n'
        f"int main() {{\n{body}  return 0;\n}}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cu, exe = Path(tmp) / "smem_probe.cu", Path(tmp) / "smem_probe"
        cu.write_text(src)
        cmd = [
            nvcc,
            "-std=c++17",
            *options,
            *(f"-D{d}" for d in defines),
            f"-I{ROOT / 'csrc' / 'include'}",
            f"-I{ROOT / 'csrc'}",
            str(cu),
            "-o",
            str(exe),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            return {}, "the shared-memory probe did not compile: " + p.stderr.strip()[-300:]
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        if run.returncode != 0:
            return {}, f"the shared-memory probe failed (rc={run.returncode})"
    out = {}
    for line in run.stdout.splitlines():
        name, args, n = line.split("|")
        out[(name, args)] = int(n)
    return out, ""


def git_commit() -> str:
    """Short commit hash, ``-dirty`` when the kernel sources (``KERNEL_DIRS``) differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *KERNEL_DIRS],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def nvcc_version(nvcc: str) -> str:
    """``13.0 (V13.0.88)`` from ``nvcc --version`` (its last line when the format is new)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1:][0]


KERNEL_HEADERS = [
    "source",
    "kernel",
    "arch",
    "registers",
    "spill stores (B)",
    "spill loads (B)",
    "smem (B)",
    "dynamic smem (B)",
    "stack (B)",
]
COMPILE_HEADERS = ["source", "arch", "seconds", "kernels", "status"]


def _header_lines(meta: dict) -> list[str]:
    """The title and the notes on how the figures were made."""
    return [
        f"# ptxas resource usage ({', '.join('sm_' + a for a in meta['archs'])})",
        "",
        f"- generated by `{('python benchmarks/ptxas_report.py ' + meta['argv']).strip()}`",
        f"- nvcc {meta['nvcc_version']}, commit `{meta['commit']}`, date {meta['date']}",
        f"- flags ({meta['flags_from']}): `{meta['flags']}`",
        "- registers: per thread; spill stores / loads: bytes of local memory per thread "
        "written / read because the registers ran out; stack: per-thread stack frame",
        "- smem: *static* shared memory per block, as ptxas reports it; dynamic smem: what "
        "the launcher asks for at run time, which ptxas does not see (attention: "
        "`fwd_smem_bytes` / `bwd_smem_bytes` in `csrc/cuda/attention_*_kernel.cuh`, printed "
        "by a host program built from those headers"
        + (f"; {meta['dyn_smem_note']}" if meta.get("dyn_smem_note") else "")
        + "; a kernel whose dynamic shared memory follows its launch arguments, such as the "
        "remask selection's 8 bytes per window position, is left blank)",
        "",
    ]


def _kernel_table(kernels: list[Kernel]) -> list[str]:
    """One row per kernel and architecture, by source and name."""
    rows = (
        [
            Path(k.source).name,
            f"`{k.name}`",
            f"sm_{k.arch}",
            str(k.registers),
            str(k.spill_stores),
            str(k.spill_loads),
            str(k.smem),
            "" if k.dynamic_smem is None else str(k.dynamic_smem),
            str(k.stack),
        ]
        for k in sorted(kernels, key=lambda k: (k.source, k.name, k.arch))
    )
    return markdown_lines(KERNEL_HEADERS, rows, "lllrrrrrr")


def _spill_lines(kernels: list[Kernel]) -> list[str]:
    """The section on the kernels that spill (or a line saying none does)."""
    spills = [k for k in kernels if k.spill_stores or k.spill_loads]
    lines = ["", "## Kernels that spill", ""]
    if not spills:
        return lines + ["None: every kernel fits its registers on every architecture listed."]
    for k in sorted(spills, key=lambda k: (k.name, k.arch)):
        lines.append(
            f"- `{k.name}` on sm_{k.arch}: {k.registers} registers, {k.spill_stores} B "
            f"spill stores, {k.spill_loads} B spill loads, {k.stack} B stack"
        )
    return lines


def _stack_frame_lines(kernels: list[Kernel]) -> list[str]:
    """Stack frames without spills (a local array indexed at run time, or a call), grouped
    by kernel template: every instantiation of one kernel usually has the same frame."""
    groups: dict[tuple[str, str], set[int]] = {}
    for k in kernels:
        if k.stack and not (k.spill_stores or k.spill_loads):
            groups.setdefault((k.name.split("<")[0], k.arch), set()).add(k.stack)
    if not groups:
        return []
    lines = ["", "Stack frames without spills (local arrays indexed at run time, or calls):", ""]
    for (base, arch), frames in sorted(groups.items()):
        n = sum(1 for k in kernels if k.name.split("<")[0] == base and k.arch == arch)
        sizes = ", ".join(f"{f} B" for f in sorted(frames))
        lines.append(f"- `{base}` on sm_{arch} ({n} instantiation(s)): {sizes}")
    return lines


def _compile_time_lines(compiles: list[Compile], meta: dict) -> list[str]:
    """The compile time of every source and architecture."""
    lines = [
        "",
        "## Compile time",
        "",
        f"On {meta['host_cpus']} CPU cores, {meta['jobs']} compile(s) at a time.",
        "",
    ]
    rows = (
        [
            Path(c.source).name,
            f"sm_{c.arch}",
            f"{c.seconds:.1f}",
            str(len(c.kernels)),
            "ok" if c.returncode == 0 else f"FAILED (rc={c.returncode})",
        ]
        for c in sorted(compiles, key=lambda c: (c.source, c.arch))
    )
    return lines + markdown_lines(COMPILE_HEADERS, rows, "llrrl")


def render(compiles: list[Compile], meta: dict) -> str:
    """The markdown report: header, kernel table, spills, stack frames, compile times."""
    kernels = [k for c in compiles for k in c.kernels]
    lines = _header_lines(meta) + _kernel_table(kernels)
    lines += _spill_lines(kernels) + _stack_frame_lines(kernels)
    lines += _compile_time_lines(compiles, meta)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--archs",
        nargs="+",
        default=["80", "90"],
        help="compute capabilities without the dot (default: 80 90)",
    )
    ap.add_argument(
        "--jobs", type=int, default=2, help="compiles at a time (default 2; each is one nvcc)"
    )
    ap.add_argument(
        "--nvcc", default=None, help="nvcc to use (default: CUDACXX, PATH, /usr/local/cuda)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file (default: benchmarks/results/ptxas-sm<A>-sm<B>.md)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--sources", nargs="+", type=Path, default=None, help="only these .cu files")
    return ap


def find_nvcc(given: Optional[str]) -> Optional[str]:
    """``given``, else ``$CUDACXX``, else nvcc on PATH, else /usr/local/cuda's (or None)."""
    nvcc = given or os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not nvcc and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def compile_all(
    nvcc: str, jobs: list[tuple[Path, str]], workers: int, options: list[str], defines: list[str]
) -> list[Compile]:
    """Every (source, arch) compile, ``workers`` at a time, reported as each finishes (in
    the order of ``jobs``); a failed compile's log goes to stderr."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(compile_one, nvcc, s, a, options, defines) for s, a in jobs]
        compiles = []
        for f in futures:
            c = f.result()
            compiles.append(c)
            status = "ok" if c.returncode == 0 else f"FAILED rc={c.returncode}"
            print(
                f"  {c.source} sm_{c.arch}: {len(c.kernels)} kernel(s), "
                f"{c.seconds:.1f} s, {status}",
                flush=True,
            )
            if c.returncode != 0:
                print(c.log[-4000:], file=sys.stderr)
    return compiles


def name_kernels(compiles: list[Compile], nvcc: str, options: list[str], defines: list[str]) -> str:
    """Give every kernel its readable name and the attention kernels their dynamic shared
    memory; returns the note on why that figure is missing ("" when it is not)."""
    names = demangle(sorted({k.mangled for c in compiles for k in c.kernels}))
    for c in compiles:
        for k in c.kernels:
            k.name = short_name(names.get(k.mangled, k.mangled))
    all_kernels = [k for c in compiles for k in c.kernels]
    dyn, dyn_note = attention_dynamic_smem(nvcc, all_kernels, options, defines)
    for k in all_kernels:
        key = attention_smem_key(k.name)
        if key:
            k.dynamic_smem = dyn.get(key)
    return dyn_note


def report_meta(
    args: argparse.Namespace,
    argv: Optional[list[str]],
    nvcc: str,
    cmake: tuple[list[str], list[str], str],
    t0: float,
    dyn_note: str,
) -> dict:
    """The header of the report: tools, commit, date, flags (``cmake``: the options,
    defines and where they came from) and the wall time since ``t0``."""
    options, defines, flags_from = cmake
    sample = nvcc_command(nvcc, Path("<file>.cu"), "<XX>", options, defines)
    flags = " ".join(shlex.quote(a) for a in sample[1:]).replace(str(ROOT) + "/", "")
    return {
        "archs": args.archs,
        "argv": " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "nvcc": nvcc,
        "nvcc_version": nvcc_version(nvcc),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "flags": flags,
        "flags_from": flags_from,
        "jobs": args.jobs,
        "host_cpus": os.cpu_count(),
        "wall_s": time.perf_counter() - t0,
        "dyn_smem_note": dyn_note,
    }


def write_report(out: Path, json_path: Optional[Path], compiles: list[Compile], meta: dict):
    """The markdown report into ``out``, and the figures as JSON into ``json_path`` if given."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(compiles, meta))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"meta": meta, "compiles": [asdict(c) | {"log": None} for c in compiles]}
        json_path.write_text(json.dumps(data, indent=2))


def main(argv: Optional[list[str]] = None) -> int:
    """Compile every kernel source and write the report; returns the exit status."""
    args = build_parser().parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if not nvcc:
        print("ptxas_report: no nvcc found (set --nvcc or CUDACXX)", file=sys.stderr)
        return 2
    sources = [p.resolve() for p in args.sources] if args.sources else sorted(CUDA_DIR.glob("*.cu"))
    cmake = cmake_cuda_flags(ROOT / "CMakeLists.txt")
    out = args.out or ROOT / "benchmarks" / "results" / (
        "ptxas-" + "-".join(f"sm{a}" for a in args.archs) + ".md"
    )

    jobs = [(s, a) for s in sources for a in args.archs]
    print(f"ptxas_report: {len(jobs)} compiles with {nvcc}, {args.jobs} at a time", flush=True)
    t0 = time.perf_counter()
    compiles = compile_all(nvcc, jobs, args.jobs, *cmake[:2])
    dyn_note = name_kernels(compiles, nvcc, *cmake[:2])
    meta = report_meta(args, argv, nvcc, cmake, t0, dyn_note)
    write_report(out, args.json, compiles, meta)
    n = sum(len(c.kernels) for c in compiles)
    failed = [c for c in compiles if c.returncode != 0]
    print(f"ptxas_report: {n} kernel entries, {meta['wall_s']:.0f} s; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
