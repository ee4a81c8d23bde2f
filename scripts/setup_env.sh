#!/usr/bin/env bash
# Set up a virtual environment with torch, triton, the test and benchmark tools, and
# pyops itself (built from this checkout). Idempotent: re-running refreshes pyops.
#   PYTHON=python3.12 scripts/setup_env.sh      # another interpreter (>= 3.11)
#   PYOPS_VENV=/path/to/venv scripts/setup_env.sh
#   PYOPS_TORCH=torch==2.14.1 scripts/setup_env.sh   # another torch, if no torch is installed yet
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PYOPS_VENV:-.venv}

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pyops needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first and explicitly: an unpinned `torch` would pull a multi-GB CUDA build
# where a CPU wheel is at hand. A torch that is already there is kept.
"$VPY" -c 'import torch' 2>/dev/null || pip_install "${PYOPS_TORCH:-torch==2.13.0}"
pip_install "triton>=3.6,<3.10" ninja "setuptools>=64" wheel pytest hypothesis numpy tqdm matplotlib
# --no-build-isolation: build against the torch above (an isolated build downloads one).
pip_install --no-build-isolation .
echo "pyops environment ready: $VENV ($("$VPY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")'))"
