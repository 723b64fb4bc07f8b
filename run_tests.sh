#!/usr/bin/env bash
# Set up (virtualenv + install) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "$ROOT/scripts/ensure_venv.sh"
cd "$ROOT"
"$PY" -m pytest -q "$@"
