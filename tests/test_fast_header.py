"""Differential tests: the fast header scanner against the pydicom reader, on real files.

Every file pydicom ships is read both ways. Where the scanner accepts a file, its ParsedHeader must
equal the pydicom reader's exactly (meta, record with decoded text in other character sets,
truncated flag); where it declines, header.read_header falls back to pydicom, so the results are
equal by construction -- the acceptance tests make sure that is not the usual case.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import os
import warnings

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from beam_pipeline.dicom import fast_header, fields, header

DATA = os.path.dirname(pydicom.data.__file__)
TEST_FILES = os.path.join(DATA, "test_files")


@pytest.fixture(autouse=True)
def _both_loops(element_loop):
    """Every test here runs with the compiled and with the pure-Python element loop."""


def _all_files() -> list[str]:
    paths = glob.glob(os.path.join(TEST_FILES, "**", "*"), recursive=True)
    paths += glob.glob(os.path.join(DATA, "charset_files", "*"))
    return sorted(p for p in paths if os.path.isfile(p))


FILES = _all_files()
from specs import CORE_SPEC, SPECS, WIDE_SPEC  # noqa: E402  (shared with the fuzz)


def reference_parse(source, spec: fields.FieldSpec) -> header.ParsedHeader:
    """header.parse_with_pydicom on a path or on bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, bytes):
            return header.parse_with_pydicom(io.BytesIO(source), spec)
        with open(source, "rb") as fp:
            return header.parse_with_pydicom(fp, spec)


def read(source, spec, use_fast: bool) -> header.HeaderResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, bytes):
            return header.read_header(io.BytesIO(source), spec, use_fast=use_fast)
        with open(source, "rb") as fp:
            return header.read_header(fp, spec, use_fast=use_fast)


