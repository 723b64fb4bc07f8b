"""Seeded mutants of real DICOM files, and the differential check of the two header readers on them.

Shared by tests/test_reader_fuzz.py (a bounded run in the suite) and scripts/fuzz_readers.py (the
long campaign). A mutant is one of pydicom's own test files with 1-3 mutations in its header: byte
and bit flips, insertions, deletions, truncation, and corrupted tags, VRs and lengths at real element
boundaries. ``compare`` reads it with ``header.read_header`` both ways (fast scanner with pydicom
fallback, and pydicom only): pydicom's reading is the authority, so any difference is a finding.
"""
from __future__ import annotations

import io
import logging
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import pydicom
import pydicom.data
from pydicom.dataelem import RawDataElement

from beam_pipeline.dicom import fast_header, header
from beam_pipeline.dicom.records import INSTANCE

DATA = os.path.dirname(pydicom.data.__file__)

# Explicit VR LE files of many shapes (sequences, private and UN sequences, character sets,
# encapsulated pixel data, DICOMDIR, no pixel data), plus the syntaxes the scanner leaves to pydicom.
SEED_NAMES = (
    "test_files/CT_small.dcm", "test_files/MR_small.dcm", "test_files/MR_small_padded.dcm",
    "test_files/MR_small_implicit.dcm", "test_files/MR_small_bigendian.dcm", "test_files/image_dfl.dcm",
    "charset_files/chrSQEncoding.dcm", "charset_files/chrJapMulti.dcm", "charset_files/chrH31.dcm",
    "test_files/nested_priv_SQ.dcm", "test_files/priv_SQ.dcm", "test_files/UN_sequence.dcm",
    "test_files/rtplan.dcm", "test_files/test-SR.dcm", "test_files/reportsi.dcm",
    "test_files/JPEG2000.dcm", "test_files/dicomdirtests/77654033/CT2/17106",
    "test_files/dicomdirtests/DICOMDIR", "test_files/rtdose_1frame.dcm",
    "test_files/SC_rgb_small_odd.dcm", "test_files/no_meta_group_length.dcm",
    "test_files/meta_missing_tsyntax.dcm", "test_files/empty_charset_LEI.dcm",
)
_VRS = [vr.encode() for vr in ("AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL "
                               "SQ SS ST SV TM UC UI UL UN UR US UT UV").split()]
_RAW_BYTES = re.compile(r"b'|b\"|\\x[0-9a-fA-F]{2}")


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    header_end: int                # mutations fall before this offset (pixel data value or EOF)
    element_starts: tuple[int, ...]  # offsets of top-level element headers (meta included)


def load_seeds() -> list[Seed]:
    seeds = []
    for name in SEED_NAMES:
        with open(os.path.join(DATA, name), "rb") as handle:
            data = handle.read()
        starts, header_end = _layout(data)
        seeds.append(Seed(name, data, header_end, tuple(starts)))
    return seeds


