#!/usr/bin/env bash
# On a machine with a CUDA GPU and torch + triton already installed (e.g. the lent H100):
# build pyops, run the whole test suite on CUDA tensors, compile every kernel ahead of
# time, and run the benchmarks against torch/cuDNN; everything goes to OUT_DIR.
#   scripts/gpu_check.sh [OUT_DIR]      (default: gpu_out/)
# No network is needed: it installs nothing but pyops itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
{
  echo "== environment"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT_DIR/environment.txt"

echo "== build" | tee "$OUT_DIR/build.log"
"$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -q . >>"$OUT_DIR/build.log" 2>&1 \
  || { echo "build failed (see $OUT_DIR/build.log)"; tail -40 "$OUT_DIR/build.log"; exit 1; }

echo "== tests (CUDA tensors on the Triton backend, CPU tensors on C++)"
"$PY" -P -m pytest tests -q -rfE --junitxml="$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
"$PY" -P benchmarks/run.py --out "$OUT_DIR/bench" 2>&1 | tee "$OUT_DIR/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
