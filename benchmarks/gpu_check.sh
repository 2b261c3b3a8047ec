#!/usr/bin/env bash
# GPU check: one command that takes a checkout to results on a GPU machine without network,
# sized for one ~10-minute call on an 8-16-core H100/H200. Stages, most important first, so
# that what runs short of time is what matters least:
#
#   preflight        driver, CUDA and torch versions (also printed before any stage), and a
#                    plain verdict when the driver is too old for the CUDA runtime that the
#                    library links statically; optional test packages from a carried .whl/
#   build            the extension in place, CUDA kernels for the local GPU arch only, no CPU
#                    executor (LLADA_EMU=0: the GPU runs the kernels here)
#   cuda_tests       python_tests/test_cuda_*.py and the [cuda] cases of the kernel tests,
#                    without -x, so one failure does not hide the rest
#   memcheck         compute-sanitizer memcheck on small kernel test cases
#   racecheck        compute-sanitizer racecheck on the same cases
#   bench_attention  benchmarks/bench_attention_cuda.py (TFLOP/s vs SDPA backends)
#   bench_ce_remask  benchmarks/bench_ce_remask_cuda.py (GB/s vs plain torch)
#   throughput       benchmarks/throughput.py, 1b dims, batch 1, one prompt/answer pair,
#                    k = 1 and 4 tokens per step, 3 interleaved rounds; the methods and lengths
#                    are sized to the time left (GPU_CHECK_THROUGHPUT_ARGS replaces the choice)
#
# Time: a total budget (default 540 s) is split into per-stage limits: a stage gets its share
# of the budget (at least its minimum), never more than what is left, and is skipped with
# "skipped: out of time" when less than its minimum is left. The throughput stage takes all
# that is left, so time the earlier stages do not use goes to it.
#
# Results: every log and figure goes to benchmarks/results/gpu-<date>-<shortcommit>/, with
# summary.json and summary.md (device, driver, CUDA versions, commit, date, each stage's
# status and seconds). Exit status: 0 when every stage that ran passed, 1 otherwise, 2 for a
# usage error. A summary table is printed at the end.
#
# Dry run (--dry-run or GPU_CHECK_DRY_RUN=1): the same control flow on a CPU-only machine,
# every stage's commands replaced by a stand-in that prints the command it stands for; nothing
# is built or measured. Knobs, honoured in a dry run only: GPU_CHECK_DRY_FAIL=stage[,stage]
# makes those stand-ins fail; GPU_CHECK_DRY_SLEEP=N (or stage=N,stage=N) makes them take N
# seconds; GPU_CHECK_DRY_VALIDATE=1 also collects each stage's pytest selection and parses the
# throughput options (catches a renamed test or option without a GPU). The version probe runs
# in a dry run too, without importing torch. GPU_CHECK_DRIVER_CUDA=X.Y and
# GPU_CHECK_TOOLKIT_CUDA=X.Y stand in for the driver's and nvcc's CUDA versions (to exercise
# the "driver too old" verdict).
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [--out DIR] [--tar FILE]
#                                     [--stages a,b,...]
# Environment: GPU_CHECK_BUDGET, GPU_CHECK_OUT, GPU_CHECK_TAR, GPU_CHECK_STAGES (as the
# options), PYTHON (interpreter; default: the first with a CUDA torch), LLADA_CUDA_ARCHS
# (e.g. "90"; default: the GPU's compute capability), LLADA_JOBS (build jobs; default: all
# cores), GPU_CHECK_THROUGHPUT_ARGS (throughput.py options instead of the sized ones).
set -uo pipefail
CALLER="$(pwd)" # relative --out / --tar paths are the caller's
cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
START=$SECONDS

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# ---- options -----------------------------------------------------------------------------
DRY="${GPU_CHECK_DRY_RUN:-0}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
RES="${GPU_CHECK_OUT:-}"
TAR="${GPU_CHECK_TAR:-}"
WANT="${GPU_CHECK_STAGES:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="${2:-}"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --out) RES="${2:-}"; shift ;;
    --out=*) RES="${1#*=}" ;;
    --tar) TAR="${2:-}"; shift ;;
    --tar=*) TAR="${1#*=}" ;;
    --stages) WANT="${2:-}"; shift ;;
    --stages=*) WANT="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = 1 ] || DRY=0