def _layout(data: bytes) -> tuple[list[int], int]:
    """Element header offsets by pydicom (explicit VR LE meta and dataset; others: meta only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True, defer_size=64)
    starts = []
    header_end = len(data)
    datasets = [ds.file_meta, ds] if ds.file_meta is not None else [ds]
    for index, dataset in enumerate(datasets):
        for tag in dataset.keys():
            elem = dataset.get_item(tag, keep_deferred=True)
            if not isinstance(elem, RawDataElement) or elem.is_implicit_VR or not elem.is_little_endian:
                continue
            size = 12 if elem.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN",
                                     "UR", "UT", "UV") else 8
            starts.append(elem.value_tell - size)
            if index == len(datasets) - 1 and tag in (0x7FE00010, 0x7FE00009, 0x7FE00008):
                header_end = min(header_end, elem.value_tell + 16)
    if ds.file_meta is not None and "TransferSyntaxUID" in ds.file_meta:
        if ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian:
            header_end = len(data)
    return sorted(set(s for s in starts if 0 <= s < len(data))), header_end


def mutate(seed: Seed, rng: random.Random) -> tuple[bytes, tuple[str, ...]]:
    data = bytearray(seed.data)
    kinds = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(_MUTATIONS)
        _MUTATORS[kind](data, seed, rng)
        kinds.append(kind)
    return bytes(data), tuple(kinds)


def _offset(data: bytearray, seed: Seed, rng: random.Random) -> int:
    return rng.randrange(128, max(129, min(len(data), seed.header_end)))


def _element(data: bytearray, seed: Seed, rng: random.Random) -> int | None:
    starts = [s for s in seed.element_starts if s + 8 <= len(data)]
    return rng.choice(starts) if starts else None


def _flip_byte(data, seed, rng):
    if len(data) > 129:
        data[_offset(data, seed, rng)] = rng.randrange(256)


def _flip_bit(data, seed, rng):
    if len(data) > 129:
        data[_offset(data, seed, rng)] ^= 1 << rng.randrange(8)


def _insert(data, seed, rng):
    at = _offset(data, seed, rng)
    data[at:at] = rng.choice((bytes(rng.randrange(1, 9)), rng.randbytes(rng.randrange(1, 17))))


def _delete(data, seed, rng):
    at = _offset(data, seed, rng)
    del data[at:at + rng.randrange(1, 17)]


def _truncate(data, seed, rng):
    del data[rng.randrange(0, max(1, min(len(data), seed.header_end + 64))):]


def _tag(data, seed, rng):
    at = _element(data, seed, rng)
    if at is None:
        return
    choice = rng.randrange(5)
    if choice == 0:    # another element's tag (out of order or repeated)
        other = _element(data, seed, rng)
        data[at:at + 4] = data[other:other + 4]
    elif choice == 1:  # a tag above everything the converter needs
        data[at:at + 4] = rng.choice((b"\x99\x00\x10\x00", b"\xe0\x7f\x10\x00", b"\xfe\xff\x0d\xe0",
                                      b"\xfe\xff\x00\xe0", b"\x00\x00\x00\x00", b"\x02\x00\x10\x00"))
    elif choice == 2:  # group or element changed a little
        data[at + rng.randrange(4)] ^= 1 << rng.randrange(8)
    else:              # random tag
        data[at:at + 4] = rng.randbytes(4)


def _vr(data, seed, rng):
    at = _element(data, seed, rng)
    if at is not None:
        data[at + 4:at + 6] = rng.choice((rng.choice(_VRS), rng.randbytes(2), b"\x00\x00", b"  "))


def _length(data, seed, rng):
    at = _element(data, seed, rng)
    if at is None:
        return
    long_form = bytes(data[at + 4:at + 6]) in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV",
                                               b"UC", b"UN", b"UR", b"UT", b"UV")
    where, width = (at + 8, 4) if long_form else (at + 6, 2)
    old = int.from_bytes(data[where:where + width], "little")
    new = rng.choice((0, 1, old + 1, max(0, old - 1), old + 2, old * 2, rng.randrange(1 << (8 * width)),
                      (1 << (8 * width)) - 1, len(data)))
    data[where:where + width] = (new % (1 << (8 * width))).to_bytes(width, "little")


def _duplicate(data, seed, rng):
    at, to = _element(data, seed, rng), _element(data, seed, rng)
    if at is not None and to is not None:
        data[to:to] = data[at:at + rng.randrange(8, 48)]


_MUTATORS = {
    "flip-byte": _flip_byte, "flip-bit": _flip_bit, "insert": _insert, "delete": _delete,
    "truncate": _truncate, "tag": _tag, "vr": _vr, "length": _length, "duplicate": _duplicate,
}
_MUTATIONS = tuple(_MUTATORS) + ("tag", "vr", "length", "flip-byte")  # element-level ones twice


def _read(data: bytes, spec, use_fast: bool):
    return header.read_header(io.BytesIO(data), spec, use_fast=use_fast)


def compare(data: bytes, spec) -> tuple[list[str], dict]:
    """Read ``data`` both ways; returns (kinds of disagreement, facts about the reading).

    Disagreements: ``exception`` (a reader raised), ``accepts-what-pydicom-rejects``,
    ``rejects-what-pydicom-accepts``, ``other-classification`` (kind or reason differ),
    ``attribute-differs`` (both read an instance, records differ), ``scanner-differs`` (the scanner
    accepted the file but its ParsedHeader is not pydicom's), ``raw-bytes-in-detail``.
    """
    found = []
    facts: dict = {}
    try:
        fast = _read(data, spec, True)
        slow = _read(data, spec, False)
    except Exception as exc:  # noqa: BLE001 -- the finding is that anything escaped
        return ["exception"], {"exception": f"{type(exc).__name__}: {exc}"[:200]}
    facts["pydicom"] = slow.kind if slow.kind != "error" else f"error:{slow.reason}"
    notes = getattr(fast, "notes", ())  # (also runs against readers without notes)
    facts["fallback"] = notes[0] if notes else None
    if slow.kind == INSTANCE and fast.kind != INSTANCE:
        found.append("rejects-what-pydicom-accepts")
    elif fast.kind == INSTANCE and slow.kind != INSTANCE:
        found.append("accepts-what-pydicom-rejects")
    elif (fast.kind, fast.reason) != (slow.kind, slow.reason):
        found.append("other-classification")
    elif fast.record != slow.record:
        found.append("attribute-differs")
    for result in (fast, slow):
        if result.detail and _RAW_BYTES.search(result.detail):
            found.append("raw-bytes-in-detail")
            break
    if data[128:132] == b"DICM" and not notes:
        scanned = fast_header.parse(data[:header.FIRST_READ], _at(data, header.FIRST_READ), spec)
        if scanned is not None:
            try:
                reference = header.parse_with_pydicom(io.BytesIO(data), spec)
            except Exception:  # noqa: BLE001 -- pydicom rejects what the scanner accepted
                reference = None
            if scanned != reference:
                found.append("scanner-differs")
    return found, facts


def _at(data: bytes, offset: int) -> io.BytesIO:
    stream = io.BytesIO(data)
    stream.seek(min(offset, len(data)))
    return stream


def quiet_pydicom() -> None:
    """pydicom warns and logs on every odd file; a campaign reads hundreds of thousands."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")


def campaign(seed: int, count: int, specs: dict, on_finding=None) -> Counter:
    """Run ``count`` mutants (spec chosen per mutant); counts of outcomes and findings."""
    quiet_pydicom()
    rng = random.Random(seed)
    seeds = load_seeds()
    names = sorted(specs)
    counts: Counter = Counter()
    for index in range(count):
        source = rng.choice(seeds)
        data, kinds = mutate(source, rng)
        spec_name = rng.choice(names)
        found, facts = compare(data, specs[spec_name])
        counts["mutants"] += 1
        counts[f"pydicom:{facts.get('pydicom')}"] += 1
        counts[f"fast:{facts.get('fallback') or 'scanner'}"] += 1
        if found:
            counts["disagreements"] += 1
            for kind in found:
                counts[f"disagreement:{kind}"] += 1
            if on_finding is not None:
                on_finding(index, source.name, kinds, spec_name, data, found, facts)
        else:
            counts["agreements"] += 1
    return counts