def _has_preamble(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def without_notes(result: header.HeaderResult) -> header.HeaderResult:
    return dataclasses.replace(result, notes=())


def fast_parse(source, spec):
    """fast_header.parse as header.read_header calls it (None: declined or not a DICM file)."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = fp.read(header.FIRST_READ)
        if head[128:132] != b"DICM":
            return None
        return fast_header.parse(head, fp, spec)


def _name(path: str) -> str:
    return os.path.relpath(path, DATA)


# ---------------------------------------------------------------------------------------------
# Every shipped file, three specs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("path", FILES, ids=_name)
def test_same_result_as_pydicom(path, spec_name):
    spec = SPECS[spec_name]
    fast = read(path, spec, use_fast=True)
    slow = read(path, spec, use_fast=False)
    parsed = fast_parse(path, spec)
    if parsed is not None:
        assert parsed == reference_parse(path, spec)
        assert fast == header.classify(parsed)
    elif _has_preamble(path):
        assert len(fast.notes) == 1 and fast.notes[0].startswith("reader-fallback:")
    assert without_notes(fast) == slow


# Files the scanner must accept (explicit VR LE, encapsulated syntaxes, DICOMDIR, charsets).
MUST_ACCEPT = [
    "test_files/CT_small.dcm", "test_files/MR_small.dcm", "test_files/JPEG2000.dcm",
    "test_files/MR_small_RLE.dcm", "test_files/MR_small_jpeg_ls_lossless.dcm",
    "test_files/dicomdirtests/DICOMDIR", "test_files/dicomdirtests/77654033/CT2/17106",
    "test_files/dicomdirtests/98892003/MR700/4467", "test_files/test-SR.dcm",
    "charset_files/chrJapMulti.dcm", "charset_files/chrSQEncoding.dcm",
    "charset_files/chrSQEncoding1.dcm",
]
# Files it must decline: implicit VR, big endian, deflated, no transfer syntax, implicit VR
# dataset behind an explicit VR transfer syntax.
MUST_DECLINE = [
    "test_files/MR_small_implicit.dcm", "test_files/MR_small_bigendian.dcm",
    "test_files/image_dfl.dcm", "test_files/meta_missing_tsyntax.dcm",
    "test_files/SC_rgb_jpeg.dcm", "test_files/dicomdirtests/DICOMDIR-implicit",
]


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_fast_path_accepts_most_files(spec_name):
    spec = SPECS[spec_name]
    accepted = {_name(p) for p in FILES if fast_parse(p, spec) is not None}
    for name in MUST_ACCEPT:
        assert name in accepted
    for name in MUST_DECLINE:
        assert name not in accepted
    dicomdir_files = [p for p in FILES if "dicomdirtests" in p and os.path.basename(p).isdigit()]
    assert len(dicomdir_files) >= 30
    assert all(_name(p) in accepted for p in dicomdir_files)
    charset_files = [p for p in FILES if "charset_files" in p and p.endswith(".dcm")]
    assert all(_name(p) in accepted for p in charset_files)
    assert len(accepted) >= 150, len(accepted)  # of 194 files, 180 with a DICM preamble


def test_charset_text_is_decoded():
    """The charset files carry non-ASCII text outside PersonName; it must come out decoded."""
    history = {}
    for name in ("chrJapMulti.dcm", "chrJapMultiExplicitIR6.dcm", "chrKoreanMulti.dcm"):
        parsed = fast_parse(os.path.join(DATA, "charset_files", name), WIDE_SPEC)
        history[name] = parsed.record["AdditionalPatientHistory"]
    assert "\u5c71\u7530" not in history["chrKoreanMulti.dcm"]
    assert any(not text.isascii() for text in history.values())
    assert any(ord(ch) > 0x3000 for text in history.values() for ch in text)  # CJK, not mojibake


# ---------------------------------------------------------------------------------------------
# Synthetic files: sequence layouts and item character sets
# ---------------------------------------------------------------------------------------------


def _code(value: str, meaning: str, charset: str | None = None, undefined: bool = False) -> Dataset:
    item = Dataset()
    if charset:
        item.SpecificCharacterSet = charset
    item.CodeValue = value
    item.CodingSchemeDesignator = "99TEST"
    item.CodeMeaning = meaning
    item.is_undefined_length_sequence_item = undefined
    return item


def _put_sequence(ds: Dataset, keyword: str, items, undefined: bool) -> None:
    setattr(ds, keyword, Sequence(items))
    ds[keyword].is_undefined_length = undefined


def _write(ds: Dataset, pixel_bytes: int = 0) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if pixel_bytes:
        ds.Rows, ds.Columns, ds.BitsAllocated = 1024, pixel_bytes // 2048, 16
        ds.add_new(0x7FE00010, "OW", bytes(pixel_bytes))
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deliberately odd values
        ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return out.getvalue()


def _synthetic(undefined: bool) -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "2.25.1"
    ds.StudyInstanceUID = "2.25.2"
    ds.SeriesInstanceUID = "2.25.3"
    ds.InstitutionName = "Universitätsklinikum Köln"
    ds.StudyDescription = "Thorax \u00fcbersicht \u2013 nativ"
    # An unneeded sequence with nested sequences, before the needed ones.
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "2.25.9"
    _put_sequence(inner, "PurposeOfReferenceCodeSequence", [_code("1", "x", undefined=undefined)], undefined)
    inner.is_undefined_length_sequence_item = undefined
    _put_sequence(ds, "ReferencedStudySequence", [inner, Dataset()], undefined)
    _put_sequence(ds, "ProcedureCodeSequence", [
        _code("A", "Lungen\u00fcbersicht", undefined=undefined),                  # inherits UTF-8
        _code("B", "Abdomen \u00e4rztlich", charset="ISO_IR 100", undefined=undefined),  # own
        Dataset(),                                                           # empty: dropped
    ], undefined)
    _put_sequence(ds, "PerformedProcedureCodeSequence", [], undefined)       # empty: absent
    ds.SeriesNumber = 3
    ds.InstanceNumber = 7
    return _write(ds)


@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
def test_sequences_and_item_charsets(undefined):
    data = _synthetic(undefined)
    parsed = fast_parse(data, WIDE_SPEC)
    assert parsed is not None
    assert parsed.record["InstitutionName"] == "Universitätsklinikum Köln"
    assert parsed.record["ProcedureCodeSequence"] == (
        {"CodeValue": "A", "CodingSchemeDesignator": "99TEST", "CodeMeaning": "Lungen\u00fcbersicht"},
        {"CodeValue": "B", "CodingSchemeDesignator": "99TEST", "CodeMeaning": "Abdomen \u00e4rztlich"},
    )
    assert "PerformedProcedureCodeSequence" not in parsed.record
    marker = b"SQ\0\0\xff\xff\xff\xff"
    assert (marker in data) == undefined and (b"\xfe\xff\x00\xe0\xff\xff\xff\xff" in data) == undefined
    reference = reference_parse(data, WIDE_SPEC)
    assert parsed == reference
    assert read(data, WIDE_SPEC, use_fast=True) == header.classify(reference)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_odd_but_valid_encodings():
    """A needed element encoded as UN, private sequences (undefined length, nested), empty values."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "2.25.11"
    ds.AccessionNumber = ""
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    private = Dataset()
    private.add_new(0x00090010, "LO", "ACME 1.0")
    _put_sequence(private, "ProcedureCodeSequence", [_code("P", "private", undefined=True)], True)
    private.is_undefined_length_sequence_item = True
    ds.add_new(0x00091001, "SQ", Sequence([private, Dataset()]))
    ds[0x00091001].is_undefined_length = True
    ds.add_new(0x00091002, "OB", b"\x00" * 1000)
    ds.PatientID = "PAT\u00c4 1"                                    # re-encoded as UN below
    ds.StudyInstanceUID = "2.25.12"
    ds.SeriesInstanceUID = "2.25.13"
    ds.add_new(0x00200011, "IS", None)                              # SeriesNumber, empty
    ds.InstanceNumber = "12.0"
    ds.PixelSpacing = ["1.5", "2.5"]
    data = _write(ds).replace(b"1.5\\2.5 ", b"0.5\\x   ")             # PixelSpacing, unparseable
    data = data.replace(b"\x10\x00\x20\x00LO\x06\x00", b"\x10\x00\x20\x00UN\x00\x00\x06\x00\x00\x00")
    assert b"\x10\x00\x20\x00UN\x00\x00" in data and b"\x09\x00\x01\x10SQ\x00\x00\xff\xff\xff\xff" in data
    for spec in SPECS.values():
        parsed = fast_parse(data, spec)
        assert parsed is not None
        assert parsed == reference_parse(data, spec)
        assert parsed.record["PatientID"] == "PAT\u00c4 1"
        assert "SeriesNumber" not in parsed.record
    assert fast_parse(data, CORE_SPEC).record[fields.INVALID_KEY] == ("PixelSpacing",)


# ---------------------------------------------------------------------------------------------
# Truncated files
# ---------------------------------------------------------------------------------------------


def _stop_offset(data: bytes, spec) -> int:
    """Offset of the first top-level element after spec.last_tag (pixel data included), by pydicom."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
    for tag in ds.keys():
        if tag > spec.last_tag:
            elem = ds.get_item(tag)
            value_tell = elem.value_tell if hasattr(elem, "value_tell") else elem.file_tell
            return value_tell - (12 if elem.VR in ("OB", "OW", "SQ", "UN", "UT", "UC") else 8)
    return len(data)


def _charset_value_range(data: bytes) -> tuple[int, int]:
    """Cut lengths ending inside the top-level (0008,0005) value or the next element's header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=[0x00100020])
    elem = ds.get_item(0x00080005)
    if elem is None or not elem.value:
        return 0, 0
    start = data.index(b"\x08\x00\x05\x00CS") + 8
    return start, start + int.from_bytes(data[start - 2:start], "little") + 8


# (file, spec, step between cut lengths, least share of cuts the scanner classifies itself:
# cuts inside sequences go to pydicom, which raises there rather than reporting truncation)
def test_cut_inside_the_charset_value_is_truncated_for_both_readers():
    """pydicom converts the top-level (0008,0005) while reading and keeps no length; the pydicom
    reader reads the length back from the file, so a cut inside that value is seen by both."""
    with open(os.path.join(TEST_FILES, "CT_small.dcm"), "rb") as handle:
        data = handle.read()
    start, end = _charset_value_range(data)
    assert end - start > 8
    for cut in range(start, end):
        if cut == end - 8:
            continue  # the file ends right after the value: no reader can tell
        assert reference_parse(data[:cut], CORE_SPEC).truncated, cut
        assert fast_parse(data[:cut], CORE_SPEC).truncated, cut


TRUNCATION_CASES = [
    ("test_files/CT_small.dcm", "core", 1, 0.85),
    ("test_files/CT_small.dcm", "default", 3, 0.85),
    ("test_files/MR_small.dcm", "wide", 1, 0.75),
    ("charset_files/chrSQEncoding.dcm", "wide", 1, 0.1),
    ("test_files/dicomdirtests/77654033/CT2/17106", "wide", 3, 0.85),
    ("test_files/dicomdirtests/DICOMDIR", "wide", 97, 0.0),
]


@pytest.mark.parametrize("name,spec_name,step,min_share", TRUNCATION_CASES)
def test_truncated_copies_classify_the_same(name, spec_name, step, min_share):
    spec = SPECS[spec_name]
    with open(os.path.join(DATA, name), "rb") as handle:
        data = handle.read()
    stop = _stop_offset(data, spec)
    cuts = range(0, stop + 8, step)  # up to a complete header of the stop element
    classified_by_fast = 0
    for cut in cuts:
        copy = data[:cut]
        fast = read(copy, spec, use_fast=True)
        slow = read(copy, spec, use_fast=False)
        assert (fast.kind, fast.reason) == (slow.kind, slow.reason), cut
        parsed = fast_parse(copy, spec)
        if parsed is not None:
            classified_by_fast += 1
            assert fast == header.classify(parsed)
    dataset_cuts = len(range(132 + 200, stop + 8, step))  # past a typical file meta group
    assert classified_by_fast >= min_share * dataset_cuts, (classified_by_fast, dataset_cuts)


def test_cut_after_last_needed_tag_is_seen_as_pydicom_sees_it():
    """The scanner walks on to pixel data as pydicom does: a cut between the last needed tag and
    pixel data is classified as pydicom classifies it; a cut inside pixel data is seen by neither."""
    with open(os.path.join(TEST_FILES, "CT_small.dcm"), "rb") as handle:
        data = handle.read()
    stop = _stop_offset(data, CORE_SPEC)
    pixel_data = data.index(b"\xe0\x7f\x10\x00OW")
    assert pixel_data - stop > 100
    truncated = accepted = 0
    for cut in range(stop + 1, pixel_data + 12):
        fast, slow = read(data[:cut], CORE_SPEC, True), read(data[:cut], CORE_SPEC, False)
        assert (fast.kind, fast.reason) == (slow.kind, slow.reason), cut
        parsed = fast_parse(data[:cut], CORE_SPEC)
        if parsed is not None:  # declined: cut inside a 12-byte element header (pydicom raises)
            accepted += 1
            assert parsed.truncated == reference_parse(data[:cut], CORE_SPEC).truncated, cut
            truncated += parsed.truncated
    assert accepted > 0.9 * (pixel_data + 11 - stop)
    assert truncated > (pixel_data - stop) // 2
    for cut in (pixel_data + 12, pixel_data + 100, len(data) - 1):
        parsed = fast_parse(data[:cut], CORE_SPEC)
        assert parsed is not None and not parsed.truncated
        assert parsed == reference_parse(data[:cut], CORE_SPEC)


# ---------------------------------------------------------------------------------------------
# Large pixel data is never read
# ---------------------------------------------------------------------------------------------


class CountingReader(io.RawIOBase):
    """A real file, counting the bytes handed out by read()."""

    def __init__(self, path):
        self._file = open(path, "rb")
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, size=-1):
        data = self._file.read(size)
        self.bytes_read += len(data)
        return data

    def seek(self, offset, whence=io.SEEK_SET):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def close(self):
        self._file.close()
        super().close()


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_large_pixel_data_is_not_read(tmp_path, spec_name):
    spec = SPECS[spec_name]
    ds = pydicom.dcmread(os.path.join(TEST_FILES, "CT_small.dcm"), stop_before_pixels=True)
    for elem in list(ds):
        if elem.tag.is_private or elem.tag >= 0x7FE00000:
            del ds[elem.tag]
    path = tmp_path / "big.dcm"
    path.write_bytes(_write(ds, pixel_bytes=4 * 1024 * 1024))
    size = path.stat().st_size
    assert size > 4 * 1024 * 1024

    with CountingReader(path) as fp:
        head = fp.read(header.FIRST_READ)
        parsed = fast_header.parse(head, fp, spec)
        assert parsed is not None and not parsed.truncated
        assert fp.bytes_read <= 64 * 1024 < size // 50
    assert parsed == reference_parse(str(path), spec)

    with CountingReader(path) as fp:
        result = header.read_header(fp, spec)
        assert result.kind == header.INSTANCE
        assert fp.bytes_read <= 64 * 1024


