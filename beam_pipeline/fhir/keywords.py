"""The DICOM attributes the mapping reads, per level: the readers get them as data (a FieldSpec).

The header readers know nothing of FHIR; the mapping (the core elements here, the MII extension
table in ``mii``) says which keywords it needs, and ``header_spec`` turns them into what the
readers take.
"""
from __future__ import annotations

from beam_pipeline.codes import DOSE_REPORT_KEY
from beam_pipeline.dicom.fields import FieldSpec, build_spec
from beam_pipeline.fhir import dose, mii

# The converter's own needs (identifiers, references, core ImagingStudy/Device elements).
CORE_KEYWORDS = {
    "study": (
        "StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "StudyTime",
        "TimezoneOffsetFromUTC", "StudyDescription",
    ),
    "series": (
        "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "SeriesDate",
        "SeriesTime", "BodyPartExamined", "Laterality", "ImageLaterality",
        "DeviceSerialNumber", "Manufacturer", "ManufacturerModelName",
    ),
    "instance": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}


def header_spec() -> FieldSpec:
    """Core keywords plus everything the MII extension mapping reads, and the dose report concepts."""
    return build_spec([*CORE_KEYWORDS.values(), *mii.KEYWORDS.values()], mii.SEQUENCE_ITEM_KEYWORDS,
                      dose.READ_CONCEPTS)


def instance_keys() -> tuple[str, ...]:
    """Per-instance fields a StudyGroup keeps (core plus MII instance extensions, and the values of
    a dose report: only dose reports have them)."""
    return tuple(dict.fromkeys(CORE_KEYWORDS["instance"] + tuple(mii.KEYWORDS["instance"]) + (DOSE_REPORT_KEY,)))
