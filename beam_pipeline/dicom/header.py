"""Read one file's DICOM header into a plain record and classify the file.

The fast scanner (``fast_header``) handles the common layout; anything it declines is parsed by
pydicom, which stays the authority. Pixel data is never read: both stop before it, and both work
within a budget per header (``header_io``), so no single file can cost unbounded memory or time.
"""
from __future__ import annotations

import dataclasses
import io
import re
from typing import BinaryIO

import pydicom
from pydicom import filereader
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from beam_pipeline.codes import DOSE_REPORT_KEY, INVALID_KEY, Reason, SourceUnavailable
from beam_pipeline.dicom import dose_report, fast_header
from beam_pipeline.dicom.fields import (
    DICOMDIR_SOP_CLASS,
    META_KEYWORDS,
    Attribute,
    FieldSpec,
    add_value,
    encodings_for,
)
from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES, BoundedReader, Budget, HeaderTooLarge, InflatedStream
from beam_pipeline.dicom.records import DICOMDIR, ERROR, INSTANCE, NOT_DICOM, DoseReport, HeaderResult, ParsedHeader

FIRST_READ = 16 * 1024  # one read covers the header of nearly every file; readers ask for more if not
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
DEFER_SIZE = 1024 * 1024  # pydicom seeks over larger values instead of reading them
_DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode()
_REQUIRED_UIDS = (
    ("StudyInstanceUID", Reason.MISSING_STUDY_INSTANCE_UID),
    ("SeriesInstanceUID", Reason.MISSING_SERIES_INSTANCE_UID),
    ("SOPInstanceUID", Reason.MISSING_SOP_INSTANCE_UID),
    ("SOPClassUID", Reason.MISSING_SOP_CLASS_UID),
)


def read_header(fp: BinaryIO, spec: FieldSpec, use_fast: bool = True,
                max_header_bytes: int = MAX_HEADER_BYTES) -> HeaderResult:
    """Classify a file and extract its record. Never raises for bad content.

    Each reader gets a budget of ``max_header_bytes`` (see ``header_io``); a header that needs more
    is an error ``header-too-large``. When the fast scanner leaves a file with a preamble to pydicom,
    ``notes`` says why (``reader-fallback:<cause>``).
    """
    head = fp.read(FIRST_READ)
    if not head:
        return HeaderResult(ERROR, reason=Reason.EMPTY_FILE, detail="file has 0 bytes")
    has_preamble = head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_bare_dataset(head):
        return HeaderResult(NOT_DICOM)
    fp.seek(0, io.SEEK_END)
    size = fp.tell()  # (not seek's return value: some file objects return None)
    fp.seek(len(head))
    parsed = None
    notes: tuple[str, ...] = ()
    try:
        if use_fast and has_preamble:
            budget = Budget(max_header_bytes)
            budget.charge(len(head))
            scanned = fast_header.scan(head, fp, spec, size, budget)
            if isinstance(scanned, fast_header.Declined):
                notes = (f"reader-fallback:{scanned.cause}",)
            else:
                parsed = scanned
        if parsed is None:
            parsed = parse_with_pydicom(fp, spec, force=not has_preamble,
                                        max_header_bytes=max_header_bytes, size=size, head=head)
    except HeaderTooLarge as exc:
        return HeaderResult(ERROR, reason=Reason.HEADER_TOO_LARGE, detail=str(exc), notes=notes)
    except InvalidDicomError as exc:
        if has_preamble:
            return HeaderResult(ERROR, reason=Reason.UNREADABLE, detail=describe_error(exc), notes=notes)
        return HeaderResult(NOT_DICOM)
    except SourceUnavailable:
        raise  # the storage, not the file: the caller makes it an `unavailable` error line
    except Exception as exc:  # pydicom raises many types on corrupt input; the file is the problem
        return HeaderResult(ERROR, reason=Reason.UNREADABLE, detail=describe_error(exc), notes=notes)
    result = classify(parsed)
    if result.kind == INSTANCE and spec.dose_concepts and dose_report.is_dose_report(result.record):
        result.record[DOSE_REPORT_KEY] = read_dose_report(fp, spec, not has_preamble, max_header_bytes, size)
    return dataclasses.replace(result, notes=notes) if notes else result


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


