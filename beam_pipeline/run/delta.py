"""What changed since the previous run, as a FHIR server that holds that run's snapshot needs it.

Changed and new resources go to ``_delta/<Type>-*.ndjson`` (loaded as the snapshot is: bulk import
or PUT by id); resources of the previous snapshot that this one no longer has (the studies that
lost all their files, what a rebuilt study no longer builds, Devices no studies reference) go to
one transaction Bundle of DELETEs, ``_delta/deletions.json``, to POST after the changed resources.
"""
from __future__ import annotations

import orjson

from beam_pipeline.codes import SHARED_TYPES
from beam_pipeline.run.layout import BUNDLE_NAME, DELTA_PREFIX


def resource_key(line: str) -> str:
    """``Type/id`` of a resource line."""
    resource = orjson.loads(line)
    return f"{resource['resourceType']}/{resource['id']}"


def _by_key(outcome) -> dict[str, tuple[str, str]]:
    """key -> (resource type, line) of a study's own resources (not its transaction Bundle)."""
    if outcome is None:
        return {}
    return {resource_key(line): (name, line) for name, lines in outcome.lines.items() if name != BUNDLE_NAME
            for line in lines}


def study_changes(before, now) -> tuple[list[tuple[str, str]], list[str]]:
    """Delta lines (``_delta/<Type>``, line) and deleted keys of one study, from its previous and
    current ``StudyOutcome`` (None: absent, or rejected and so without lines)."""
    previous, current = _by_key(before), _by_key(now)
    changed = [(DELTA_PREFIX + name, line) for key, (name, line) in sorted(current.items())
               if previous.get(key, (None, None))[1] != line]
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
