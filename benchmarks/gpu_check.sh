#!/usr/bin/env bash
# One-shot GPU verification of the repository, meant for a single call on a GPU machine:
#
#   1. setup      pick a Python with CUDA torch; install optional test packages from a
#                 carried .whl/ folder (pip --no-index) when present
#   2. build      the extension in place with the CUDA kernels for the local GPU arch
#   3. pytest     the full python_tests suite on the GPU (-x -q); test files whose optional
#                 imports (safetensors, tokenizers, ...) are missing are left out and named
#   4. memcheck   compute-sanitizer --tool memcheck on a few small CUDA kernel tests
#   5. racecheck  compute-sanitizer --tool racecheck on the same tests
#   6. bench      every benchmarks/*.py script that accepts --quick, and the CUDA kernel
#                 benchmarks (benchmarks/*cuda*.py) in any case
#
# Every stage has its own time limit and the script keeps going when one fails; the whole
# run stays within about 9 minutes (LLADA_GPU_CHECK_BUDGET seconds, default 530). Logs, the
# benchmark results and a summary (device, commit, date, status of every stage) go to
# $OUT/gpu_check when OUT is set, else benchmarks/results/gpu_check.
#
# Environment: PYTHON (interpreter to use), LLADA_CUDA_ARCHS (e.g. "90"; default: the
# local GPU's compute capability), LLADA_JOBS (build jobs; default: all cores),
# LLADA_GPU_CHECK_STAGES (comma-separated subset of setup,build,pytest,memcheck,racecheck,
# bench; default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

START=$(date +%s)
BUDGET="${LLADA_GPU_CHECK_BUDGET:-530}"
RES="${OUT:+$OUT/gpu_check}"
RES="${RES:-$ROOT/benchmarks/results/gpu_check}"
mkdir -p "$RES"
touch "$RES/.start"  # files newer than this were produced by this run
SUMMARY="$RES/summary.md"
declare -a STAGES=()

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

WANT=",${LLADA_GPU_CHECK_STAGES:-setup,build,pytest,memcheck,racecheck,bench},"
want() { [[ "$WANT" == *",$1,"* ]]; }

# run_stage NAME CAP_SECONDS CMD...: runs CMD with a limit of min(CAP, time left - 5 s),
# logging to $RES/NAME.log, and records "NAME status seconds".
run_stage() {
  local name="$1" cap="$2"
  shift 2
  if ! want "${name%%_*}"; then
    STAGES+=("$name|not requested|0")
    return 0
  fi
  local left
  left=$(($(remaining) - 5))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 5 ]; then
    STAGES+=("$name|skipped (no time left)|0")
    echo "[gpu_check] $name: skipped, no time left"
    return 0
  fi
  echo "[gpu_check] $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    status="ok"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="TIMEOUT after ${limit}s"
  else
    status="FAILED (rc=$rc)"
  fi
  STAGES+=("$name|$status|$(($(date +%s) - t0))")
  echo "[gpu_check] $name: $status ($(($(date +%s) - t0))s)"
  tail -n 15 "$RES/$name.log" | sed "s/^/    [$name] /"
  return 0
}

# skip_stage NAME REASON: records a stage that could not run.
skip_stage() {
  if want "$1"; then STAGES+=("$1|skipped ($2)|0"); else STAGES+=("$1|not requested|0"); fi
}

# ---- 1. setup -------------------------------------------------------------------------
pick_python() {
  local c
  for c in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      >/dev/null 2>&1; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}
PY="$(pick_python)" || PY="$(command -v python3 || echo python3)"
export PYTHON="$PY" PY ROOT
echo "[gpu_check] python: $PY"

setup_stage() {
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
  nvidia-smi || true
  if [ -d "$ROOT/.whl" ]; then
    # Offline wheels carried with the checkout; each package on its own so one missing
    # wheel does not block the others.
    local pkg
    for pkg in pytest pytest-benchmark hypothesis safetensors tokenizers tqdm; do
      "$PY" -c "import importlib.util, sys; n='$pkg'.replace('-', '_'); \
sys.exit(0 if importlib.util.find_spec(n) else 1)" 2>/dev/null && continue
      "$PY" -m pip install --no-index --find-links "$ROOT/.whl" "$pkg" ||
        "$PY" -m pip install --no-index --find-links "$ROOT/.whl" --break-system-packages "$pkg" ||
        echo "could not install $pkg from .whl/"
    done
  else
    echo "no .whl/ folder: using the packages already installed"
  fi
}
export -f setup_stage
run_stage setup 60 bash -c setup_stage

# ---- 2. build -------------------------------------------------------------------------
if [ -z "${LLADA_CUDA_ARCHS:-}" ]; then
  CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
  export LLADA_CUDA_ARCHS="${CC:-90}"
fi
export LLADA_CUDA=1
# The CPU executor (llada_ext._C_emu) runs the CUDA kernels in CI; here the GPU runs them, so
# it is not built and its tests skip (they would spend the pytest stage's time on the CPU).
export LLADA_EMU=0
export LLADA_JOBS="${LLADA_JOBS:-$(nproc)}"
echo "[gpu_check] CUDA archs: $LLADA_CUDA_ARCHS, jobs: $LLADA_JOBS"
run_stage build 240 bash scripts/dev_build.sh
BUILD_OK=0
"$PY" -c "import llada_ext as lx, sys; sys.exit(0 if lx.has_cuda_kernels() else 1)" \
  >/dev/null 2>&1 && BUILD_OK=1

