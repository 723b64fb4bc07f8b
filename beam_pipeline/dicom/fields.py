"""Which DICOM attributes to read (a ``FieldSpec``, built from keyword lists the caller hands in),
and how raw element bytes become plain values.

Both header readers (the fast scanner and the pydicom fallback) only locate elements; turning the
element bytes into a value happens here, once, so the two readers cannot disagree on decoding.

A *record* is a plain dict ``keyword -> value`` holding only elements that are present, non-empty
and parseable:

- string VRs: ``str`` stripped of padding, text VRs decoded with the file's character set;
- DS/FL/FD: ``float``; IS/US/UL/SS/SL: ``int``;
- keywords whose dictionary VM is not ``"1"`` are always a ``tuple`` (even with one value);
- sequences: a tuple of item records (only the item keywords asked for);
- numbers that do not parse are left out and their keywords listed under ``INVALID_KEY``.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Mapping

from pydicom.charset import TEXT_VR_DELIMS, convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword

from beam_pipeline.codes import INVALID_KEY


# File meta elements (group 0002) used to classify a file.
META_KEYWORDS = ("MediaStorageSOPClassUID", "TransferSyntaxUID")

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

_TEXT_VRS = frozenset({"SH", "LO", "UC"})            # backslash separates values
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT"})     # backslash is just a character
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "DS", "IS"})
_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


@dataclass(frozen=True)
class Attribute:
    """One DICOM attribute to extract: its tag, the VR used to decode it and its multiplicity."""

    keyword: str
    tag: int
    vr: str
    multi: bool
    items: tuple["Attribute", ...] = ()  # for sequences: the attributes read from each item
    # How its bytes decode (VR and multiplicity): the decoded-value cache's key, so that attributes
    # decoding alike share their values (a study's StudyDate, SeriesDate and AcquisitionDate are
    # often the same bytes: decoded once, not once per attribute).
    decoding: str = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "decoding", self.vr + ("*" if self.multi else ""))


@dataclass(frozen=True)
class FieldSpec:
    """The attributes to extract, by tag, with the largest tag needed (readers may stop after it)."""

    attributes: tuple[Attribute, ...]
    # DCM concepts of the NUM/DATETIME items to read from dose reports' content trees (``dose_report``);
    # empty: dose reports are read like any other instance.
    dose_concepts: frozenset = frozenset()
    # Lookup tables derived by the readers, built once per spec (so once per worker), not per file.
    derived: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @cached_property
    def last_tag(self) -> int:
        return max(a.tag for a in self.attributes)


def _attribute(keyword: str, sequence_items: Mapping[str, Iterable[str]], depth: int = 0) -> Attribute:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    vr = dictionary_VR(tag).split(" or ")[0]
    items: tuple[Attribute, ...] = ()
    if vr == "SQ":
        if depth > 4:
            raise ValueError(f"sequence nesting too deep at {keyword!r}")
        names = sorted(set(sequence_items.get(keyword, ())))
        items = tuple(_attribute(k, sequence_items, depth + 1) for k in names)
        items = tuple(sorted(items, key=lambda a: a.tag))
    return Attribute(keyword, tag, vr, dictionary_VM(tag) != "1", items)


def build_spec(levels: Iterable[Iterable[str]], sequence_items: Mapping[str, Iterable[str]],
               dose_concepts: Iterable[str] = ()) -> FieldSpec:
    """A FieldSpec for the union of keyword lists; SpecificCharacterSet is always read (decoding)."""
    keywords = {"SpecificCharacterSet"}
    for level in levels:
        keywords.update(level)
    attributes = sorted((_attribute(k, sequence_items) for k in keywords), key=lambda a: a.tag)
    return FieldSpec(tuple(attributes), frozenset(dose_concepts))


def encodings_for(raw_charset: bytes | None, inherited: list[str] | None) -> list[str]:
    """Python codecs for a (0008,0005) value; items without their own inherit the parent's."""
    if raw_charset is None:
        return inherited or ["iso8859"]
    # pydicom strips trailing spaces and NULs from the whole value before splitting it
    terms = [t.strip() for t in raw_charset.decode("ascii", "replace").rstrip("\0 ").split("\\")]
    if not any(terms):
        return inherited or ["iso8859"]
    return convert_encodings(terms)


