#!/usr/bin/env bash
# Set everything up (scripts/setup_env.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
# -P keeps the checkout off sys.path, so the tests import the installed pyops.
exec "${PYOPS_VENV:-.venv}/bin/python" -P -m pytest tests -q "$@"
