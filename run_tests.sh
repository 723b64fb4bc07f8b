#!/usr/bin/env bash
# Set up (the locked virtualenv, the Java test servers, the Beam engines: every step that needs no
# root) and run the test suite over the machine's cores. Extra arguments go to pytest, e.g.
#   ./run_tests.sh tests/test_docs.py        ./run_tests.sh -n 0 (one process)     ./run_tests.sh -p random_order --random-order
# The last line names every skipped component and what to install for it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "$ROOT/scripts/ensure_venv.sh"
cd "$ROOT"
source "$ROOT/scripts/prepare_tests.sh"
"$PY" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadscope "$@"
