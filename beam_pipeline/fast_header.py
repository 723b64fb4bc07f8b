"""Fast header scanner for explicit VR little endian DICOM files.

``parse`` walks the raw bytes of one buffer (the first read of the file, grown from ``fp`` only
when an element runs past it) with ``struct.unpack_from``: elements the spec does not ask for are
skipped by their length and never decoded or even sliced; the raw bytes of the needed ones are
collected and decoded at the end by :func:`beam_pipeline.fields.add_value`, exactly as the pydicom
reader in :mod:`beam_pipeline.header` does. Scanning stops at the first tag above
``spec.last_tag`` (which includes pixel data), so a file's tail is never read.

The scanner only accepts what it can parse with certainty. It returns ``None`` -- and the caller
falls back to pydicom, the authority -- for: a missing, implicit VR, big endian or deflated
transfer syntax; file meta that is not plain explicit VR LE; a command set group; an invalid or
unknown VR; tags out of ascending order (or repeated); a VR that disagrees with the spec on
whether the element is a sequence; an undefined length on anything but an SQ; undefined length
UN (an implicit VR sequence); item/delimiter structure that does not add up; and a file ending
inside a sequence or inside a 12-byte element header (pydicom raises there, it does not report a
truncated file). A file ending inside a top-level element before the stop point gives
``truncated=True`` following ``header._ends_inside_header``; a cut after the stop point is not
seen (by design: the rest of the file is not read).

The top-level (0008,0005) Specific Character Set is used for decoding but, like in
``header.parse_with_pydicom``, not put in the record; in items it is recorded if asked for.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom import uid as _uid
from pydicom.dataelem import empty_value_for_VR

from beam_pipeline.fields import Attribute, FieldSpec, add_value, encodings_for
from beam_pipeline.records import ParsedHeader

_HEADER = struct.Struct("<HH2sH").unpack_from   # group, element, VR, 16-bit length
_ITEM = struct.Struct("<HHL").unpack_from       # group, element, 32-bit length (items, delimiters)
_LONG = struct.Struct("<L").unpack_from         # 32-bit length after an "OB\0\0"-style header

_UNDEFINED = 0xFFFFFFFF
_ITEM_TAG, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARSET = 0x00080005
_MEDIA_SOP_CLASS, _TRANSFER_SYNTAX = 0x00020002, 0x00020010

# Header size by VR: 8 bytes (2-byte length) or 12 bytes (2 reserved bytes + 4-byte length).
_SHORT_VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN",
              "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US")
_LONG_VRS = ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
_VR_HEADER = {**{vr.encode(): 8 for vr in _SHORT_VRS}, **{vr.encode(): 12 for vr in _LONG_VRS}}
_SQ, _UN = b"SQ", b"UN"
# VRs whose empty value pydicom keeps as None: such elements are converted on access, so
# header._ends_inside_header does not count them when measuring where the last element ended.
_NONE_WHEN_EMPTY = frozenset(
    vr for vr in _VR_HEADER if empty_value_for_VR(vr.decode(), raw=True) is None
)

# Transfer syntaxes whose dataset is not explicit VR little endian (plain bytes, no deflate).
_DECLINED_SYNTAXES = frozenset({
    "1.2.840.10008.1.2",        # implicit VR little endian
    "1.2.840.10008.1.2.2",      # explicit VR big endian
    "1.2.840.10008.1.2.1.99",   # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.95",   # JPIP referenced deflate
})


class _Decline(Exception):
    """The file is not in the shape this scanner handles; pydicom must read it."""


class _Truncated(Exception):
    """The file ends inside a top-level element before the stop point."""


# Per-spec lookup tables: tag -> (attribute, item table or None), and the stop tag.
_Table = dict[int, tuple[Attribute, "dict | None"]]


def _table(attributes: tuple[Attribute, ...]) -> _Table:
    return {a.tag: (a, _table(a.items) if a.vr == "SQ" else None) for a in attributes}


def _plan(spec: FieldSpec) -> tuple[_Table, int]:
    plan = spec.derived.get("fast_header")
    if plan is None:
        table = _table(spec.attributes)
        # Top-level (0008,0005) is read for decoding only: header.parse_with_pydicom cannot record
        # it (pydicom converts it while reading, so its raw bytes are gone), and both readers
        # must give the same record. In items it is recorded when the spec asks for it.
        table[_CHARSET] = (None, None)
        plan = spec.derived["fast_header"] = (table, spec.last_tag)
    return plan


class _Buffer:
    """The file's bytes from offset 0, grown on demand from ``fp`` (at least doubling)."""

    __slots__ = ("data", "fp", "eof")

    def __init__(self, head: bytes, fp: BinaryIO):
        self.data = head
        self.fp = fp
        self.eof = False

    def grow(self, end: int) -> bytes:
        """Make ``data`` reach ``end`` if the file is that long; returns ``data`` either way."""
        data = self.data
        if self.eof:
            return data
        chunks = [data]
        have = len(data)
        want = max(end, 2 * have) - have
        while want > 0:
            chunk = self.fp.read(want)
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
            have += len(chunk)
            want -= len(chunk)
            if have >= end:
                break
        data = self.data = b"".join(chunks)
        return data


