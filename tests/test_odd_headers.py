"""One odd file costs one error line at most, never the memory or the time of a run (issue 7).

Each case is generated (big files sparse or streamed; see ``odd_files``) and read by both readers
(the fast scanner with its pydicom fallback, and pydicom alone); the big ones in a child process,
so that its peak RSS can be bounded.
"""
from __future__ import annotations

import io
import os
import re
import warnings
import zlib

import pydicom
import pytest
from odd_files import (
    CT,
    TEST_FILES,
    GiB,
    MiB,
    deflate_bomb,
    encode,
    odd_dataset,
    private_element_before_needed,
    read_in_child,
    zeros_after_preamble,
)
from pydicom.uid import DeflatedExplicitVRLittleEndian

from beam_pipeline.codes import Reason
from beam_pipeline.dicom import fields, header
from beam_pipeline.dicom.header_io import Budget, HeaderTooLarge, InflatedStream
from beam_pipeline.dicom.records import ERROR, INSTANCE
from beam_pipeline.fhir import keywords

SPEC = keywords.header_spec()
READERS = ("fast", "pydicom")
RSS_LIMIT_MIB = 1024
# What one odd header may add to a reader process: the header budget (64 MiB) read into memory at
# most twice over, plus buffers. The interpreter with its imports is measured separately.
HEADER_GROWTH_MIB = 192


@pytest.fixture(scope="module")
def baseline_rss() -> float:
    """Peak RSS of the same child process reading a small, ordinary file."""
    from helpers import pydicom_file

    return read_in_child(pydicom_file("CT_small.dcm"), "fast")["max_rss_mib"]


def read(data: bytes, use_fast: bool = True, **kwargs) -> header.HeaderResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return header.read_header(io.BytesIO(data), SPEC, use_fast=use_fast, **kwargs)


