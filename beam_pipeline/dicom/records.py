"""What reading one file yields: its kind, and the plain record of its header.

Shared by both header readers (``fast_header``, ``header``) and by the DICOMweb source, so that
none imports another for its types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# Kinds of reading one file.
INSTANCE, NOT_DICOM, DICOMDIR, ERROR = "instance", "not_dicom", "dicomdir", "error"


@dataclass(frozen=True)
class ParsedHeader:
    """What a reader found: file meta values, the dataset record, and whether the file ended early."""

    meta: dict
    record: dict
    truncated: bool


@dataclass(frozen=True)
class HeaderResult:
    kind: str
    record: dict | None = None
    reason: str | None = None
    detail: str | None = None
    notes: tuple[str, ...] = ()  # counted in summary.json notes, e.g. why the fast reader declined


class DoseItem(NamedTuple):
    """One value of a radiation dose report (NUM or DATETIME content item), as written.

    Plain strings only (no None), so records stay comparable and picklable: ``""`` means absent.
    """

    concept: str      # DCM code value of the item's concept name, e.g. "113813"
    value: str        # NumericValue or DateTime as written (first value, padding stripped)
    unit: str         # code value of its MeasurementUnitsCodeSequence (NUM only)
    unit_scheme: str  # that unit's CodingSchemeDesignator ("UCUM" in a conforming report)
    container: str    # DCM concept of the CONTAINER the item is in (e.g. "113811", "113829")
    event: str        # Irradiation Event UID (113769) of the enclosing event container, if any
    plane: str        # Acquisition Plane (113764) code of the enclosing container, if any


class DoseReport(NamedTuple):
    """The dose values of an X-Ray Radiation Dose SR, read from its content tree (no FHIR here)."""

    procedure: tuple[str, str, str] = ("", "", "")  # 121058 Procedure reported: scheme, code, meaning
    items: tuple[DoseItem, ...] = ()
    problems: tuple[str, ...] = ()  # how the tree departs from the templates (the mapping notes them)
