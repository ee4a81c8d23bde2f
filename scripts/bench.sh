#!/usr/bin/env bash
# Set everything up (scripts/setup_env.sh) and run the benchmark suite: Triton vs torch
# on a CUDA machine, else C++ vs ATen on the CPU. Extra arguments go to benchmarks/run.py
# (--full, --threads N, --out DIR, --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec "${PYOPS_VENV:-.venv}/bin/python" -P benchmarks/run.py "$@"