def full_pydicom_record(path) -> dict:
    """The record from an unbounded ``pydicom.dcmread`` of the whole file (the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    return header._record(ds, SPEC.attributes, fields.encodings_for(header._charset_bytes(ds), None))


# ---------------------------------------------------------------------------------------------
# Item 2: deflated transfer syntax, inflated only as far as the header goes
# ---------------------------------------------------------------------------------------------


def _deflated_copy(path) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("use_fast", [True, False], ids=["fast", "pydicom"])
def test_deflated_files_read_as_pydicom_reads_them(use_fast, tmp_path):
    path = os.path.join(TEST_FILES, "image_dfl.dcm")
    with open(path, "rb") as fp:
        result = header.read_header(fp, SPEC, use_fast=use_fast)
    assert result.kind == INSTANCE
    assert result.record == full_pydicom_record(path)
    assert result.notes == (("reader-fallback:deflated",) if use_fast else ())

    copy = tmp_path / "ct_deflated.dcm"
    copy.write_bytes(_deflated_copy(CT))
    assert DeflatedExplicitVRLittleEndian.encode() in copy.read_bytes()[:400]
    with open(copy, "rb") as fp:
        result = header.read_header(fp, SPEC, use_fast=use_fast)
    assert result.kind == INSTANCE
    assert result.record == full_pydicom_record(copy) == full_pydicom_record(CT)


def test_cut_deflated_data_is_an_error_in_words():
    data = _deflated_copy(CT)
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    for cut in (meta_end + 40, meta_end + 300):
        result = read(data[:cut])
        assert (result.kind, result.reason) == (ERROR, Reason.UNREADABLE)
        assert result.detail == "error: the deflated data are cut short"
    corrupt = data[:meta_end + 20] + bytes(b ^ 0x5A for b in data[meta_end + 20:meta_end + 60]) + data[meta_end + 60:]
    result = read(corrupt)
    assert result.kind == ERROR and "b'" not in result.detail and "\\x" not in result.detail


def test_inflated_stream_keeps_little_and_charges_what_it_inflates():
    raw = bytes(range(256)) * 4096  # 1 MiB
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = compressor.compress(raw) + compressor.flush()
    budget = Budget(8 * MiB)
    source = io.BytesIO(b"x" * 10 + packed)
    source.seek(10)
    stream = InflatedStream(source, 10, budget)  # positions go on from the offset
    assert stream.read(4) == raw[:4]
    stream.seek(10 + 700_000)
    assert stream.read(3) == raw[700_000:700_003]
    stream.seek(-3, io.SEEK_CUR)  # short rewinds work
    assert stream.read(3) == raw[700_000:700_003]
    assert len(stream._buffer) < 600 * 1024  # what lies far behind is dropped
    with pytest.raises(OSError):
        stream.seek(10)
    assert not stream.at_end()
    stream.seek(10 + len(raw))
    assert stream.at_end() and stream.size() == 10 + len(raw)
    assert budget.left < 8 * MiB - len(raw)  # everything inflated was charged
    small = InflatedStream(io.BytesIO(packed), 0, Budget(256 * 1024))
    with pytest.raises(HeaderTooLarge):
        small.read(len(raw))


@pytest.mark.parametrize("reader", READERS)
def test_deflate_bomb_inflates_only_the_header(tmp_path, reader, bomb, baseline_rss):
    result = read_in_child(bomb, reader)
    assert result["kind"] == INSTANCE
    assert result["record"]["SeriesNumber"] == 4 and result["record"]["InstanceNumber"] == 5
    assert result["max_rss_mib"] <= baseline_rss + HEADER_GROWTH_MIB, result  # pydicom.dcmread alone: above 2 GiB
    assert result["seconds"] < 5


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    size = deflate_bomb(path, GiB)
    assert size < 2 * MiB
    return path


@pytest.mark.parametrize("reader", READERS)
def test_deflated_private_element_before_the_header_is_too_large(tmp_path, reader):
    path = tmp_path / "bomb_private.dcm"
    deflate_bomb(path, 256 * MiB, private_first=True)
    result = read_in_child(path, reader)
    assert result["reason"] == Reason.HEADER_TOO_LARGE
    assert result["max_rss_mib"] <= RSS_LIMIT_MIB and result["seconds"] < 10


# ---------------------------------------------------------------------------------------------
# Item 3: a preamble followed by gigabytes of zeros; the budget of one header
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_two_gib_of_zeros_is_header_too_large_within_seconds(tmp_path, reader):
    path = tmp_path / "zeros.dcm"
    zeros_after_preamble(path, 2 * GiB)
    result = read_in_child(path, reader)
    assert result["kind"] == ERROR and result["reason"] == Reason.HEADER_TOO_LARGE
    assert "64 MiB" in result["detail"]
    assert result["seconds"] < 15  # unbounded pydicom: about 25 minutes
    assert result["max_rss_mib"] <= RSS_LIMIT_MIB


@pytest.mark.parametrize("use_fast", [True, False], ids=["fast", "pydicom"])
def test_the_budget_is_an_option_of_both_readers(use_fast):
    data = open(CT, "rb").read()
    assert read(data, use_fast).kind == INSTANCE
    result = read(data, use_fast, max_header_bytes=8 * 1024)
    assert (result.kind, result.reason) == (ERROR, Reason.HEADER_TOO_LARGE)
    assert result.detail.startswith("the header needs more than 8 KiB of reading")


def test_many_tiny_elements_run_out_of_budget_not_of_time():
    """Empty private elements (each valid) cost READ_COST apiece: the walk is bounded by count."""
    ds_bytes = encode(_named_dataset())
    elements = b"".join(b"\x09\x00" + i.to_bytes(2, "little") + b"UN\x00\x00\x00\x00\x00\x00"
                        for i in range(0x1000, 0x1000 + 40_000))
    at = ds_bytes.index(b"\x10\x00\x10\x00")  # before PatientName: group 0009 sorts before 0010
    data = ds_bytes[:at] + elements + ds_bytes[at:]
    for use_fast in (True, False):
        assert read(data, use_fast).kind == INSTANCE
        result = read(data, use_fast, max_header_bytes=4 * MiB)
        assert result.reason == Reason.HEADER_TOO_LARGE


def _named_dataset():
    ds = odd_dataset()
    ds.PatientName = "Odd^File"
    return ds


# ---------------------------------------------------------------------------------------------
# Item 4: a huge private element before the needed tags is skipped, not read
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("reader", READERS)
def test_huge_private_element_is_skipped(tmp_path, reader, implicit, baseline_rss):
    path = tmp_path / "private.dcm"
    private_element_before_needed(path, 512 * MiB, implicit=implicit)
    assert path.stat().st_size > 512 * MiB
    result = read_in_child(path, reader)
    assert result["kind"] == INSTANCE, result
    assert result["record"]["PatientID"] == "ODD-1" and result["record"]["InstanceNumber"] == 5
    assert result["max_rss_mib"] <= baseline_rss + HEADER_GROWTH_MIB, result  # the fast reader used to need 1.1 GB
    assert result["seconds"] < 5
    if reader == "fast":
        assert result["notes"] == (["reader-fallback:implicit-vr"] if implicit else [])


# ---------------------------------------------------------------------------------------------
# Item 5: past the last needed tag the scanner goes on as pydicom does
# ---------------------------------------------------------------------------------------------


def _ct() -> bytearray:
    return bytearray(open(CT, "rb").read())


def _agree(data: bytes) -> header.HeaderResult:
    fast, slow = read(bytes(data), True), read(bytes(data), False)
    assert (fast.kind, fast.reason, fast.record) == (slow.kind, slow.reason, slow.record)
    return fast


def test_tag_out_of_order_before_needed_ones_goes_to_pydicom():
    data = _ct()
    at = data.index(b"\x20\x00\x11\x00IS")  # SeriesNumber: write a tag above every needed one
    data[at:at + 4] = b"\x99\x00\x11\x00"
    result = _agree(data)
    assert result.notes == ("reader-fallback:out-of-order",)
    assert result.kind == INSTANCE and "InstanceNumber" in result.record  # nothing dropped


def test_invalid_vr_after_the_last_needed_tag_goes_to_pydicom():
    data = _ct()
    at = data.index(b"\x28\x00\x00\x01US")  # BitsAllocated, after PixelSpacing (0028,0030)
    data[at + 4:at + 6] = b"\x01\x02"
    result = _agree(data)
    assert result.notes == ("reader-fallback:malformed",)


def test_broken_element_after_the_last_needed_tag_is_rejected_as_pydicom_rejects_it():
    data = _ct()
    at = data.index(b"\xe0\x7f\x10\x00OW")
    data[at + 4:at + 6] = b"SQ"  # pixel data as SQ: pydicom stops there, so must the scanner
    assert _agree(data).kind == INSTANCE
    data = _ct()
    at = data.index(b"\x28\x00\x00\x01US")
    data[at + 6:at + 8] = b"\xff\xff"  # a length running past the end of the file: truncated
    result = _agree(data)
    assert (result.kind, result.reason) == (ERROR, Reason.TRUNCATED)
    assert result.notes == ()  # the scanner saw it itself


def test_pixel_data_first_after_needed_tags_and_no_pixel_data():
    data = bytes(_ct())
    at = data.index(b"\xe0\x7f\x10\x00OW")
    assert _agree(data[:at]).kind == INSTANCE  # no pixel data: read to the end of the file
    assert _agree(data[:at] + b"\xfc\xff\xfc\xffOB\x00\x00" + (4).to_bytes(4, "little") + b"\0" * 4).kind == INSTANCE


# ---------------------------------------------------------------------------------------------
# Item 11: error details say what was wrong, in words, never the bytes
# ---------------------------------------------------------------------------------------------


def test_error_details_do_not_quote_header_bytes():
    data = _ct()
    at = data.index(b"\x02\x00\x00\x00UL\x04\x00")
    data[at + 6:at + 8] = b"\x03\x00"  # group length of 3 bytes: pydicom quotes b'\xc0\x00\x00'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match=r"received b'"):
            pydicom.dcmread(io.BytesIO(bytes(data)))
    for use_fast in (True, False):
        result = read(bytes(data), use_fast)
        assert result.reason == Reason.UNREADABLE
        assert result.detail == "BytesLengthException: a binary value's length is not a multiple of its value size"


@pytest.mark.parametrize("message,expected", [
    ("Expected total bytes to be an even multiple of bytes per value. Instead received b'\\xce\\x00' "
     "with length 2", "ValueError: a binary value's length is not a multiple of its value size"),
    ("unpack requires a buffer of 4 bytes", "ValueError: an element header is cut short"),
    ("Invalid value for VR UI: 'PATIENT^SECRET'", "ValueError: a value is not valid for its VR"),
    ("something new about b'\\x01\\x02' and 'Secret Name' at (0010,0010)",
     "ValueError: something new about (value) and (value) at (0010,0010)"),
    ("odd \x00\x01 bytes", "ValueError: odd ?? bytes"),
])
def test_describe_error_maps_messages_to_words(message, expected):
    assert header.describe_error(ValueError(message)) == expected
    assert not re.search(r"\\x[0-9a-f]{2}|Secret|SECRET", header.describe_error(ValueError(message)))


# ---------------------------------------------------------------------------------------------
# Through the CLI: one archive holding every odd header at once
# ---------------------------------------------------------------------------------------------


def test_odd_headers_through_the_cli(tmp_path):
    """The run finishes (exit 0) within bounded time and memory; every file is accounted for; the
    readable odd files are converted, the others are one error line each, in words; fallbacks to
    pydicom are counted in the summary's notes."""
    import json
    import resource
    import shutil
    import subprocess
    import sys
    import time

    root = tmp_path / "in"
    root.mkdir()
    shutil.copyfile(os.path.join(TEST_FILES, "MR_small.dcm"), root / "mr.dcm")
    shutil.copyfile(os.path.join(TEST_FILES, "MR_small_implicit.dcm"), root / "mr_implicit.dcm")
    deflate_bomb(root / "bomb.dcm", GiB, SOPInstanceUID="2.25.900011")
    private_element_before_needed(root / "private.dcm", 512 * MiB, SOPInstanceUID="2.25.900012")
    zeros_after_preamble(root / "zeros.dcm", 2 * GiB)
    bad = _ct()
    at = bad.index(b"\x02\x00\x00\x00UL\x04\x00")
    bad[at + 6:at + 8] = b"\x03\x00"
    (root / "group_length.dcm").write_bytes(bytes(bad))
    out = tmp_path / "out"

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(root), "--output",
                           str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 120
    assert peak_rss_mib <= RSS_LIMIT_MIB, peak_rss_mib

    summary = json.loads((out / "_report" / "summary.json").read_text())
    assert summary["files_matched"] == 6
    assert sum(summary["outcomes"].values()) == 6
    # mr and mr_implicit are copies of one instance (one counts as duplicate), bomb, private
    assert (summary["outcomes"]["converted"], summary["outcomes"]["duplicate"]) == (3, 1)
    assert summary["errors_by_reason"] == {"header-too-large": 1, "unreadable": 1}
    assert summary["notes"]["reader-fallback:implicit-vr"] == 1
    assert summary["notes"]["reader-fallback:deflated"] == 1
    from helpers import read_ndjson

    errors = {os.path.basename(e["path"]): e for e in read_ndjson(out, "errors")}
    assert errors["zeros.dcm"]["reason"] == "header-too-large"
    assert errors["group_length.dcm"]["detail"] == (
        "BytesLengthException: a binary value's length is not a multiple of its value size")
    for line in errors.values():
        assert not re.search(r"b'|\\x[0-9a-f]{2}", line["detail"])


