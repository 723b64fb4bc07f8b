"""What reading one file yields: its kind, and the plain record of its header.

Shared by both header readers (``fast_header``, ``header``) and by the DICOMweb source, so that
none imports another for its types.
"""
from __future__ import annotations

from dataclasses import dataclass

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
