#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test extras into it. Sourced by the
# run/test scripts so a fresh clone needs nothing but python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import beam_pipeline, terminologies, apache_beam, pydicom, fhir.resources, pytest" 2>/dev/null \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.installed" ]; then
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  touch "$VENV/.installed"
fi
PY="$VENV/bin/python"