@pytest.mark.parametrize("depth", [20, 3000])
def test_deeply_nested_sequences_are_one_result_not_a_crash(depth):
    """Undefined-length private sequences nested ``depth`` deep before the needed tags: both readers
    give the same result (deep nesting exhausts pydicom's recursion: one error line)."""
    ds_bytes = encode(odd_dataset())
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    opening = b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff" + item
    nested = opening * depth + (item_end + sequence_end) * depth
    at = ds_bytes.index(b"\x10\x00\x20\x00")  # PatientID: group 0009 sorts before it
    result = _agree(ds_bytes[:at] + nested + ds_bytes[at:])
    if depth < 100:
        assert result.kind == INSTANCE and result.notes == ()
    else:
        assert (result.kind, result.reason) == (ERROR, Reason.UNREADABLE)
        assert result.notes == ("reader-fallback:malformed",)


@pytest.mark.parametrize("padding", [b"\t", b"\0", b" ", b"\x1f"])
def test_file_meta_uids_are_stripped_as_pydicom_strips_them(padding):
    """pydicom's UI conversion strips trailing NULs and spaces, its UID class any whitespace."""
    data = _ct()
    at = data.index(b"1.2.840.10008.5.1.4.1.1.2\0")
    data[at + 25:at + 26] = padding
    fast = header.read_header(io.BytesIO(bytes(data)), SPEC)
    assert fast.notes == ()
    rest = io.BytesIO(bytes(data))
    rest.seek(header.FIRST_READ)
    scanned = header.fast_header.parse(bytes(data[:header.FIRST_READ]), rest, SPEC)
    assert scanned is not None
    assert scanned == header.parse_with_pydicom(io.BytesIO(bytes(data)), SPEC)


