#!/usr/bin/env bash
# The main job: set-up, then train the tiny model on the built-in corpus, sample from it and
# report accuracy and kernels-vs-torch throughput (llada-ext demo --help for options).
# Without a GPU the build skips the CUDA kernels to keep the set-up short.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LLADA_CUDA:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export LLADA_CUDA=0
fi
bash scripts/setup.sh
VENV="${LLADA_VENV:-.venv}"
# the main job retrains its run folder (runs/demo) each time it is run
exec "$VENV/bin/llada-ext" demo --overwrite "$@"
