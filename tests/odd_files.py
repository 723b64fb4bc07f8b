"""Generators of odd DICOM files for the reader tests and scripts/measure_odd_headers.py.

Big files are written sparse (seek/truncate) or streamed, so that a 2 GiB file costs no disk and a
second to make; nothing here is committed as a binary.
"""
from __future__ import annotations

import io
import os
import warnings
import zlib

import pydicom
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

DATA = os.path.dirname(pydicom.data.__file__)
TEST_FILES = os.path.join(DATA, "test_files")
CT = os.path.join(TEST_FILES, "CT_small.dcm")
MR = os.path.join(TEST_FILES, "MR_small.dcm")

MiB = 1024 * 1024
GiB = 1024 * MiB


def odd_dataset(**values) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "2.25.900001"
    ds.StudyDate = "20240102"
    ds.Modality = "OT"
    ds.PatientID = "ODD-1"
    ds.StudyInstanceUID = "2.25.900002"
    ds.SeriesInstanceUID = "2.25.900003"
    ds.SeriesNumber = 4
    ds.InstanceNumber = 5
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    """Preamble, file meta and dataset as pydicom writes them (not deflated)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(out, enforce_file_format=True,
                   implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return out.getvalue()


def _meta_bytes(ds: Dataset, syntax) -> bytes:
    """Preamble and file meta for ``ds`` declaring ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


def _split_meta(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of an encoded file."""
    group_length = int.from_bytes(data[140:144], "little")
    end = 144 + group_length
    return data[:end], data[end:]


def zeros_after_preamble(path, size: int = 2 * GiB) -> None:
    """A 'DICM' preamble and file meta, then zeros up to ``size`` bytes (sparse)."""
    meta, _ = _split_meta(encode(odd_dataset()))
    with open(path, "wb") as handle:
        handle.write(meta)
        handle.truncate(size)


def private_element_before_needed(path, value_size: int = 512 * MiB, implicit: bool = False,
                                  **values) -> None:
    """A dataset with a private OB element of ``value_size`` zero bytes (sparse) before the tags the
    converter needs (SpecificCharacterSet is its only element before it)."""
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = odd_dataset(**values)
    ds.add_new(0x00050010, "LO", "ODD CREATOR")
    ds.add_new(0x00051000, "OB", b"")
    data = encode(ds, syntax)
    marker = (b"\x05\x00\x00\x10\x00\x00\x00\x00" if implicit
              else b"\x05\x00\x00\x10OB\x00\x00\x00\x00\x00\x00")
    at = data.index(marker) + len(marker)
    with open(path, "wb") as handle:
        handle.write(data[:at - 4] + value_size.to_bytes(4, "little"))
        handle.seek(at + value_size)
        handle.write(data[at:])


def deflate_bomb(path, inflated_size: int = GiB, private_first: bool = False, **values) -> int:
    """A deflated file whose dataset inflates to ``inflated_size`` bytes: the header, then pixel data
    of zeros (``private_first``: a private element of zeros before the needed tags instead).
    Returns the file's size."""
    ds = odd_dataset(Rows=1, Columns=1, BitsAllocated=8, **values)
    ds.add_new(0x00050010, "LO", "ODD CREATOR")
    ds.add_new(0x00051000, "OB", b"")
    ds.add_new(0x7FE00010, "OB", b"")
    _, dataset = _split_meta(encode(ds, ExplicitVRLittleEndian))
    meta = _meta_bytes(ds, DeflatedExplicitVRLittleEndian)
    marker = b"\x05\x00\x00\x10OB\x00\x00\x00\x00\x00\x00" if private_first else b"\xe0\x7f\x10\x00OB\x00\x00\x00\x00\x00\x00"
    at = dataset.index(marker) + len(marker)
    zeros = inflated_size - len(dataset)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as handle:
        handle.write(meta)
        handle.write(compressor.compress(dataset[:at - 4] + zeros.to_bytes(4, "little")))
        chunk = bytes(16 * MiB)
        left = zeros
        while left:
            handle.write(compressor.compress(chunk[:min(left, len(chunk))]))
            left -= min(left, len(chunk))
        handle.write(compressor.compress(dataset[at:]))
        handle.write(compressor.flush())
        return handle.tell()


_CHILD = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
from beam_pipeline.fhir import keywords
from beam_pipeline.dicom import fields
from beam_pipeline.dicom import header
spec = keywords.header_spec()
start = time.process_time()  # CPU seconds: what reading the file costs, whatever else runs on the machine
with open(sys.argv[1], "rb") as fp:
    result = header.read_header(fp, spec, use_fast=sys.argv[2] == "fast")
print(json.dumps({"kind": result.kind, "reason": result.reason, "detail": result.detail,
                  "notes": list(result.notes), "record": result.record,
                  "seconds": round(time.process_time() - start, 3),
                  "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
                 default=str))
"""


def read_in_child(path, reader: str = "fast", timeout: float = 600) -> dict:
    """header.read_header on one file in a fresh interpreter (``reader`` "fast" or "pydicom"):
    its result, seconds and peak RSS (MiB), so that a test can bound the memory one file costs."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), reader], capture_output=True,
                          text=True, timeout=timeout, check=True)
    return json.loads(done.stdout)
