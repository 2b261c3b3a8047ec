#!/usr/bin/env bash
# Incremental in-place build of the extension for development: configures build/dev with
# CMake + ninja and places _C and libllada_kernels next to llada_ext/__init__.py.
# CPU-only unless LLADA_CUDA=1 (CUDA kernels too; LLADA_CUDA_ARCHS="90" narrows the targets).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(pwd)/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export LLADA_CUDA="${LLADA_CUDA:-0}"
BUILD="${LLADA_BUILD_DIR:-build/dev-cuda$LLADA_CUDA}"
exec 9>"/tmp/llada_build_$(id -u).lock"
flock 9
cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" \
  -DLLADA_PYTHON_OUTPUT_DIR="$(pwd)/llada_ext" >/dev/null
cmake --build "$BUILD" -j "${LLADA_JOBS:-2}"
