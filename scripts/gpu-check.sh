#!/usr/bin/env bash
# The GPU check (issue 15): step overhead on CUDA, a search + export + eval per method, and the same
# search on CUDA and on the CPU. One results file: benchmarks/results/gpu-check.md (and .json).
#   bash scripts/gpu-check.sh                                          # on a GPU machine, < 8 min
#   bash scripts/gpu-check.sh --device cpu --size 32 --search-size 32  # the same checks on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_check.py "$@"
