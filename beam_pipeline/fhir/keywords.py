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
        "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "IssuerOfAccessionNumberSequence",
    ),
    "series": (
        "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "SeriesDate",
        "SeriesTime", "BodyPartExamined", "Laterality", "ImageLaterality",
        "DeviceSerialNumber", "Manufacturer", "ManufacturerModelName",
    ),
    "instance": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}

# Items read from the core sequences (the HL7v2 Hierarchic Designator macro, PS3.3 Table 10-17).
CORE_SEQUENCE_ITEM_KEYWORDS = {
    "IssuerOfPatientIDQualifiersSequence": ("UniversalEntityID", "UniversalEntityIDType"),
    "IssuerOfAccessionNumberSequence": ("LocalNamespaceEntityID", "UniversalEntityID", "UniversalEntityIDType"),
}


def sequence_item_keywords() -> dict[str, tuple[str, ...]]:
    """Per sequence, the item keywords the core mapping and the MII table read."""
    items = {name: set(children) for name, children in mii.SEQUENCE_ITEM_KEYWORDS.items()}
    for name, children in CORE_SEQUENCE_ITEM_KEYWORDS.items():
        items.setdefault(name, set()).update(children)
    return {name: tuple(sorted(children)) for name, children in sorted(items.items())}


def header_spec() -> FieldSpec:
    """Core keywords plus everything the MII extension mapping reads, and the dose report concepts."""
    return build_spec([*CORE_KEYWORDS.values(), *mii.KEYWORDS.values()], sequence_item_keywords(),
                      dose.READ_CONCEPTS)


def instance_keys() -> tuple[str, ...]:
    """Per-instance fields a StudyGroup keeps (core plus MII instance extensions, and the values of
    a dose report: only dose reports have them)."""
    return tuple(dict.fromkeys(CORE_KEYWORDS["instance"] + tuple(mii.KEYWORDS["instance"]) + (DOSE_REPORT_KEY,)))
