"""The output folder's layout: the name and place of every file a run writes (names only, no I/O).

Resource files ``<Type>-SSSSS-of-NNNNN.ndjson`` and ``manifest.json`` at the top, which is what a
bulk loader takes; transaction Bundles in ``bundles/``; the report (``summary.json``, errors as
plain JSON lines and as OperationOutcome NDJSON) in ``_report/``; progress beacons in a hidden
``.progress-<run>`` folder while the run lasts. The run's state (what a later ``--since`` run reuses)
in ``_state/``; what changed since that previous run in ``_delta/``.
"""
from __future__ import annotations

# The run's report (summary, error lines) lies in a subfolder of the output folder, so that a loader
# that takes every ``*.ndjson`` of the folder finds resources only.
REPORT_DIR = "_report"
SUMMARY_NAME = REPORT_DIR + "/summary.json"

ERRORS_NAME = "errors"                  # plain JSON error lines (reason, path/study_uid, detail)
OUTCOMES_NAME = "OperationOutcome"      # the same errors as FHIR, for the manifest's ``error``
BUNDLE_NAME = "Bundle"
BUNDLES_DIR = "bundles"
MANIFEST_NAME = "manifest.json"
# name -> (folder relative to the output folder, file suffix); resource types: top level, .ndjson.
STATE_DIR = "_state"
STATE_HEADER_NAME = STATE_DIR + "/state.json"  # format, version, options, input root, its shards
SOURCE_STATE_NAME = "sources"   # one line per input file (or DICOMweb study): stamp, records, outcome
STUDY_STATE_NAME = "studies"    # one line per study: digest of its records, its lines and counts
SINK_STATE_NAME = "fhir-server"  # one line per study: what the FHIR server has of it (--fhir-server)
DELTA_DIR = "_delta"
DELTA_PREFIX = DELTA_DIR + "/"  # names of delta files: "_delta/<Type>"
DELETIONS_NAME = DELTA_DIR + "/deletions.json"  # one transaction Bundle of DELETEs
DELTA_MANIFEST_NAME = DELTA_DIR + "/manifest.json"
PLACES = {
    BUNDLE_NAME: (BUNDLES_DIR, ".ndjson"),
    OUTCOMES_NAME: (REPORT_DIR, ".ndjson"),
    ERRORS_NAME: (REPORT_DIR, ".jsonl"),  # not FHIR: a suffix no ``*.ndjson`` loader takes
    SOURCE_STATE_NAME: (STATE_DIR, ".jsonl"),
    STUDY_STATE_NAME: (STATE_DIR, ".jsonl"),
    SINK_STATE_NAME: (STATE_DIR, ".jsonl"),
}
SUBFOLDERS = tuple(sorted({folder for folder, _ in PLACES.values()} | {DELTA_DIR}))
# Where earlier versions wrote the report: removed too, or a loader would still find them.
LEGACY_NAMES = (ERRORS_NAME + "-*-of-*.ndjson", "summary.json")

PROGRESS_PREFIX = ".progress-"
