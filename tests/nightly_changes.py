"""What a night does to an archive, for the nightly-run tests: each change returns the
StudyInstanceUIDs it touched. ``archive["root"]`` holds ``main/``, a ``make_archive`` tree.
Also how a nightly run's output is compared with a full run's."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
from helpers import read_ndjson
from make_archive import make_archive

from beam_pipeline.codes import sha256_id
from beam_pipeline.fhir.config import DEFAULT_STUDY_ID_SYSTEM



def touch_later(path: Path) -> None:
    """A rewritten file's modification time moves on even on a coarse clock."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 2_000_000_000))


def add_series(archive: dict) -> list[str]:
    """Two new instances in a new series of the first study (as a PACS adds a late series)."""
    first = sorted((archive["root"] / "main").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".77"
    added = []
    for number in (1, 2):
        ds.SOPInstanceUID = ds.SeriesInstanceUID + f".{number}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        target = first.parent.parent / "late-series" / f"{number}.dcm"
        target.parent.mkdir(exist_ok=True)
        ds.save_as(target, enforce_file_format=False)
        added.append(str(target))
    return [ds.StudyInstanceUID]


def new_study(archive: dict) -> list[str]:
    made = make_archive(archive["root"] / "new", studies=1, series=1, instances=3, seed=7)
    return made["study_uids"]


def changed_file(archive: dict) -> list[str]:
    """A corrected description in the first instance of a series (which the series takes it from)."""
    path = sorted((archive["root"] / "main").rglob("*.dcm"))[4]
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "corrected description"
    ds.save_as(path, enforce_file_format=False)
    touch_later(path)
    return [ds.StudyInstanceUID]


def deleted_file(archive: dict) -> list[str]:
    path = sorted((archive["root"] / "main").rglob("*.dcm"))[9]
    uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    path.unlink()
    return [uid]


# ---------------------------------------------------------------------------------------------
# Comparing outputs

VOLATILE = {"_report/summary.json", "manifest.json"}  # the run's time


def files_of(out: Path) -> dict[str, bytes]:
    """Every file of a run's output but its delta, by relative path."""
    found = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out).as_posix()
        if path.is_file() and not relative.startswith("_delta/"):
            found[relative] = path.read_bytes()
    return found


def assert_same_snapshot(incremental: Path, full: Path) -> None:
    mine, theirs = files_of(incremental), files_of(full)
    assert sorted(mine) == sorted(theirs)
    for relative in sorted(set(mine) - VOLATILE):
        assert mine[relative] == theirs[relative], f"{relative} differs from the full run's"
    manifests = [json.loads(mine["manifest.json"]), json.loads(theirs["manifest.json"])]
    for manifest in manifests:
        manifest.pop("transactionTime"), manifest.pop("request")  # when, and the command line
    assert manifests[0] == manifests[1]
    summaries = [json.loads(mine["_report/summary.json"]), json.loads(theirs["_report/summary.json"])]
    for summary in summaries:
        for key in ("seconds", "instances_per_second", "incremental"):
            summary.pop(key, None)
    assert summaries[0] == summaries[1]


def study_key(uid: str) -> str:
    return "ImagingStudy/" + sha256_id(DEFAULT_STUDY_ID_SYSTEM, uid)


def deletions(out: Path) -> list[str]:
    bundle = json.loads((out / "_delta" / "deletions.json").read_text())
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    return [entry["request"]["url"] for entry in bundle.get("entry", [])]


def delta_keys(out: Path, resource_type: str) -> list[str]:
    return sorted(f"{r['resourceType']}/{r['id']}" for r in read_ndjson(out, "_delta/" + resource_type))