def _looks_like_bare_dataset(head: bytes) -> bool:
    """True for DICOM without the 128-byte preamble: it starts with a group 0002 or 0008 tag."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and element < 0x0100


# Known pydicom/struct/zlib messages, in words (details must not quote header bytes or values).
_KNOWN_ERRORS = (
    (re.compile(r"unpack requires a buffer|unpack_from requires a buffer"),
     "an element header is cut short"),
    (re.compile(r"even multiple of bytes per value"),
     "a binary value's length is not a multiple of its value size"),
    (re.compile(r"missing DICOM File Meta Information|'DICM' prefix"),
     "no DICOM file meta information (preamble and 'DICM' prefix)"),
    (re.compile(r"incomplete or truncated stream|end before the end of the compressed stream"),
     "the deflated data are cut short"),
    (re.compile(r"while decompressing data|invalid (stored block|block type|distance|code)"),
     "the deflated data are corrupt"),
    (re.compile(r"[Ee]xpected explicit VR|[Ee]xpected implicit VR"),
     "the VR encoding changes inside the dataset"),
    (re.compile(r"sequence delimiter|Sequence Delimiter|item tag|Item Tag|[Ii]tem \(FFFE"),
     "the item structure of a sequence is broken"),
    (re.compile(r"codec can't decode|decode byte"),
     "a text value is not valid in its character set"),
    (re.compile(r"[Ii]nvalid value for VR|Value exceeds|is not a valid"),
     "a value is not valid for its VR"),
)
# Quoted strings and bytes reprs (b'\xce\x00...'), however they are quoted.
_QUOTED = re.compile(r"""(?<!\w)b?'(?:[^'\\]|\\.)*'(?!\w)|(?<!\w)b?"(?:[^"\\]|\\.)*"(?!\w)|(?<!\w)b['"].*""")


def describe_error(exc: BaseException) -> str:
    """What was wrong with a file, in words: known messages mapped, anything quoted left out."""
    message = str(exc)
    for pattern, words in _KNOWN_ERRORS:
        if pattern.search(message):
            return f"{type(exc).__name__}: {words}"
    message = _QUOTED.sub("(value)", message)
    message = "".join(ch if ch.isprintable() else "?" for ch in message)
    return f"{type(exc).__name__}: {message[:200]}" if message else type(exc).__name__


def parse_with_pydicom(fp: BinaryIO, spec: FieldSpec, force: bool = False,
                       max_header_bytes: int = MAX_HEADER_BYTES, size: int | None = None,
                       head: bytes | None = None) -> ParsedHeader:
    """pydicom's reading of a header (the authority), within a budget.

    pydicom reads through a :class:`BoundedReader`, defers values above 1 MiB (it seeks over them
    and reads one only if the spec needs it) and, for a deflated transfer syntax, reads an
    :class:`InflatedStream` instead of inflating the whole file as ``dcmread`` would.
    """
    ds, reader, stopped_before_end, size = _pydicom_dataset(fp, force, max_header_bytes, size, head)
    meta = {}
    for keyword in META_KEYWORDS:
        value = ds.file_meta.get(keyword) if ds.file_meta is not None else None
        if value:
            meta[keyword] = str(value).strip("\0 ")
    if _ends_inside_header(ds, size, stopped_before_end, reader):
        return ParsedHeader(meta, {}, True)
    encodings = encodings_for(_charset_bytes(ds), None)
    # The top-level (0008,0005) decodes the rest but is not recorded (see fast_header).
    attributes = tuple(a for a in spec.attributes if a.tag != _CHARSET)
    return ParsedHeader(meta, _record(ds, attributes, encodings), False)