def decode_value(attr: Attribute, raw: bytes, encodings: list[str], little_endian: bool = True):
    """Plain value for raw element bytes, or None when empty. Raises ValueError when unparseable."""
    vr = attr.vr
    if vr in _BINARY_FORMATS:
        fmt = _BINARY_FORMATS[vr]
        size = struct.calcsize(fmt)
        count = len(raw) // size
        if count == 0:
            return None
        values = struct.unpack(("<" if little_endian else ">") + fmt * count, raw[: count * size])
        if vr in ("FL", "FD") and not all(math.isfinite(v) for v in values):
            raise ValueError("non-finite float")
        return _shape(attr, list(values))
    if vr in _ASCII_VRS:
        text = raw.decode("latin-1")
    elif vr in _TEXT_VRS:
        text = _decode_text(raw, encodings)
    elif vr in _SINGLE_TEXT_VRS:
        text = _decode_text(raw, encodings).rstrip("\0 ").strip()
        return _shape(attr, [text] if text else [])
    else:  # OB, UN, PN and other VRs the converter never needs as values
        raise ValueError(f"VR {vr} is not decoded")
    if "\\" not in text:  # one value, as most are (UIDs, dates, names): decoded without lists
        text = text.strip("\0 ").strip()
        if not text:
            return None
        value = _to_float(text) if vr == "DS" else _to_int(text) if vr == "IS" else text
        return (value,) if attr.multi else value
    parts = text.split("\\")
    parts = [p.strip("\0 ").strip() for p in parts]
    parts = [p for p in parts if p]
    if vr == "DS":
        parts = [_to_float(p) for p in parts]
    elif vr == "IS":
        parts = [_to_int(p) for p in parts]
    return _shape(attr, parts)


def _decode_text(raw: bytes, encodings: list[str]) -> str:
    """Text of a text VR in the file's character sets. ASCII without escape sequences reads the
    same in every character set DICOM defines, and is the common case: decoded directly, without
    pydicom's codec lookups."""
    if raw.isascii() and b"\x1b" not in raw:
        return raw.decode("ascii")
    return decode_bytes(raw, encodings, TEXT_VR_DELIMS)


def _to_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("non-finite decimal")
    return value


def _to_int(text: str) -> int:
    value = float(text)  # IS sometimes written as "12.0" by sloppy writers; reject real fractions
    if not value.is_integer():
        raise ValueError("fractional integer string")
    return int(value)


def _shape(attr: Attribute, values: list):
    if not values:
        return None
    if attr.multi:
        return tuple(values)
    return values[0]


_INVALID = object()  # a cached "does not parse"
DECODED_CACHE_SIZE = 50_000  # entries; the cache is emptied when full (unique UIDs fill it)


def decoded_cache(spec: FieldSpec) -> dict:
    """Values already decoded by the readers of this spec (so of one worker), by element bytes.

    Study- and series-level elements repeat byte for byte in every file of a series; decoding
    them once per series instead of once per file is a large share of a header's cost. Values are
    immutable (str, numbers, tuples), so sharing them between records is safe.
    """
    return spec.derived.setdefault("decoded", {})


def _decoded(attr: Attribute, raw: bytes, encodings: list[str], little_endian: bool):
    """``decode_value``, or ``_INVALID`` when the bytes do not parse."""
    try:
        return decode_value(attr, raw, encodings, little_endian)
    except (ValueError, UnicodeDecodeError, LookupError, struct.error):
        return _INVALID


def _store(record: dict, attr: Attribute, value) -> None:
    if value is _INVALID:
        record[INVALID_KEY] = record.get(INVALID_KEY, ()) + (attr.keyword,)
    elif value is not None:
        record[attr.keyword] = value


def add_value(record: dict, attr: Attribute, raw: bytes, encodings: list[str], little_endian: bool) -> None:
    """Decode and store one element into a record, noting unparseable values instead of raising."""
    _store(record, attr, _decoded(attr, raw, encodings, little_endian))


def collected_charset(collected: list) -> bytes | None:
    """The raw (0008,0005) of a list of collected elements (``decode_collected``), None when absent."""
    for attr, value in collected:
        if attr is None:
            return value
    return None


def decode_collected(collected: list, encodings: list[str], cache: dict) -> dict:
    """Record from (attribute, raw little-endian bytes) pairs in tag order, as the fast reader
    collects them: a sequence's value is a list of such lists (its items), attribute None the
    SpecificCharacterSet read for decoding. Values go through ``cache`` (``decoded_cache``), looked
    up here in the loop: a header has some 30 elements, most of them hits, and a call per element
    would cost more than the lookup."""
    record: dict = {}
    charsets = encodings[0] if len(encodings) == 1 else tuple(encodings)
    lookup = cache.get
    for attr, raw in collected:
        if attr is None:
            continue
        if attr.vr == "SQ":
            items = []
            for item in raw:
                item_record = decode_collected(item, encodings_for(collected_charset(item), encodings), cache)
                if item_record:
                    items.append(item_record)
            if items:
                record[attr.keyword] = tuple(items)
            continue
        key = (attr.decoding, raw, charsets)
        value = lookup(key)
        if value is None:
            value = _decoded(attr, raw, encodings, True)
            if value is None:
                continue
            if len(cache) >= DECODED_CACHE_SIZE:
                cache.clear()
            cache[key] = value
        if value is _INVALID:
            record[INVALID_KEY] = record.get(INVALID_KEY, ()) + (attr.keyword,)
        else:
            record[attr.keyword] = value
    return record
