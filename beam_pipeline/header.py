"""Read one file's DICOM header into a plain record and classify the file.

The fast scanner (``fast_header``) handles the common layout; anything it declines is parsed by
pydicom, which stays the authority. Pixel data is never read: both stop at the last needed tag.
"""
from __future__ import annotations

import io
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from beam_pipeline.codes import INVALID_KEY, Reason
from beam_pipeline.fields import (
    DICOMDIR_SOP_CLASS, META_KEYWORDS, Attribute, FieldSpec, add_value, encodings_for,
)
from beam_pipeline.records import DICOMDIR, ERROR, INSTANCE, NOT_DICOM, HeaderResult, ParsedHeader

FIRST_READ = 16 * 1024  # one read covers the header of nearly every file; readers ask for more if not
_UNDEFINED = 0xFFFFFFFF
_REQUIRED_UIDS = (
    ("StudyInstanceUID", Reason.MISSING_STUDY_INSTANCE_UID),
    ("SeriesInstanceUID", Reason.MISSING_SERIES_INSTANCE_UID),
    ("SOPInstanceUID", Reason.MISSING_SOP_INSTANCE_UID),
    ("SOPClassUID", Reason.MISSING_SOP_CLASS_UID),
)


def read_header(fp: BinaryIO, spec: FieldSpec, use_fast: bool = True) -> HeaderResult:
    """Classify a file and extract its record. Never raises for bad content."""
    head = fp.read(FIRST_READ)
    if not head:
        return HeaderResult(ERROR, reason=Reason.EMPTY_FILE, detail="file has 0 bytes")
    has_preamble = head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_bare_dataset(head):
        return HeaderResult(NOT_DICOM)
    parsed = None
    if use_fast and has_preamble:
        from beam_pipeline import fast_header

        parsed = fast_header.parse(head, fp, spec)
        if parsed is not None and _lacks_identity(parsed):
            parsed = None  # e.g. an element out of order stopped the scanner early: pydicom decides
    try:
        if parsed is None:
            parsed = parse_with_pydicom(fp, spec, force=not has_preamble)
    except InvalidDicomError as exc:
        if has_preamble:
            return HeaderResult(ERROR, reason=Reason.UNREADABLE, detail=_describe(exc))
        return HeaderResult(NOT_DICOM)
    except Exception as exc:  # pydicom raises many types on corrupt input; the file is the problem
        return HeaderResult(ERROR, reason=Reason.UNREADABLE, detail=_describe(exc))
    return classify(parsed)


def classify(parsed: ParsedHeader) -> HeaderResult:
    if parsed.meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
        return HeaderResult(DICOMDIR)
    if parsed.truncated:
        return HeaderResult(ERROR, reason=Reason.TRUNCATED, detail="file ends inside the DICOM header")
    record = parsed.record
    if "SOPClassUID" not in record and parsed.meta.get("MediaStorageSOPClassUID"):
        record["SOPClassUID"] = parsed.meta["MediaStorageSOPClassUID"]
    for keyword, reason in _REQUIRED_UIDS:
        if keyword not in record:
            why = "is not a valid value" if keyword in record.get(INVALID_KEY, ()) else "is missing or empty"
            return HeaderResult(ERROR, reason=reason, detail=f"{keyword} {why}")
    return HeaderResult(INSTANCE, record=record)


def _lacks_identity(parsed: ParsedHeader) -> bool:
    if parsed.truncated or parsed.meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
        return False
    return any(keyword not in parsed.record for keyword, _ in _REQUIRED_UIDS[:3])


def _looks_like_bare_dataset(head: bytes) -> bool:
    """True for DICOM without the 128-byte preamble: it starts with a group 0002 or 0008 tag."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and element < 0x0100


def _describe(exc: Exception) -> str:
    """Exception type and message, shortened; pydicom messages name tags and offsets, not values."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def parse_with_pydicom(fp: BinaryIO, spec: FieldSpec, force: bool = False) -> ParsedHeader:
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    fp.seek(0)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
    meta = {}
    for keyword in META_KEYWORDS:
        value = ds.file_meta.get(keyword) if ds.file_meta is not None else None
        if value:
            meta[keyword] = str(value).strip("\0 ")
    stopped_before_end = fp.tell() < size
    encodings = encodings_for(_charset_bytes(ds), None)
    record = _record(ds, spec.attributes, encodings)
    truncated = _ends_inside_header(ds, size, stopped_before_end)
    return ParsedHeader(meta, record, truncated)


def _record(ds, attributes: tuple[Attribute, ...], encodings: list[str]) -> dict:
    record: dict = {}
    for attr in attributes:
        elem = ds.get_item(attr.tag)
        if elem is None:
            continue
        if attr.vr == "SQ":
            items = []
            for item in ds[attr.tag].value or ():
                item_encodings = encodings_for(_charset_bytes(item), encodings)
                item_record = _record(item, attr.items, item_encodings)
                if item_record:
                    items.append(item_record)
            if items:
                record[attr.keyword] = tuple(items)
            continue
        raw = _raw_bytes(elem)
        if raw:
            little = elem.is_little_endian if isinstance(elem, RawDataElement) else True
            add_value(record, attr, raw, encodings, little)
    return record


def _charset_bytes(ds) -> bytes | None:
    """(0008,0005) as raw bytes; pydicom may already have converted it while reading."""
    elem = ds.get_item(0x00080005)
    if elem is None or isinstance(elem.value, bytes) or elem.value is None:
        return _raw_bytes(elem)
    values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
    return "\\".join(values).encode("ascii", "replace")


def _raw_bytes(elem) -> bytes | None:
    if elem is None:
        return None
    value = elem.value
    return value if isinstance(value, bytes) else None


def _ends_inside_header(ds, size: int, stopped_before_end: bool) -> bool:
    """pydicom returns a partial dataset for a cut-off file; detect it from element lengths."""
    if len(ds) == 0:
        return True
    last_end = 0
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED:
            continue
        if elem.value is not None and len(elem.value) < elem.length:
            return True
        last_end = max(last_end, elem.value_tell + elem.length)
    return not stopped_before_end and 0 < last_end < size and size - last_end < 12
