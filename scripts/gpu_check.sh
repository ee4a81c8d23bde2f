#!/usr/bin/env bash
# On a machine with a CUDA GPU and torch + triton already installed (e.g. the lent H100/H200):
# build pyops, run the whole test suite on CUDA tensors (pytest-xdist workers when it is
# there), run the benchmarks against torch/cuDNN and compute-sanitizer memcheck over the
# Triton tests, each stage under a time cap so a short lease still brings results back.
#
#   scripts/gpu_check.sh [OUT_DIR] [STAGES]     (default: gpu_out/ build,bench,tests)
#
# STAGES is a comma list of build, bench, tests, sanitize, run in that order (the
# benchmark first: its results are what a short lease must bring back). Caps in seconds:
# BENCH_S (240), TESTS_S (220), SANITIZE_S (150). BENCH_SUITES: the suites, in order
# (default "conv pooling batchnorm elementwise model"); BENCH_ARGS: more run.py arguments;
# PYTEST_ARGS: the tests stage's paths and options (default tests); SANITIZE_K: the -k of
# the sanitize stage. Raw logs and results go to a work folder;
# OUT_DIR receives two files: summary.txt and gpu_check.tar.gz (everything), so the
# device tool's few-files limit brings all of it back. No network is needed.
#
# A 15-minute lease, two calls (the machine's start takes one to two minutes):
#   run(timeout_s=580): scripts/gpu_check.sh $OUT build,bench,tests   (build ~1-2 min)
#   run(timeout_s=200): SANITIZE_S=170 scripts/gpu_check.sh $OUT sanitize   (at once, while warm;
#                       or BENCH_SUITES="..." ... bench for suites the first call's cap cut)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_out}
STAGES=",${2:-build,bench,tests},"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SUMMARY="$WORK/summary.txt"
status=0
has_stage() { [[ "$STAGES" == *",$1,"* ]]; }
note() { echo "$*" | tee -a "$SUMMARY"; }

finish() {
  cp "$SUMMARY" "$OUT_DIR/summary.txt"
  tar czf "$OUT_DIR/gpu_check.tar.gz" -C "$WORK" . 2>/dev/null
  echo "== results: $OUT_DIR/summary.txt, $OUT_DIR/gpu_check.tar.gz (work folder $WORK)"
}
trap finish EXIT

note "== environment ($(date -u +%FT%TZ), commit ${PYOPS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)})"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
  nproc
} 2>&1 | tee -a "$SUMMARY"

if has_stage build; then
  note "== build"
  start=$(date +%s)
  if MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -q . \
      >"$WORK/build.log" 2>&1; then
    note "built in $(( $(date +%s) - start )) s"
  else
    note "build failed:"; tail -40 "$WORK/build.log" | tee -a "$SUMMARY"; exit 1
  fi
fi

if has_stage bench; then
  note "== benchmarks against torch (cuDNN), cap ${BENCH_S:=240} s: ${BENCH_SUITES:-conv pooling batchnorm elementwise model}"
  start=$(date +%s)
  # Each suite writes its JSON rows when it ends, so a run stopped at the cap keeps the suites it finished.
  # shellcheck disable=SC2086
  only=()
  for suite in ${BENCH_SUITES:-conv pooling batchnorm elementwise model}; do only+=(--only "$suite"); done
  timeout -s INT -k 20 "$BENCH_S" "$PY" -P benchmarks/run.py --out "$WORK/bench" "${only[@]}" ${BENCH_ARGS:-} \
      >"$WORK/bench.log" 2>"$WORK/bench.err"
  rc=$?
  note "benchmarks: rc $rc in $(( $(date +%s) - start )) s$([ $rc -eq 124 ] && echo ' (cap reached: later suites missing)')"
  cat "$WORK/bench.log" >>"$SUMMARY"
  tail -5 "$WORK/bench.err" | tee -a "$SUMMARY"
  # The report (summary of geometric means, table, plots) from the suites that finished.
  if ls "$WORK"/bench/*.json >/dev/null 2>&1 && "$PY" -P benchmarks/report.py "$WORK/bench" >>"$WORK/bench.err" 2>&1; then
    awk '/^## Summary/ {p = 1; print; next} /^## / {p = 0} p' "$WORK/bench/report.md" | tee -a "$SUMMARY"
  fi
  [ $rc -eq 0 ] || status=1
fi

if has_stage tests; then
  note "== tests (CUDA tensors on the Triton backend, CPU tensors on C++), cap ${TESTS_S:=220} s"
  args=(-P -m pytest -q -rfE -p no:cacheprovider --junitxml="$WORK/tests.xml")
  if "$PY" -c 'import xdist' 2>/dev/null; then
    args+=(-n "${TEST_WORKERS:-8}")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  fi
  "$PY" -c 'import pytest_timeout' 2>/dev/null && args+=(--timeout 240)
  start=$(date +%s)
  # SIGINT first: pytest then stops and still prints its summary of what ran.
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "$TESTS_S" "$PY" "${args[@]}" ${PYTEST_ARGS:-tests} >"$WORK/tests.log" 2>&1
  rc=$?
  note "tests: rc $rc in $(( $(date +%s) - start )) s$([ $rc -eq 124 ] && echo ' (cap reached: the run is partial)')"
  grep -E "^(FAILED|ERROR)|passed|failed" "$WORK/tests.log" | tail -60 | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || status=1
fi

if has_stage sanitize && ! command -v compute-sanitizer >/dev/null; then
  note "== sanitize: no compute-sanitizer on this machine"; status=1
elif has_stage sanitize; then
  note "== compute-sanitizer memcheck over the Triton CUDA tests, cap ${SANITIZE_S:=150} s"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "$SANITIZE_S" compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
      "$PY" -P -m pytest tests/test_sigmoid.py tests/test_dropout.py tests/test_pooling.py tests/test_batchnorm.py \
      tests/test_conv.py -q -p no:cacheprovider -k "${SANITIZE_K:-triton-cuda}" >"$WORK/sanitize.log" 2>&1
  rc=$?
  note "sanitize: rc $rc in $(( $(date +%s) - start )) s$([ $rc -eq 124 ] && echo ' (cap reached: partial)')"
  grep -E "ERROR SUMMARY|Invalid|out of bounds|passed|failed" "$WORK/sanitize.log" | tail -30 | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || status=1
fi
exit $status
