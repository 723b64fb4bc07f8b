"""``summary.json`` from the counts the pipeline computed as data (never from Beam metrics).

Count keys: ``files_matched``, ``instances_read``, ``outcome:<Outcome>``, ``error:<Reason>``,
``note:<kind>:<what>``, ``lines:<ResourceType>``, ``studies_written``, ``studies_rejected``, and
per source extras (e.g. ``dicomweb:studies_listed``).
"""
from __future__ import annotations

import json
from collections import Counter

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.codes import RESOURCE_TYPES, Outcome
from beam_pipeline.run.layout import SUMMARY_NAME


def summarize(counts: Counter, seconds: float) -> dict:
    def prefixed(prefix):
        return {k[len(prefix):]: v for k, v in sorted(counts.items()) if k.startswith(prefix) and v}

    outcomes = {str(name): counts.get(f"outcome:{name}", 0) for name in Outcome}
    converted = outcomes[Outcome.CONVERTED]
    summary = {
        "files_matched": counts.get("files_matched", 0),
        "outcomes": outcomes,
        "studies": {"written": counts.get("studies_written", 0), "rejected": counts.get("studies_rejected", 0)},
        "resources": {name: counts.get(f"lines:{name}", 0) for name in RESOURCE_TYPES},
        "errors_by_reason": prefixed("error:"),
        "notes": prefixed("note:"),
    }
    sources = prefixed("dicomweb:")
    if sources:
        summary["dicomweb"] = sources
    sink = prefixed("fhir_server:")
    if sink:  # --fhir-server: what the server was sent and what it made of it
        summary["fhir_server"] = sink
    incremental = prefixed("incremental:")
    if incremental:  # a --since run: what it read and rebuilt (the rest of the summary is the snapshot's)
        summary["incremental"] = incremental
    summary["seconds"] = round(seconds, 3)
    summary["instances_per_second"] = round(converted / seconds, 1) if seconds > 0 else None
    return summary


def accounted(summary: dict) -> bool:
    """Every matched file has exactly one outcome."""
    return sum(summary["outcomes"].values()) == summary["files_matched"]


def read_summary(output_dir: str) -> dict:
    with FileSystems.open(FileSystems.join(output_dir, SUMMARY_NAME)) as handle:
        return json.loads(handle.read())


def describe(summary: dict) -> str:
    """A short human-readable report (counts only: no identifiers)."""
    outcomes = summary["outcomes"]
    lines = [
        f"files matched: {summary['files_matched']} (accounted for: {sum(outcomes.values())})",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()),
        f"studies written: {summary['studies']['written']}, rejected: {summary['studies']['rejected']}",
        "resources: " + ", ".join(f"{k} {v}" for k, v in summary["resources"].items()),
    ]
    for section in ("dicomweb", "incremental", "fhir_server"):
        if summary.get(section):
            lines.append(f"{section}: " + ", ".join(f"{k} {v}" for k, v in summary[section].items()))
    if summary["errors_by_reason"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in summary["errors_by_reason"].items()))
    if summary["notes"]:
        lines.append("notes: " + ", ".join(f"{k} {v}" for k, v in summary["notes"].items()))
    lines.append(f"{summary['seconds']} s, {summary['instances_per_second']} instances/s")
    return "\n".join(lines)
