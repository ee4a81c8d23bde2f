#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh                 # build pyops._C with -fsanitize=address,undefined, run the C++ tests
#   scripts/sanitize.sh -k conv         # extra arguments go to pytest; a -k narrows the
#                                       # default selection (pytest would let it replace it)
#
# Builds into build-sanitize/ (the normal install is untouched), assembles a pyops
# package there around the sanitized extension, and runs every test on the C++
# backend with libasan preloaded (python itself is not instrumented). Any ASan report
# or UBSan finding aborts the run with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY="${PYOPS_VENV:-.venv}/bin/python"
[ -x "$VPY" ] || scripts/setup_env.sh
OUT=build-sanitize
rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
PYOPS_SANITIZE=1 "$VPY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
cp -r pyops "$OUT/pkg/pyops"
rm -f "$OUT"/pkg/pyops/_C*.so
cp -r triton_kernels "$OUT/pkg/pyops/triton_kernels"
cp "$OUT"/lib/pyops/_C*.so "$OUT/pkg/pyops/"
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$PWD/$OUT/pkg"
# The C++ backend's cases (the Triton interpreter adds nothing here and is slow under ASan).
SELECT="not triton and not aot and not two_processes and not ddp and not compile"
ARGS=()
while [ $# -gt 0 ]; do
  if [ "$1" = "-k" ] && [ $# -gt 1 ]; then
    SELECT="($SELECT) and ($2)"
    shift 2
  else
    ARGS+=("$1")
    shift
  fi
done
LD_PRELOAD="$LIBASAN $LIBUBSAN" "$VPY" -P -c 'import sys; from pyops import _C; print("sanitized pyops._C from", _C.__file__); sys.exit(0 if "build-sanitize" in _C.__file__ else 1)'
LD_PRELOAD="$LIBASAN $LIBUBSAN" exec "$VPY" -P -m pytest tests -q -p no:cacheprovider -k "$SELECT" ${ARGS[@]+"${ARGS[@]}"}
