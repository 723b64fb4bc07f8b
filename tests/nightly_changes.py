"""What a night does to an archive, for the nightly-run tests: each change returns the
StudyInstanceUIDs it touched. ``archive["root"]`` holds ``main/``, a ``make_archive`` tree."""
from __future__ import annotations

import os
from pathlib import Path

import pydicom
from make_archive import make_archive


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
