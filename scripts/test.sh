#!/usr/bin/env bash
# The test command: set-up, lint (ruff, clang-format), then the full pytest suite.
# With nvcc on the machine the CUDA kernels are compiled too (a compile check without a GPU;
# the CUDA tests run when a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
LLADA_TEST_EXTRAS=1 bash scripts/setup.sh
VENV="${LLADA_VENV:-.venv}"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"
echo "[test] ruff"
ruff check .
ruff format --check .
echo "[test] clang-format"
find csrc $( [ -d examples ] && echo examples ) -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.c' \
  | xargs clang-format --dry-run --Werror
# Sleeping (not spinning) OpenMP workers: torch and the kernels share one libgomp, and the
# multi-process tests would otherwise oversubscribe the cores.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
echo "[test] pytest"
python -m pytest python_tests -q "$@"