# ---- 3. pytest ------------------------------------------------------------------------
# Test files that import an optional package which is missing here are left out by name.
IGNORES=()
for mod in safetensors tokenizers hypothesis pytest_benchmark; do
  "$PY" -c "import $mod" >/dev/null 2>&1 && continue
  for f in python_tests/test_*.py; do
    if grep -qE "^(import $mod|from $mod[ .])" "$f"; then
      IGNORES+=("--ignore=$f")
      echo "[gpu_check] $mod missing: leaving out $f" | tee -a "$RES/ignored.txt"
    fi
  done
done
if [ $BUILD_OK -eq 1 ]; then
  run_stage pytest 170 "$PY" -m pytest python_tests -x -q -p no:cacheprovider ${IGNORES[@]+"${IGNORES[@]}"}
else
  skip_stage pytest "no CUDA build"
fi

# ---- 4/5. compute-sanitizer -----------------------------------------------------------
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)"
SAN_TESTS=(
  "python_tests/test_cuda_ce_remask.py::test_masked_ce_inplace_gradient"
  "python_tests/test_cuda_ce_remask.py::test_masked_ce_weight_zero_rows_not_read"
  "python_tests/test_cuda_ce_remask.py::test_remask_ties_lower_position_first"
  "python_tests/test_cuda_ce_remask.py::test_remask_inplace_matches_out_of_place"
)
SAN_K="not large_vocab"
if [ -f python_tests/test_attention.py ]; then
  # the attention kernels too, on one small CUDA case
  SAN_TESTS+=("python_tests/test_attention.py::test_non_contiguous")
  SAN_K="$SAN_K and (not attention or cuda)"
fi
if [ $BUILD_OK -eq 1 ] && [ -n "$SAN" ]; then
  # No caching allocator: every tensor is its own allocation, so the sanitizer sees
  # out-of-bounds accesses that would otherwise land inside a pooled block.
  for tool in memcheck racecheck; do
    run_stage "$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" \
      --error-exitcode 1 "$PY" -m pytest -x -q -p no:cacheprovider "${SAN_TESTS[@]}" \
      -k "$SAN_K"
  done
else
  skip_stage memcheck "no CUDA build or no compute-sanitizer"
  skip_stage racecheck "no CUDA build or no compute-sanitizer"
fi

# ---- 6. benchmarks --------------------------------------------------------------------
if [ $BUILD_OK -eq 1 ]; then
  # Scripts (a __main__ block) that accept --quick, plus the CUDA kernel benchmarks even
  # without it; CUDA ones first. Output folder passed when the script takes one.
  for b in $(ls benchmarks/*cuda*.py 2>/dev/null) $(ls benchmarks/*.py | grep -v cuda); do
    name="$(basename "$b" .py)"
    case "$name" in bench_common | kernel_cases | test_*) continue ;; esac
    grep -q "__main__" "$b" || continue
    args=()
    if grep -q -- '"--quick"' "$b"; then
      args+=(--quick)
    elif [[ "$name" != *cuda* ]]; then
      continue
    fi
    if grep -q -- '"--out"' "$b"; then
      args+=(--out "$RES")
    elif grep -q -- '"--out-dir"' "$b"; then
      args+=(--out-dir "$RES")
    fi
    run_stage "bench_$name" 100 "$PY" "$b" ${args[@]+"${args[@]}"}
  done
  # sampler options (cache modes, threshold, factor) with the CUDA kernels, random weights
  run_stage bench_sampler_speed 60 "$PY" benchmarks/sampler_speed.py --device cuda \
    --untrained --repeats 2 --out "$RES"
  # benchmarks that write only to benchmarks/results: copy what this run produced
  find benchmarks/results -maxdepth 1 -type f -newer "$RES/.start" \
    -exec cp {} "$RES/" \; 2>/dev/null
else
  skip_stage bench "no CUDA build"
fi

# ---- summary --------------------------------------------------------------------------
DEVICE="$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT-dirty"
{
  echo "# GPU check"
  echo
  echo "- device: ${DEVICE:-unknown}"
  echo "- commit: $COMMIT"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null))"
  echo "- CUDA archs: $LLADA_CUDA_ARCHS; total $(($(date +%s) - START)) s"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  for s in "${STAGES[@]}"; do
    IFS='|' read -r n st sec <<<"$s"
    echo "| $n | $st | $sec |"
  done
  if [ -s "$RES/ignored.txt" ]; then
    echo
    echo "Left out of pytest:"
    sed 's/^\[gpu_check\] /- /' "$RES/ignored.txt"
  fi
} >"$SUMMARY"
echo
cat "$SUMMARY"
FAILED=0
for s in "${STAGES[@]}"; do
  case "$s" in *"|ok|"* | *"|not requested|"*) ;; *) FAILED=1 ;; esac
done
exit $FAILED