@pytest.mark.parametrize("vr", [b"US", b"UL", b"FD"])
def test_charset_with_a_numeric_vr_is_rejected_as_pydicom_rejects_it(vr):
    """pydicom converts (0008,0005) by its VR at the end of the dataset; a number is no charset."""
    data = _ct()
    at = data.index(b"\x08\x00\x05\x00CS")
    data[at + 4:at + 6] = vr
    result = _agree(data)
    assert (result.kind, result.reason) == (ERROR, Reason.UNREADABLE)
    assert result.notes == ("reader-fallback:malformed",)


def test_item_delimiter_right_after_the_file_meta_goes_to_pydicom():
    """pydicom's meta reading stops at (FFFE,E00D) but consumes it, and reads the dataset after it
    (found by the fuzz campaign): the scanner must not take it for the end of the dataset."""
    data = bytes(_ct())
    at = data.index(b"\x08\x00\x05\x00CS")  # the first dataset element
    mutant = data[:at] + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + data[at:]
    result = _agree(mutant)
    assert result.kind == INSTANCE and result.notes == ("reader-fallback:malformed",)


def test_charset_padded_with_a_nul_is_read_as_pydicom_reads_it():
    """An item's (0008,0005) padded with NUL instead of a space (found by the fuzz campaign): pydicom
    strips it; the record's decoding did not and failed the file."""
    from specs import WIDE_SPEC

    data = open(os.path.join(os.path.dirname(TEST_FILES), "charset_files", "chrSQEncoding.dcm"), "rb").read()
    assert data.count(b"ISO 2022 IR 87 ") == 1
    data = data.replace(b"ISO 2022 IR 87 ", b"ISO 2022 IR 87\0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = header.read_header(io.BytesIO(data), WIDE_SPEC)
        slow = header.read_header(io.BytesIO(data), WIDE_SPEC, use_fast=False)
    assert fast == slow and fast.notes == ()
    assert fast.reason == Reason.MISSING_STUDY_INSTANCE_UID  # as the unchanged file: read, not unreadable
