#!/usr/bin/env bash
# Creates .venv (once) and installs the locked, tested versions into it: every package of
# locks/all.txt (runtime, test, bench, docs and dask extras, each with its hashes), then this project
# itself without dependencies (editable). Sourced by run_local.sh, run_tests.sh, .ci/run and the
# benchmarks' instructions, so a fresh clone needs nothing but python3. scripts/refresh_lock.sh moves the lock.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
LOCK="${LOCK:-$ROOT/locks/all.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Python 3.11 or newer is needed as python3 (found $(python3 --version 2>&1))" >&2; exit 1; }
  python3 -m venv "$VENV" \
    || { echo "python3 cannot create a virtualenv (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import beam_pipeline, terminologies, apache_beam, pydicom, fhir.resources, dicomweb_client, pytest, xdist, importlinter, mkdocs, distributed" 2>/dev/null \
   || [ "$LOCK" -nt "$VENV/.installed" ] \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.installed" ] || [ "$ROOT/setup.py" -nt "$VENV/.installed" ] \
   || [ "$ROOT/beam_pipeline/dicom/_walk.c" -nt "$VENV/.installed" ]; then  # (re)builds the compiled loop
  "$VENV/bin/python" -m pip install -q --require-hashes -r "$LOCK"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  "$VENV/bin/python" -m pip check >/dev/null \
    || { "$VENV/bin/python" -m pip check >&2; echo "the installed versions do not fit together (above): pyproject.toml and locks/all.txt disagree; scripts/refresh_lock.sh re-resolves the lock" >&2; exit 1; }
  touch "$VENV/.installed"
fi
PY="$VENV/bin/python"