@pytest.mark.parametrize("term", sorted(set(pydicom.charset.python_encoding) - {""}))
def test_ascii_text_decodes_as_pydicom_does_in_every_character_set(term):
    """Text values that are ASCII without an escape sequence skip pydicom's decoding: the result
    must be what pydicom gives in each character set DICOM defines (its 0x5C is the value
    separator in all of them)."""
    samples = [bytes(range(0x20, 0x7F)), b"ACC0001\\B ", b"Thorax nativ", b"\x1b$B", b"a\x1b(Jb", b""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of escape sequences and terms it does not know
        encodings = pydicom.charset.convert_encodings([term])
        for raw in samples:
            expected = pydicom.charset.decode_bytes(raw, encodings, pydicom.charset.TEXT_VR_DELIMS)
            assert fields._decode_text(raw, encodings) == expected, (term, raw)
    attr = fields.Attribute("AccessionNumber", 0x00080050, "SH", False)
    assert fields.decode_value(attr, b" ACC0001\0", encodings) == "ACC0001"
    multi = fields.Attribute("ImageType", 0x00080008, "CS", True)
    assert fields.decode_value(multi, b"ORIGINAL", encodings) == ("ORIGINAL",)
    assert fields.decode_value(multi, b"ORIGINAL\\ \\AXIAL ", encodings) == ("ORIGINAL", "AXIAL")
    number = fields.Attribute("SliceThickness", 0x00180050, "DS", False)
    assert fields.decode_value(number, b" 5.0 ", encodings) == 5.0