def parse(head: bytes, fp: BinaryIO, spec: FieldSpec) -> ParsedHeader | None:
    """Parse a file with preamble + "DICM"; ``fp`` is positioned right after ``head``.

    Returns ``None`` when pydicom should read the file instead (see the module docstring).
    """
    try:
        return _parse(_Buffer(head, fp), spec)
    except _Decline:
        return None
    except Exception:  # never let a scanner bug turn into a failed file: pydicom decides
        return None


def _parse(buffer: _Buffer, spec: FieldSpec) -> ParsedHeader:
    meta, pos = _parse_meta(buffer)
    syntax = meta.get("TransferSyntaxUID")
    if not syntax or syntax in _DECLINED_SYNTAXES or syntax in _uid.PrivateTransferSyntaxes:
        raise _Decline
    needed, last_tag = _plan(spec)
    collected: list = []
    try:
        _parse_dataset(buffer, pos, needed, last_tag, collected)
        truncated = False
    except _Truncated:
        truncated = True
    return ParsedHeader(meta, _decode(collected, encodings_for(_charset(collected), None)), truncated)


def _parse_meta(buffer: _Buffer) -> tuple[dict, int]:
    """File meta group (0002): explicit VR LE, read until the first tag of another group."""
    data = buffer.data
    pos = 132
    prev = -1
    raw = {}
    while True:
        if pos + 12 > len(data):
            data = buffer.grow(pos + 12)
            if pos + 8 > len(data):
                raise _Decline  # file ends in the meta group: rare, pydicom decides
        group, elem, vr, length = _HEADER(data, pos)
        if group != 2:
            break
        tag = group << 16 | elem
        size = _VR_HEADER.get(vr)
        if size is None or tag <= prev:
            raise _Decline
        if size == 12:
            if pos + 12 > len(data):
                raise _Decline
            length = _LONG(data, pos + 8)[0]
            if length == _UNDEFINED:
                raise _Decline
        start = pos + size
        pos = start + length
        if pos > len(data):
            data = buffer.grow(pos)
            if pos > len(data):
                raise _Decline
        if tag == _MEDIA_SOP_CLASS or tag == _TRANSFER_SYNTAX:
            if vr != b"UI":
                raise _Decline
            raw[tag] = data[start:pos]
        prev = tag
    if group == 0:
        raise _Decline  # a command set group follows: pydicom reads it as implicit VR
    meta = {}
    for tag, keyword in ((_MEDIA_SOP_CLASS, "MediaStorageSOPClassUID"),
                         (_TRANSFER_SYNTAX, "TransferSyntaxUID")):
        if tag in raw:
            # Same as str(pydicom's UI value).strip("\0 "); a multi-valued UID is not plausible.
            value = raw[tag].decode("latin-1").rstrip("\0 ")
            if "\\" in value:
                raise _Decline
            if value:
                meta[keyword] = value.strip("\0 ")
    return meta, pos


def _parse_dataset(buffer: _Buffer, pos: int, needed: _Table, last_tag: int, collected: list) -> None:
    """Top-level elements up to the stop point; needed ones appended to ``collected``."""
    data = buffer.data
    end_of_data = len(data)
    header = _HEADER
    vr_header = _VR_HEADER
    get_needed = needed.get
    prev = -1
    count = 0
    last_end = 0  # end of the last defined-length element, as header._ends_inside_header sees it
    while True:
        if pos + 12 > end_of_data:
            data = buffer.grow(pos + 12)
            end_of_data = len(data)
            if pos + 8 > end_of_data:
                # End of file, maybe inside an element's 8-byte header (pydicom stops silently).
                size = end_of_data
                if count == 0 or (0 < last_end < size and size - last_end < 12):
                    raise _Truncated
                return
        group, elem, vr, length = header(data, pos)
        tag = group << 16 | elem
        if tag > last_tag:  # the stop point (pixel data included)
            if vr_header.get(vr) == 12 and pos + 12 > end_of_data:
                raise _Decline  # pydicom reads the 4-byte length before stopping and fails
            if count == 0 and tag in (0x7FE00010, 0x7FE00009, 0x7FE00008, _ITEM_END):
                raise _Truncated  # pydicom's dataset is empty
            return
        size = vr_header.get(vr)
        if size is None or tag <= prev or group == 0:
            raise _Decline
        if size == 12:
            if pos + 12 > end_of_data:
                raise _Decline  # pydicom raises struct.error on a cut 12-byte header
            length = _LONG(data, pos + 8)[0]
        start = pos + size
        entry = get_needed(tag)
        if length == _UNDEFINED:
            if vr != _SQ:
                raise _Decline  # undefined length UN (implicit VR SQ) or other oddity
            if entry is None:
                pos = _skip_sequence(buffer, start, None)
            else:
                if entry[1] is None:
                    raise _Decline  # a non-SQ attribute encoded as a sequence
                items, pos = _parse_sequence(buffer, start, None, entry[1])
                collected.append((entry[0], items))
            data = buffer.data
            end_of_data = len(data)
        else:
            pos = start + length
            if pos > end_of_data:
                data = buffer.grow(pos)
                end_of_data = len(data)
                if pos > end_of_data:
                    if entry is not None and entry[1] is not None:
                        raise _Decline  # pydicom would parse the cut sequence bytes
                    raise _Truncated
            if entry is not None:
                attr, items_table = entry
                if items_table is not None:
                    if vr != _SQ:
                        raise _Decline  # e.g. UN: pydicom re-reads it as implicit VR
                    if length:
                        items, end = _parse_sequence(buffer, start, pos, items_table)
                        collected.append((attr, items))
                        data = buffer.data
                        end_of_data = len(data)
                elif vr == _SQ:
                    raise _Decline
                elif length:
                    collected.append((attr, data[start:pos]))
            if length or vr not in _NONE_WHEN_EMPTY:
                last_end = pos
        prev = tag
        count += 1


