"""What changed since the previous run, as a FHIR server that holds that run's snapshot needs it.

Changed and new resources go to ``_delta/<Type>-*.ndjson`` (loaded as the snapshot is: bulk import
or PUT by id); resources of the previous snapshot that this one no longer has (the studies that
lost all their files, what a rebuilt study no longer builds, Devices no studies reference) go to
one transaction Bundle of DELETEs, ``_delta/deletions.json``, to POST after the changed resources.
"""
from __future__ import annotations

from beam_pipeline.codes import SHARED_TYPES
from beam_pipeline.run.layout import BUNDLE_NAME, DELTA_PREFIX
from beam_pipeline.run.state import line_hash, line_key


def study_changes(before: dict | None, now) -> tuple[list[tuple[str, str]], list[str]]:
    """Delta lines (``_delta/<Type>``, line) and deleted keys of one study, from what the previous
    run's state keeps of its lines (``StudyEntry.hashes()``: resource type -> [(key, line hash)])
    and its current ``StudyOutcome`` (None: absent, or rejected and so without lines)."""
    previous = {key: digest for name, pairs in (before or {}).items() if name != BUNDLE_NAME
                for key, digest in pairs}
    current = {} if now is None else {line_key(line): (name, line) for name, lines in now.lines.items()
                                      if name != BUNDLE_NAME for line in lines}
    changed = [(DELTA_PREFIX + name, line) for key, (name, line) in sorted(current.items())
               if previous.get(key) != line_hash(line)]
    deleted = sorted(set(previous) - set(current))
    if (changed or deleted) and now is not None:
        changed += [(DELTA_PREFIX + BUNDLE_NAME, line) for line in now.lines.get(BUNDLE_NAME, ())]
    return changed, deleted


def shared_change(key: str, before: list[str], now: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The delta of one shared resource (Device, Patient, ...) from its line in the previous and
    current snapshot (at most one each): written anew when new or changed, deleted when no study
    builds it any more."""
    resource_type = key.split("/", 1)[0]
    assert resource_type in SHARED_TYPES, key
    if not now:
        return [], [key] if before else []
    if before and before[0] == now[0]:
        return [], []
    return [(DELTA_PREFIX + resource_type, now[0])], []


def deletions_bundle(keys) -> dict:
    """One transaction Bundle deleting ``keys`` (sorted; a server checks references once the whole
    transaction is done, so the order of studies and Devices does not matter)."""
    bundle = {"resourceType": "Bundle", "type": "transaction"}
    entries = [{"request": {"method": "DELETE", "url": key}} for key in sorted(set(keys))]
    if entries:
        bundle["entry"] = entries
    return bundle
