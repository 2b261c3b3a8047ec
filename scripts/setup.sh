#!/usr/bin/env bash
# Set-up shared by the README's commands: a virtual environment in .venv (reusing a torch
# that the system Python already has), the Python dependencies and an editable build of the
# extension. Idempotent: a second run only rebuilds what changed.
#
#   LLADA_CUDA=0|1   CPU-only / require CUDA kernels (default: CUDA whenever nvcc is found)
#   LLADA_VENV=dir   virtual environment to use (default .venv)
#   LLADA_TEST_EXTRAS=1  also install the test suite's extras (scripts/test.sh sets it)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLADA_VENV:-.venv}"
PY_SYS="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY_SYS" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.13.0"
  pip_q "torch==2.13.0"
fi
need=()
# wheel: the editable build below runs without build isolation, and the setuptools of a fresh
# Python 3.11 venv needs it for bdist_wheel
for spec in numpy safetensors tokenizers tqdm pybind11 wheel scipy_openblas32:scipy-openblas32 ml_dtypes:ml-dtypes \
            matplotlib pytest pytest_benchmark:pytest-benchmark hypothesis; do
  mod="${spec%%:*}"; pkg="${spec#*:}"
  "$PY" -c "import $mod" >/dev/null 2>&1 || need+=("$pkg")
done
for tool in ninja cmake ruff clang-format; do
  [ -x "$VENV/bin/$tool" ] || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]}"
  pip_q "${need[@]}"
fi
# The test command also installs what its tests compare against or integrate with: the
# Hugging Face LLaDA modeling code's dependencies (transformers 4.46.3, as the published model
# pins it, and einops) and lm-evaluation-harness. pip may move tokenizers to the release
# transformers pins; the project works with either.
if [ "${LLADA_TEST_EXTRAS:-0}" = 1 ]; then
  extras=()
  "$PY" -c "import transformers, sys; sys.exit(transformers.__version__ != '4.46.3')" \
    >/dev/null 2>&1 || extras+=("transformers==4.46.3")
  "$PY" -c "import einops" >/dev/null 2>&1 || extras+=(einops)
  "$PY" -c "import lm_eval" >/dev/null 2>&1 || extras+=("lm_eval==0.4.13")
  if [ ${#extras[@]} -gt 0 ]; then
    echo "[setup] installing test extras: ${extras[*]}"
    pip_q "${extras[@]}"
  fi
fi
# CuTe's layout headers (the nvidia-cutlass wheel, headers only: no dependencies) are the
# independent source the executor's tensor-core lane maps are checked against.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)" \
    >/dev/null 2>&1; then
  echo "[setup] installing nvidia-cutlass (headers)"
  pip_q --no-deps "nvidia-cutlass==4.2.0.0"
fi
export PATH="$(cd "$VENV/bin" && pwd):$PATH"
echo "[setup] building the extension (LLADA_CUDA=${LLADA_CUDA:-auto})"
LLADA_JOBS="${LLADA_JOBS:-$(nproc)}" pip_q --no-build-isolation --no-deps -e .
"$PY" -c "import llada_ext as lx; print('[setup] llada_ext ready, CUDA kernels:', lx.has_cuda_kernels())"