def _pydicom_dataset(fp: BinaryIO, force: bool, max_header_bytes: int, size: int | None, head: bytes | None):
    """(dataset up to pixel data, the stream it was read from, whether reading stopped before the
    end, the size of the data) for ``parse_with_pydicom`` and the dose report reader."""
    if size is None:
        fp.seek(0, io.SEEK_END)
        size = fp.tell()
    fp.seek(0)
    budget = Budget(max_header_bytes)
    reader = BoundedReader(fp, size, budget)
    if head is None:
        head = reader.read(FIRST_READ)
        reader.seek(0)
    inflated = _open_deflated(reader, force, budget) if _DEFLATED_UID in head else None
    if inflated is None:
        ds = pydicom.dcmread(reader, stop_before_pixels=True, force=force, defer_size=DEFER_SIZE)
        stopped_before_end = reader.tell() < size
    else:
        ds, stream = inflated
        reader = stream
        stopped_before_end = not stream.at_end()
        size = stream.size() if not stopped_before_end else size
    return ds, reader, stopped_before_end, size


def read_dose_report(fp: BinaryIO, spec: FieldSpec, force: bool = False,
                     max_header_bytes: int = MAX_HEADER_BYTES, size: int | None = None) -> DoseReport:
    """The dose values of an X-Ray Radiation Dose SR file, read by pydicom within the header budget
    (these files are small and carry no pixel data). Never raises: problems are in the report."""
    try:
        ds = _pydicom_dataset(fp, force, max_header_bytes, size, None)[0]
    except HeaderTooLarge:
        return DoseReport(problems=(dose_report.TOO_LARGE,))
    except Exception:  # the header was read already; only the content tree is at stake
        return DoseReport(problems=(dose_report.UNREADABLE,))
    return dose_report.read_report(ds, spec.dose_concepts)


def _open_deflated(reader: BoundedReader, force: bool, budget: Budget):
    """For a deflated file, (dataset, stream) read as ``dcmread`` does but inflating on demand.

    Called when the head of the file holds the deflated syntax's UID; None for every other file
    (``dcmread`` reads those). Mirrors ``pydicom.filereader.read_partial`` for this one transfer
    syntax (with its private helpers), the stream in place of ``zlib.decompress(fp.read())``.
    """
    filereader.read_preamble(reader, force)
    file_meta = filereader._read_file_meta_info(reader)
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        reader.seek(0)
        return None
    command_set = filereader._read_command_set_elements(reader)
    if not reader.read(1):  # nothing after the meta: dcmread reads an empty dataset
        reader.seek(0)
        return None
    reader.seek(-1, io.SEEK_CUR)
    stream = InflatedStream(reader, reader.tell(), budget)
    ds = filereader.read_dataset(stream, False, True, stop_when=filereader._at_pixel_data)
    ds.file_meta = file_meta
    if command_set:
        ds.update(command_set)
    return ds, stream


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


def _ends_inside_header(ds, size: int, stopped_before_end: bool, source: BinaryIO) -> bool:
    """pydicom returns a partial dataset for a cut-off file; detect it from element lengths."""
    if len(ds) == 0:
        return True
    last_end = 0
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        if tag == _CHARSET and not isinstance(elem, RawDataElement):
            elem = _charset_as_read(ds, elem, source)
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED:
            continue
        if elem.value is not None and len(elem.value) < elem.length:
            return True
        if elem.value is None and elem.value_tell + elem.length > size:
            return True  # a deferred value (never read) runs past the end of the file
        last_end = max(last_end, elem.value_tell + elem.length)
    return not stopped_before_end and 0 < last_end < size and size - last_end < 12


def _charset_as_read(ds, elem, source: BinaryIO) -> RawDataElement | None:
    """(0008,0005) as a raw element with its length read back from the file (pydicom converts it
    while reading and keeps no length), so a file cut inside its value is seen as truncated."""
    implicit, little = ds.original_encoding
    width = 4 if implicit or elem.VR in EXPLICIT_VR_LENGTH_32 else 2
    try:
        source.seek(elem.file_tell - width)
        raw = source.read(width)
        length = int.from_bytes(raw, "little" if little else "big")
        source.seek(elem.file_tell)
        value = source.read(min(length, DEFER_SIZE))
    except OSError:  # e.g. too far back in inflated data: judge by the other elements
        return None
    if len(raw) < width:
        return None
    return RawDataElement(elem.tag, elem.VR, length, value, elem.file_tell, implicit, little)
