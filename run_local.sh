#!/usr/bin/env bash
# Set up (virtualenv + install) and convert the bundled sample data on the local runner.
# Sample data: the DICOM files pydicom ships (several patients and studies, plus DICOMDIRs,
# files that are not DICOM and a truncated file, as in a real archive).
# Usage: ./run_local.sh [OUTPUT_DIR] [more pipeline or Beam options]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "$ROOT/scripts/ensure_venv.sh"
OUT="${1:-$ROOT/output}"
shift || true
SAMPLE="$("$PY" -c 'import os, pydicom.data; print(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files"))')"
"$PY" -m beam_pipeline --input "$SAMPLE" --output "$OUT" "$@"
echo "Output in $OUT: $(ls "$OUT" | tr '\n' ' ')"