def _parse_sequence(buffer: _Buffer, pos: int, end: int | None, table: _Table) -> tuple[list, int]:
    """Items of a sequence starting at ``pos`` (``end`` None: undefined length)."""
    items = []
    while True:
        if end is not None and pos >= end:
            if pos > end:
                raise _Decline
            return items, pos
        data = buffer.data
        if pos + 8 > len(data):
            data = buffer.grow(pos + 8)
            if pos + 8 > len(data):
                raise _Decline  # file ends inside a sequence: pydicom raises
        group, elem, length = _ITEM(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            if end is not None:
                # pydicom parses a defined-length sequence from its value bytes and stops here,
                # ignoring anything left in the value
                return items, end
            if length:
                raise _Decline
            return items, pos
        if tag != _ITEM_TAG:
            raise _Decline
        if length == _UNDEFINED:
            item, pos = _parse_item(buffer, pos, None, table)
        else:
            item_end = pos + length
            if end is not None and item_end > end:
                raise _Decline
            item, pos = _parse_item(buffer, pos, item_end, table)
        items.append(item)


def _skip_sequence(buffer: _Buffer, pos: int, end: int | None) -> int:
    """End offset of a sequence the spec does not need (nested structure walked, not decoded)."""
    return _parse_sequence(buffer, pos, end, {})[1]


def _parse_item(buffer: _Buffer, pos: int, end: int | None, table: _Table) -> tuple[tuple, int]:
    """One item's elements: returns ((raw charset or None, collected), end offset)."""
    collected = []
    charset = None
    prev = -1
    header = _HEADER
    vr_header = _VR_HEADER
    while True:
        if end is not None and pos >= end:
            if pos > end:
                raise _Decline
            return (charset, collected), pos
        data = buffer.data
        if pos + 12 > len(data):
            data = buffer.grow(pos + 12)
            if pos + 8 > len(data):
                raise _Decline
        group, elem, vr, length = header(data, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            if end is not None or _ITEM(data, pos)[2]:
                raise _Decline
            return (charset, collected), pos + 8
        size = vr_header.get(vr)
        if size is None or tag <= prev:
            raise _Decline  # includes implicit VR items, which pydicom detects and allows
        if size == 12:
            if pos + 12 > len(data):
                raise _Decline
            length = _LONG(data, pos + 8)[0]
        start = pos + size
        entry = table.get(tag)
        if length == _UNDEFINED:
            if vr != _SQ:
                raise _Decline
            if entry is None:
                pos = _skip_sequence(buffer, start, None)
            else:
                if entry[1] is None:
                    raise _Decline
                items, pos = _parse_sequence(buffer, start, None, entry[1])
                collected.append((entry[0], items))
        else:
            pos = start + length
            if end is not None and pos > end:
                raise _Decline
            if pos > len(data):
                data = buffer.grow(pos)
                if pos > len(data):
                    raise _Decline
            if tag == _CHARSET:
                charset = data[start:pos]
            if entry is not None:
                attr, items_table = entry
                if items_table is not None:
                    if vr != _SQ:
                        raise _Decline
                    if length:
                        items, _ = _parse_sequence(buffer, start, pos, items_table)
                        collected.append((attr, items))
                elif vr == _SQ:
                    raise _Decline
                elif length:
                    collected.append((attr, data[start:pos]))
        prev = tag


def _charset(collected: list) -> bytes | None:
    for attr, value in collected:
        if attr is None or attr.tag == _CHARSET:
            return value
    return None


def _decode(collected: list, encodings: list[str]) -> dict:
    """Record from collected raw values, in tag order (as header._record decodes them)."""
    record: dict = {}
    for attr, value in collected:
        if attr is None:
            continue  # SpecificCharacterSet read for decoding only
        if attr.vr == "SQ":
            records = []
            for item_charset, item_collected in value:
                item_record = _decode(item_collected, encodings_for(item_charset, encodings))
                if item_record:
                    records.append(item_record)
            if records:
                record[attr.keyword] = tuple(records)
        else:
            add_value(record, attr, value, encodings, True)
    return record
