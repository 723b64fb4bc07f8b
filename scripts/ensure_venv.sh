#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test extras into it. Sourced by the
# run/test scripts so a fresh clone needs nothing but python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Python 3.11 or newer is needed as python3 (found $(python3 --version 2>&1))" >&2; exit 1; }
  python3 -m venv "$VENV" \
    || { echo "python3 cannot create a virtualenv (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import beam_pipeline, terminologies, apache_beam, pydicom, fhir.resources, dicomweb_client, pytest, importlinter, mkdocs" 2>/dev/null \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.installed" ] || [ "$ROOT/setup.py" -nt "$VENV/.installed" ] \
   || [ "$ROOT/beam_pipeline/dicom/_walk.c" -nt "$VENV/.installed" ]; then  # (re)builds the compiled loop
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,docs]"
  touch "$VENV/.installed"
fi
PY="$VENV/bin/python"