[ -n "$RES" ] && [[ "$RES" != /* ]] && RES="$CALLER/$RES"
[ -n "$TAR" ] && [[ "$TAR" != /* ]] && TAR="$CALLER/$TAR"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
  echo "gpu_check: the budget must be whole seconds, got '$BUDGET'" >&2
  exit 2
fi

# The stages: name, share of the budget in percent (0: all that is left), the minimum seconds
# worth starting it with, and whether it needs the CUDA build. The shares favour the checks
# over the figures: a failing test matters more than a missing benchmark. The sanitizers get
# the most per test (every kernel of the process is instrumented, torch's too); a one-arch
# build takes well under a minute on 8-16 cores.
STAGE_TABLE=(
  "preflight        4  5 no"
  "build           16 30 no"
  "cuda_tests      18 20 yes"
  "memcheck        14 20 yes"
  "racecheck       14 20 yes"
  "bench_attention  7 15 yes"
  "bench_ce_remask  6 10 yes"
  "throughput       0 30 yes"
)
RESERVE=5 # seconds kept back for the summary
ALL_STAGES=" $(printf '%s\n' "${STAGE_TABLE[@]}" | awk '{print $1}' | tr '\n' ' ')"
if [ -n "$WANT" ]; then
  for s in ${WANT//,/ }; do
    [[ "$ALL_STAGES" == *" $s "* ]] || { echo "gpu_check: unknown stage '$s' (stages:$ALL_STAGES)" >&2; exit 2; }
  done
fi
requested() { [ -z "$WANT" ] || [[ ",$WANT," == *",$1,"* ]]; }

# ---- results folder ----------------------------------------------------------------------
SHORT="$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT-dirty"
DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
RES="${RES:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)-$SHORT}"
mkdir -p "$RES" || { echo "gpu_check: cannot create $RES" >&2; exit 2; }
RES="$(cd "$RES" && pwd)"
RECORDS="$RES/stages.tsv"
: >"$RECORDS"

say() { echo "[gpu_check] $*"; }
remaining() { echo $((BUDGET - (SECONDS - START))); }

# ---- Python ------------------------------------------------------------------------------
# The interpreter whose torch sees the GPU (a GPU image's python3 usually), else the project's
# virtual environment, else python3. A dry run takes the first one that exists.
pick_python() {
  local c check
  if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" || echo "$PYTHON"
    return
  fi
  if [ "$DRY" = 1 ]; then
    for c in "$ROOT/.venv/bin/python" python3; do
      command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return; }
    done
  else
    # First a torch that sees the GPU; failing that, any torch (the stages then say why).
    for check in "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      "import torch"; do
      for c in python3 "$ROOT/.venv/bin/python" python; do
        command -v "$c" >/dev/null 2>&1 || continue
        timeout 60 "$c" -c "$check" >/dev/null 2>&1 && { command -v "$c"; return; }
      done
    done
  fi
  echo python3
}
PY="$(pick_python)"
# The in-place build must win over any installed llada_ext, also for the scripts under
# benchmarks/ (whose sys.path[0] is benchmarks/).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Sleeping OpenMP workers: the CPU twins in the tests would otherwise spin against torch.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# ---- versions: printed first, before any stage -------------------------------------------
NVCC="${CUDACXX:-$(command -v nvcc || true)}"
[ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; }
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
  /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n1)"

trim() {
  local v="$1"
  v="${v#"${v%%[![:space:]]*}"}"
  echo "${v%"${v##*[![:space:]]}"}"
}

probe_versions() {
  GPU_NAME="" GPU_CC="" GPU_MEM="" DRIVER_VERSION="" DRIVER_CUDA_SMI=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi >"$RES/nvidia-smi.txt" 2>&1
    DRIVER_CUDA_SMI="$(grep -o 'CUDA Version: *[0-9.]*' "$RES/nvidia-smi.txt" | grep -o '[0-9.]*$' | head -n1)"
    IFS=',' read -r GPU_NAME GPU_CC DRIVER_VERSION GPU_MEM < <(timeout 30 nvidia-smi \
      --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)
    GPU_NAME="$(trim "${GPU_NAME:-}")" GPU_CC="$(trim "${GPU_CC:-}")"
    DRIVER_VERSION="$(trim "${DRIVER_VERSION:-}")" GPU_MEM="$(trim "${GPU_MEM:-}")"
  fi
  # The driver API's own answer (cuDriverGetVersion through libcuda.so.1) and torch's view.
  local probe_torch=1
  [ "$DRY" = 1 ] && probe_torch=0 # a torch import costs seconds and says nothing on a CPU
  DRIVER_CUDA_API="" TORCH_VERSION="" TORCH_CUDA="" TORCH_CUDA_AVAILABLE="" TORCH_DRIVER_CUDA=""
  TORCH_DEVICE="" TORCH_CC="" PY_VERSION=""
  eval "$(PROBE_TORCH=$probe_torch timeout 90 "$PY" - <<'EOF' 2>/dev/null
import ctypes
import os
import platform
import shlex


def emit(key, value):
    print(f"{key}={shlex.quote(str(value))}")


def cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}" if v else ""


emit("PY_VERSION", platform.python_version())
try:
    lib = ctypes.CDLL("libcuda.so.1")
    v = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
        emit("DRIVER_CUDA_API", cuda_version(v.value))
except OSError:
    pass
if os.environ.get("PROBE_TORCH") == "1":
    try:
        import torch

        emit("TORCH_VERSION", torch.__version__)
        emit("TORCH_CUDA", torch.version.cuda or "none (CPU build)")
        ok = torch.cuda.is_available()
        emit("TORCH_CUDA_AVAILABLE", "yes" if ok else "no")
        get = getattr(torch._C, "_cuda_getDriverVersion", None)  # cudaDriverGetVersion
        if get is not None:
            try:
                emit("TORCH_DRIVER_CUDA", cuda_version(get()))
            except RuntimeError:
                pass
        if ok:
            emit("TORCH_DEVICE", torch.cuda.get_device_name(0))
            emit("TORCH_CC", "%d.%d" % torch.cuda.get_device_capability(0))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        emit("TORCH_VERSION", f"unavailable ({type(e).__name__}: {e})"[:160])
else:
    emit("TORCH_VERSION", "not probed (dry run)")
EOF
  )"
  TOOLKIT_CUDA="${GPU_CHECK_TOOLKIT_CUDA:-}"
  if [ -z "$TOOLKIT_CUDA" ] && [ -n "$NVCC" ]; then
    TOOLKIT_CUDA="$("$NVCC" --version 2>/dev/null | grep -o 'release [0-9.]*' | grep -o '[0-9.]*$')"
  fi
  DRIVER_CUDA="${DRIVER_CUDA_SMI:-${DRIVER_CUDA_API:-${TORCH_DRIVER_CUDA:-}}}"
  if [ -n "$DRIVER_CUDA_SMI" ]; then
    DRIVER_CUDA_FROM="nvidia-smi"
  elif [ -n "$DRIVER_CUDA_API" ]; then
    DRIVER_CUDA_FROM="cuDriverGetVersion"
  else
    DRIVER_CUDA_FROM="torch (cudaDriverGetVersion)"
  fi
  if [ -n "${GPU_CHECK_DRIVER_CUDA:-}" ]; then
    DRIVER_CUDA="$GPU_CHECK_DRIVER_CUDA" DRIVER_CUDA_FROM="GPU_CHECK_DRIVER_CUDA (override)"
  fi
  [ -n "$DRIVER_CUDA" ] || DRIVER_CUDA_FROM=""
}

# The library links the CUDA runtime of the toolkit that builds it statically (CMakeLists.txt:
# CUDA::cudart_static), so the driver must support that runtime's major version: CUDA 13.x
# needs driver >= 580, 12.x >= 525. Within one major version, minor-version compatibility
# runs machine code built for the GPU on an older driver.
driver_verdict() {
  local dmaj dmin tmaj tmin need=""
  if [ -z "$DRIVER_CUDA" ]; then
    DRIVER_OK="unknown" DRIVER_NOTE="no NVIDIA driver found (no nvidia-smi, no libcuda.so.1)"
    return
  fi
  if [ -z "$TOOLKIT_CUDA" ]; then
    DRIVER_OK="unknown" DRIVER_NOTE="no nvcc found: the CUDA kernels cannot be built"
    return
  fi
  IFS=. read -r dmaj dmin _ <<<"$DRIVER_CUDA"
  IFS=. read -r tmaj tmin _ <<<"$TOOLKIT_CUDA"
  dmin="${dmin:-0}" tmin="${tmin:-0}"
  case "$tmaj" in 13) need=" (driver >= 580)" ;; 12) need=" (driver >= 525)" ;; esac
  if ((10#$dmaj < 10#$tmaj)); then
    DRIVER_OK="no"
    DRIVER_NOTE="DRIVER TOO OLD: the driver supports CUDA $DRIVER_CUDA, but the library links the CUDA $TOOLKIT_CUDA runtime statically (nvcc $TOOLKIT_CUDA), which needs a driver for CUDA $tmaj.x$need; every kernel launch would fail with cudaErrorInsufficientDriver. Update the driver, or build with a CUDA $dmaj.x toolkit (CUDACXX=/path/to/nvcc)."
  elif ((10#$dmaj == 10#$tmaj && 10#$dmin < 10#$tmin)); then
    DRIVER_OK="yes"
    DRIVER_NOTE="driver CUDA $DRIVER_CUDA is older than the toolkit's $TOOLKIT_CUDA: runs through minor-version compatibility (machine code for this GPU is built; newer PTX would not JIT)"
  else
    DRIVER_OK="yes" DRIVER_NOTE="driver CUDA $DRIVER_CUDA >= toolkit CUDA $TOOLKIT_CUDA"
  fi
  local torch_maj="${TORCH_CUDA%%.*}"
  if [[ "$torch_maj" =~ ^[0-9]+$ ]] && ((10#$torch_maj > 10#$dmaj)); then
    DRIVER_NOTE="$DRIVER_NOTE; torch is built for CUDA $TORCH_CUDA, newer than the driver: torch will not see the GPU"
  fi
}

probe_versions
driver_verdict
# Build for the local GPU only: its compute capability, e.g. "9.0" -> "90".
ARCHS="${LLADA_CUDA_ARCHS:-}"
ARCHS_FROM="LLADA_CUDA_ARCHS"
if [ -z "$ARCHS" ]; then
  ARCHS="$(echo "${GPU_CC:-$TORCH_CC}" | tr -d ' .')"
  ARCHS_FROM="the GPU's compute capability"
  [ -n "$ARCHS" ] || { ARCHS=90 ARCHS_FROM="no GPU found: the H100/H200 default"; }
fi
JOBS="${LLADA_JOBS:-$(nproc)}"

{
  say "results: $RES$([ "$DRY" = 1 ] && echo '  (DRY RUN: CPU stand-ins, nothing is built or measured)')"
  say "commit $COMMIT, $DATE, budget ${BUDGET}s"
  say "GPU: ${GPU_NAME:-${TORCH_DEVICE:-none found}} (compute capability ${GPU_CC:-${TORCH_CC:-?}}, ${GPU_MEM:-? memory})"
  say "driver: ${DRIVER_VERSION:-unknown}; driver CUDA: nvidia-smi ${DRIVER_CUDA_SMI:-n/a}, cuDriverGetVersion ${DRIVER_CUDA_API:-n/a}, torch (cudaDriverGetVersion) ${TORCH_DRIVER_CUDA:-n/a}"
  say "toolkit: nvcc ${TOOLKIT_CUDA:-not found} (${NVCC:-no nvcc}), linked statically into the library"
  say "torch: ${TORCH_VERSION:-not found}, built for CUDA ${TORCH_CUDA:-n/a}, sees the GPU: ${TORCH_CUDA_AVAILABLE:-n/a}; python $PY (${PY_VERSION:-?})"
  say "driver check: $DRIVER_OK: $DRIVER_NOTE"
  say "CUDA archs to build: $ARCHS ($ARCHS_FROM); compute-sanitizer: ${SAN:-not found}"
} | tee "$RES/versions.txt"

# ---- the stage runner --------------------------------------------------------------------
# Each stage is a function stage_<name> run in this shell, its output in <results>/<name>.log.
# Its external commands go through run_cmd, which applies the stage's deadline (timeout) or,
# in a dry run, prints the command and plays the stand-in.
STAGE_NAME="" STAGE_LOG="" STAGE_DEADLINE=0 STAGE_LIMIT=0 STAGE_SKIP="" STAGE_NOTE="" STANDIN_DONE=0
BUILD_STATUS=""

dry_param() { # dry_param VAR_VALUE: the value for this stage from "N" or "stage=N,..."
  local spec="$1" item
  [[ "$spec" == *=* ]] || { echo "$spec"; return; }
  for item in ${spec//,/ }; do
    [ "${item%%=*}" = "$STAGE_NAME" ] && { echo "${item#*=}"; return; }
  done
  echo 0
}

show_cmd() { # the command line as one log line (multi-line python -c snippets joined)
  local line="$*"
  echo "+ ${line//$'\n'/; }"
}

run_cmd() {
  local left=$((STAGE_DEADLINE - SECONDS))
  if ((left <= 0)); then
    echo "out of stage time before: $*"
    return 124
  fi
  show_cmd "$@"
  if [ "$DRY" = 1 ]; then
    # One stand-in per stage: its duration and its failure apply to the first command.
    ((STANDIN_DONE)) && return 0
    STANDIN_DONE=1
    local nap
    nap="$(dry_param "${GPU_CHECK_DRY_SLEEP:-0}")"
    echo "dry run: stand-in for the command above (${nap:-0}s)"
    timeout --kill-after=2 "$left" sleep "${nap:-0}" || return $?
    if [[ ",${GPU_CHECK_DRY_FAIL:-}," == *",$STAGE_NAME,"* ]]; then
      echo "dry run: forced failure of stage $STAGE_NAME (GPU_CHECK_DRY_FAIL)"
      return 1
    fi
    return 0
  fi
  # timeout leads its own process group and signals all of it: pytest workers, nvcc jobs.
  timeout --kill-after=10 "$left" "$@"
}

# run_now CMD...: a command that runs in a dry run too (the GPU_CHECK_DRY_VALIDATE checks).
run_now() {
  local left=$((STAGE_DEADLINE - SECONDS))
  ((left > 0)) || return 124
  show_cmd "$@"
  timeout --kill-after=5 "$left" "$@"
}
validating() { [ "$DRY" = 1 ] && [ "${GPU_CHECK_DRY_VALIDATE:-0}" = 1 ]; }

record() { # record NAME STATUS SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RECORDS"
  # A build that was not requested gates nothing: the stages use the build already there.
  if [ "$1" = build ] && [ "$5" != "not requested" ]; then BUILD_STATUS="$2"; fi
}

run_stage() {
  local name="$1" share="$2" min="$3" needs_build="$4"
  if ! requested "$name"; then
    record "$name" skipped 0 0 "not requested"
    return
  fi
  local left=$(($(remaining) - RESERVE)) cap
  if ((share > 0)); then
    cap=$((BUDGET * share / 100))
    ((cap >= min)) || cap=$min
  else
    cap=$left
  fi
  local limit=$((cap < left ? cap : left))
  if ((limit < min)); then
    say "$name: skipped: out of time (${left}s left, needs at least ${min}s)"
    record "$name" skipped 0 0 "out of time (${left}s left, needs ${min}s)"
    return
  fi
  if [ "$needs_build" = yes ] && [ -n "$BUILD_STATUS" ] && [ "$BUILD_STATUS" != passed ]; then
    say "$name: skipped: needs the CUDA build (build $BUILD_STATUS)"
    record "$name" skipped 0 0 "needs the CUDA build (build $BUILD_STATUS)"
    return
  fi
  STAGE_NAME="$name" STAGE_LOG="$RES/$name.log" STAGE_SKIP="" STAGE_NOTE="" STANDIN_DONE=0
  STAGE_LIMIT=$limit STAGE_DEADLINE=$((SECONDS + limit))
  say "$name: running (limit ${limit}s, log $STAGE_LOG)"
  local t0=$SECONDS rc=0
  { "stage_$name"; } >"$STAGE_LOG" 2>&1 || rc=$?
  local dt=$((SECONDS - t0)) status note=""
  if [ -n "$STAGE_SKIP" ]; then
    status=skipped note="$STAGE_SKIP"
  elif ((rc == 0)); then
    status=passed
  elif ((rc == 124 || rc == 137)) || ((SECONDS >= STAGE_DEADLINE)); then
    status=failed note="timeout after ${limit}s"
  else
    status=failed note="exit status $rc"
  fi
  # What the stage said about itself: its STAGE_NOTE, else pytest's closing line ("3 failed,
  # 212 passed in 41.2s") and compute-sanitizer's error summary.
  local said="$STAGE_NOTE" line
  if [ -z "$said" ]; then
    for line in \
      "$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' \
        "$STAGE_LOG" | tail -n1 | sed -E 's/^=+ //; s/ =+$//')" \
      "$(grep -Eo '(ERROR|RACECHECK) SUMMARY: .*' "$STAGE_LOG" | tail -n1)"; do
      [ -n "$line" ] && said="${said:+$said; }$line"
    done
  fi
  [ -n "$said" ] && note="${note:+$note; }$said"
  say "$name: $status${note:+ ($note)}, ${dt}s"
  if [ "$status" != passed ]; then
    tail -n 12 "$STAGE_LOG" | sed "s/^/    [$name] /"
  fi
  record "$name" "$status" "$dt" "$limit" "$note"
}

# ---- the stages --------------------------------------------------------------------------
BUILT='import sys, llada_ext as lx
info = getattr(lx, "build_info", None)
print("llada_ext", lx.__file__, "| CUDA kernels:", lx.has_cuda_kernels())
print(info() if info else "")
sys.exit(0 if lx.has_cuda_kernels() else 1)'
CUDA_READY='import sys, torch, llada_ext as lx
gpu, kernels = torch.cuda.is_available(), lx.has_cuda_kernels()
print(f"torch sees a GPU: {gpu}, llada_ext CUDA kernels: {kernels} ({lx.__file__})")
sys.exit(0 if gpu and kernels else 1)'
# cuda_ready: the stages after the build start with this check, so that "no GPU" or "no CUDA
# kernels" is the reason they give rather than a pile of failing tests.
cuda_ready() {
  run_cmd "$PY" -c "$CUDA_READY" && return
  local rc=$?
  STAGE_NOTE="$(tail -n1 "$STAGE_LOG" | sed 's/ (.*//')"
  return $rc
}

stage_preflight() {
  local bad=()
  [ "$DRIVER_OK" = no ] && bad+=("driver too old for the CUDA $TOOLKIT_CUDA runtime")
  if [ "$DRY" = 0 ]; then
    [ "$DRIVER_OK" = unknown ] && bad+=("$DRIVER_NOTE")
    [ "${TORCH_CUDA_AVAILABLE:-}" = yes ] || bad+=("torch ($PY) sees no CUDA device")
    [ -n "$NVCC" ] || bad+=("no nvcc")
    [ -n "$SAN" ] || echo "note: compute-sanitizer not found: memcheck and racecheck will be skipped"
  fi
  # Optional test packages carried as wheels (no network): installed one by one, so a missing
  # wheel does not block the others.
  if [ -d "$ROOT/.whl" ] && [ "$DRY" = 0 ]; then
    local pkg mod
    for pkg in pytest pytest-benchmark hypothesis safetensors tokenizers tqdm pybind11; do
      mod="${pkg//-/_}"
      "$PY" -c "import $mod" >/dev/null 2>&1 && continue
      run_cmd "$PY" -m pip install -q --no-index --find-links "$ROOT/.whl" "$pkg" ||
        echo "could not install $pkg from .whl/"
    done
  fi
  if [ "$DRY" = 0 ]; then
    local missing=() mod
    for mod in pytest pybind11 cmake ninja; do
      case "$mod" in
        cmake | ninja) command -v "$mod" >/dev/null 2>&1 || "$PY" -c "import $mod" >/dev/null 2>&1 ;;
        *) "$PY" -c "import $mod" >/dev/null 2>&1 ;;
      esac || missing+=("$mod")
    done
    ((${#missing[@]} == 0)) || bad+=("missing for the build or the tests: ${missing[*]}")
  fi
  run_cmd "$PY" -c "import sys; print('python', sys.version.split()[0])" || return
  if ((${#bad[@]})); then
    printf 'preflight: %s\n' "${bad[@]}"
    STAGE_NOTE="$(printf '%s; ' "${bad[@]}")"
    STAGE_NOTE="${STAGE_NOTE%; }"
    return 1
  fi
  echo "preflight: ok"
}

BUILD_DIR="build/gpu-check-sm${ARCHS//[;, ]/-}"
stage_build() {
  # A build folder per arch list: CMake caches CMAKE_CUDA_ARCHITECTURES and LLADA_EMU at the
  # first configure, so a folder reused with other settings would silently keep the old ones.
  # CUDACXX: CMake builds with the nvcc whose version the driver check compared.
  echo "CUDA archs $ARCHS ($ARCHS_FROM), $JOBS jobs, build folder $BUILD_DIR, no CPU executor"
  run_cmd env LLADA_CUDA=1 LLADA_EMU=0 LLADA_CUDA_ARCHS="$ARCHS" LLADA_BUILD_DIR="$BUILD_DIR" \
    LLADA_JOBS="$JOBS" PYTHON="$PY" ${NVCC:+CUDACXX="$NVCC"} bash scripts/dev_build.sh || return
  run_cmd "$PY" -c "$BUILT"
}

# The CUDA test files, and the [cuda] cases of the kernel tests that run on both devices.
CUDA_TEST_ARGS=()
for f in python_tests/test_cuda_*.py python_tests/test_attention.py \
  python_tests/test_masked_ce.py python_tests/test_remask.py python_tests/test_remask_selection.py; do
  [ -f "$f" ] && CUDA_TEST_ARGS+=("$f")
done
CUDA_TEST_ARGS+=(-k cuda)

stage_cuda_tests() {
  cuda_ready || return
  if validating; then run_now "$PY" -m pytest --collect-only -q -p no:cacheprovider "${CUDA_TEST_ARGS[@]}" || return; fi
  # No -x: every failure is listed. -ra names each failing and skipped test at the end.
  run_cmd "$PY" -m pytest -q -p no:cacheprovider -ra --junitxml="$RES/cuda_tests.xml" \
    "${CUDA_TEST_ARGS[@]}"
}

# Small cases that reach every kernel: attention forward and backward at each head-dim bucket
# (64, 128, 256) with partial tiles and MQA, GQA with Sq != Sk, fully masked rows, unaligned
# strides, masked keys holding NaN; masked CE scalar/misaligned, in-place gradient, weight-0
# rows; remask plain, CFG + threshold, a window wider than one block, ties, in place; the
# fused LM head + CE.
SAN_TESTS=(
  "python_tests/test_cuda_attention.py::test_forward_matches_reference[shape2-64-dtype1]"
  "python_tests/test_cuda_attention.py::test_forward_matches_reference[shape2-128-dtype1]"
  "python_tests/test_cuda_attention.py::test_forward_matches_reference[shape2-256-dtype1]"
  "python_tests/test_cuda_attention.py::test_backward_matches_reference[shape2-64-dtype1]"
  "python_tests/test_cuda_attention.py::test_backward_matches_reference[shape2-128-dtype1]"
  "python_tests/test_cuda_attention.py::test_backward_matches_reference[shape2-256-dtype1]"
  "python_tests/test_cuda_attention.py::test_backward_matches_reference[shape1-128-dtype0]"
  "python_tests/test_cuda_attention.py::test_fully_masked_rows[dtype1]"
  "python_tests/test_cuda_attention.py::test_unaligned_strides[dtype0]"
  "python_tests/test_cuda_attention.py::test_short_queries_long_keys[dtype1]"
  "python_tests/test_attention.py::test_masked_keys_are_never_read[cuda-bf16]"
  "python_tests/test_cuda_ce_remask.py::test_masked_ce_matches_float64[scalar-misaligned-dtype1]"
  "python_tests/test_cuda_ce_remask.py::test_masked_ce_inplace_gradient[dtype1]"
  "python_tests/test_cuda_ce_remask.py::test_masked_ce_weight_zero_rows_not_read[dtype0]"
  "python_tests/test_cuda_ce_remask.py::test_remask_matches_cpu[1001-0.7-low_confidence]"
  "python_tests/test_cuda_ce_remask.py::test_remask_cfg_threshold_matches_cpu[515-dtype1-1.3]"
  "python_tests/test_cuda_ce_remask.py::test_remask_wide_window_matches_cpu[1500-40]"
  "python_tests/test_cuda_ce_remask.py::test_remask_ties_lower_position_first"
  "python_tests/test_cuda_ce_remask.py::test_remask_inplace_matches_out_of_place"
  "python_tests/test_cuda_ce_remask.py::test_linear_masked_ce_cuda[7]"
)
SAN_COLLECTED=0

sanitizer_stage() {
  local tool="$1"
  if [ "$DRY" = 0 ] && [ -z "$SAN" ]; then
    STAGE_SKIP="compute-sanitizer not found"
    echo "$STAGE_SKIP"
    return 0
  fi
  cuda_ready || return
  if validating && ((SAN_COLLECTED == 0)); then
    run_now "$PY" -m pytest --collect-only -q -p no:cacheprovider "${SAN_TESTS[@]}" || return
    SAN_COLLECTED=1
  fi
  local opts=(--tool "$tool" --error-exitcode 1 --print-limit 50)
  # torch probes the runtime with calls that are allowed to fail; those are not our errors.
  if [ -n "$SAN" ] && "$SAN" --help 2>/dev/null | grep -q -- "--report-api-errors"; then
    opts+=(--report-api-errors no)
  fi
  # No caching allocator: every tensor is its own allocation, so an access past a tensor's
  # end is not hidden inside a pooled block.
  run_cmd env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN:-compute-sanitizer}" "${opts[@]}" \
    "$PY" -m pytest -q -p no:cacheprovider -ra "${SAN_TESTS[@]}"
  local rc=$?
  # The tool's own summary, in case an error did not reach the exit status.
  if grep -Eq "ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: .*\(([1-9][0-9]*) error" "$STAGE_LOG"; then
    echo "$tool reported errors (see above)"
    ((rc)) || rc=1
  fi
  return $rc
}
stage_memcheck() { sanitizer_stage memcheck; }
stage_racecheck() { sanitizer_stage racecheck; }

# has_flags SCRIPT FLAG...: the script's argument parser declares every FLAG (a dry-run
# validation; read from the source, which costs no torch import).
has_flags() {
  local script="$1" flag
  shift
  for flag in "$@"; do
    grep -q -- "\"$flag\"" "$script" || { echo "$script has no option $flag"; return 1; }
  done
  echo "$script takes $*"
}

stage_bench_attention() {
  cuda_ready || return
  # Half the default repetitions: 5 lengths x 4 implementations x forward + backward fit the
  # stage's half minute with the median still over 10 runs.
  if validating; then has_flags benchmarks/bench_attention_cuda.py --out-dir --iters --warmup || return; fi
  run_cmd "$PY" benchmarks/bench_attention_cuda.py --out-dir "$RES" --iters 10 --warmup 3
}

stage_bench_ce_remask() {
  cuda_ready || return
  # The full grid (B up to 32, W up to 1024) when there is time for it, else --quick.
  local quick=()
  ((STAGE_LIMIT >= 60)) || quick=(--quick)
  if validating; then has_flags benchmarks/bench_ce_remask_cuda.py --out --quick || return; fi
  run_cmd "$PY" benchmarks/bench_ce_remask_cuda.py --out "$RES" ${quick[@]+"${quick[@]}"}
}

# throughput.py options for a time limit: the full method list on the target lengths (prompt
# 512, answer 256) when there is time, then fewer methods (no HF baseline, no cache/graph
# variants beyond prefix), then short lengths. 1b dims keep the model build and warm-ups
# inside a few seconds; the 8b figures need their own call. Three interleaved rounds: every
# method of the point runs once per round, so each figure is a median with its spread and
# the ratios vs AR are paired per round.
throughput_args() {
  local limit="$1"
  local common=(--models 1b --batches 1 --ks 1 4 --repeats 3 --out "$RES" --verbose)
  if [ -n "${GPU_CHECK_THROUGHPUT_ARGS:-}" ]; then
    # shellcheck disable=SC2206 # word splitting of the user's option string is intended
    THROUGHPUT_ARGS=(${GPU_CHECK_THROUGHPUT_ARGS} --out "$RES")
    THROUGHPUT_TIER="GPU_CHECK_THROUGHPUT_ARGS"
  elif ((limit >= 240)); then
    THROUGHPUT_ARGS=("${common[@]}" --prompts 512 --gens 256)
    THROUGHPUT_TIER="full: every method, prompt 512, answer 256"
  elif ((limit >= 150)); then
    THROUGHPUT_ARGS=("${common[@]}" --prompts 512 --gens 256 --methods ar ar-eager
      diffusion-none diffusion-prefix diffusion-dual diffusion-prefix-graphs reference)
    THROUGHPUT_TIER="reduced: no HF baseline, graphs for prefix only, prompt 512, answer 256"
  else
    THROUGHPUT_ARGS=("${common[@]}" --prompts 128 --gens 64 --methods ar-eager
      diffusion-prefix diffusion-prefix-graphs reference)
    THROUGHPUT_TIER="short: prompt 128, answer 64, eager AR, prefix cache"
  fi
}

stage_throughput() {
  cuda_ready || return
  throughput_args "$STAGE_LIMIT"
  echo "throughput sized for ${STAGE_LIMIT}s: $THROUGHPUT_TIER"
  if validating; then
    run_now "$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import throughput
throughput.build_parser().parse_args(sys.argv[1:]); print("throughput options parse")' \
      "${THROUGHPUT_ARGS[@]}" || return
  fi
  run_cmd "$PY" benchmarks/throughput.py "${THROUGHPUT_ARGS[@]}" || return
  [ "$DRY" = 1 ] && return 0
  # throughput.py exits 0 when any point ran; a failed kernel path or CUDA graphs decoding
  # something else than the eager sampler fail the stage here. The HF baseline may fail on
  # a transformers version it does not know: reported, not a failure.
  "$PY" - "$RES" <<'EOF'
import glob
import json
import sys

files = sorted(glob.glob(f"{sys.argv[1]}/throughput_*_cuda.json"))
if not files:
    sys.exit("no throughput JSON was written")
recs = json.load(open(files[-1]))["records"]
bad = [
    r
    for r in recs
    if r["status"] != "ok" and r["method"] != "hf" and not r["status"].startswith("skipped")
]
bad += [r for r in recs if r.get("matches_eager_sampler") is False]
for r in bad:
    print(f"FAILED: {r['method']} k={r['tokens_per_step']}: {r.get('status')}", end="")
    print(" (CUDA graphs decode differently)" if r.get("matches_eager_sampler") is False else "")
print(f"{sum(r['status'] == 'ok' for r in recs)}/{len(recs)} points ok")
sys.exit(1 if bad else 0)
EOF
}

# ---- run ---------------------------------------------------------------------------------
for row in "${STAGE_TABLE[@]}"; do
  # shellcheck disable=SC2086 # the row is four words
  run_stage $row
done

# ---- summary -----------------------------------------------------------------------------
TOTAL=$((SECONDS - START))
HOST="$(hostname 2>/dev/null || echo unknown)"
CPUS="$(nproc)"
FAILED=0
grep -q "$(printf '\tfailed\t')" "$RECORDS" && FAILED=1
export GC_RES="$RES" GC_DRY="$DRY" GC_BUDGET="$BUDGET" GC_TOTAL="$TOTAL" GC_EXIT="$FAILED" \
  GC_COMMIT="$COMMIT" GC_DATE="$DATE" GC_GPU_NAME="${GPU_NAME:-${TORCH_DEVICE:-}}" \
  GC_GPU_CC="${GPU_CC:-${TORCH_CC:-}}" GC_GPU_MEM="$GPU_MEM" GC_DRIVER_VERSION="$DRIVER_VERSION" \
  GC_DRIVER_CUDA="$DRIVER_CUDA" GC_DRIVER_CUDA_FROM="$DRIVER_CUDA_FROM" \
  GC_DRIVER_CUDA_SMI="$DRIVER_CUDA_SMI" GC_DRIVER_CUDA_API="$DRIVER_CUDA_API" \
  GC_TORCH_DRIVER_CUDA="$TORCH_DRIVER_CUDA" GC_TOOLKIT_CUDA="$TOOLKIT_CUDA" \
  GC_TORCH="$TORCH_VERSION" GC_TORCH_CUDA="$TORCH_CUDA" GC_DRIVER_OK="$DRIVER_OK" \
  GC_DRIVER_NOTE="$DRIVER_NOTE" GC_ARCHS="$ARCHS" GC_PY="$PY" GC_PY_VERSION="$PY_VERSION" \
  GC_SAN="$SAN" GC_HOST="$HOST" GC_CPUS="$CPUS"
# Any python3 writes the summary (standard library only), also when $PY is broken.
SUMMARY_PY="$PY"
"$SUMMARY_PY" -c "" >/dev/null 2>&1 || SUMMARY_PY=python3
"$SUMMARY_PY" - <<'EOF'
import json
import os
from pathlib import Path

e = os.environ
res = Path(e["GC_RES"])
stages = []
for line in (res / "stages.tsv").read_text().splitlines():
    name, status, seconds, limit, note = line.split("\t")
    log = res / f"{name}.log"
    stages.append(
        {
            "name": name,
            "status": status,
            "seconds": int(seconds),
            "limit_s": int(limit),
            "note": note,
            "log": log.name if log.exists() else None,
        }
    )
summary = {
    "dry_run": e["GC_DRY"] == "1",
    "date": e["GC_DATE"],
    "commit": e["GC_COMMIT"],
    "device": {
        "name": e["GC_GPU_NAME"] or None,
        "compute_capability": e["GC_GPU_CC"] or None,
        "memory": e["GC_GPU_MEM"] or None,
        "host": e["GC_HOST"],
        "cpus": int(e["GC_CPUS"]),
    },
    "driver": {
        "version": e["GC_DRIVER_VERSION"] or None,
        "cuda": e["GC_DRIVER_CUDA"] or None,
        "cuda_from": e["GC_DRIVER_CUDA_FROM"] or None,
        "cuda_nvidia_smi": e["GC_DRIVER_CUDA_SMI"] or None,
        "cuda_cuDriverGetVersion": e["GC_DRIVER_CUDA_API"] or None,
        "cuda_torch": e["GC_TORCH_DRIVER_CUDA"] or None,
        "ok_for_runtime": e["GC_DRIVER_OK"],
        "note": e["GC_DRIVER_NOTE"],
    },
    "cuda": {
        "toolkit": e["GC_TOOLKIT_CUDA"] or None,
        "runtime_linked": (e["GC_TOOLKIT_CUDA"] + " (static)") if e["GC_TOOLKIT_CUDA"] else None,
        "torch": e["GC_TORCH_CUDA"] or None,
        "archs_built": e["GC_ARCHS"],
    },
    "torch": e["GC_TORCH"] or None,
    "python": {"path": e["GC_PY"], "version": e["GC_PY_VERSION"] or None},
    "compute_sanitizer": e["GC_SAN"] or None,
    "budget_s": int(e["GC_BUDGET"]),
    "total_s": int(e["GC_TOTAL"]),
    "stages": stages,
    "passed": e["GC_EXIT"] == "0",
    "exit_status": int(e["GC_EXIT"]),
}
(res / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

d, dr, cu = summary["device"], summary["driver"], summary["cuda"]
md = [
    "# GPU check" + (" (dry run: CPU stand-ins, nothing measured)" if summary["dry_run"] else ""),
    "",
    f"- device: {d['name'] or 'none found'} (compute capability {d['compute_capability'] or '?'}"
    f", {d['memory'] or '? memory'}), host {d['host']}, {d['cpus']} CPUs",
    f"- driver: {dr['version'] or 'unknown'}, supports CUDA {dr['cuda'] or '?'}"
    f" ({dr['cuda_from'] or 'not found'}); {dr['note']}",
    f"- CUDA: toolkit (nvcc) {cu['toolkit'] or 'not found'}, linked statically; torch built for "
    f"{cu['torch'] or '?'}; built for sm_{cu['archs_built']}",
    f"- torch {summary['torch'] or '?'}, python {summary['python']['version'] or '?'}",
    f"- commit `{summary['commit']}`, date {summary['date']}",
    f"- budget {summary['budget_s']} s, total {summary['total_s']} s; "
    + ("**passed**" if summary["passed"] else "**FAILED**"),
    "",
    "| stage | status | seconds | limit (s) | note |",
    "|---|---|---:|---:|---|",
]
for s in stages:
    note = s["note"].replace("|", "\\|")
    md.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s'] or ''} | {note} |")
(res / "summary.md").write_text("\n".join(md) + "\n")
EOF

echo
say "summary ($RES/summary.md, summary.json)"
printf '  %-16s %-8s %8s %8s  %s\n' stage status seconds limit note
while IFS=$'\t' read -r n st sec lim note; do
  [ "$lim" = 0 ] && lim=-
  printf '  %-16s %-8s %8s %8s  %s\n' "$n" "$st" "$sec" "$lim" "$note"
done <"$RECORDS"
say "total ${TOTAL}s of ${BUDGET}s; $([ "$FAILED" = 0 ] && echo 'everything that ran passed' || echo 'FAILED')"
if [ -n "$TAR" ]; then
  tar -C "$(dirname "$RES")" -czf "$TAR" "$(basename "$RES")" && say "packed into $TAR"
fi
exit "$FAILED"
