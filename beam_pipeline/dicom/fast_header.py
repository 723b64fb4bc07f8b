"""Fast header scanner for explicit VR little endian DICOM files.

``scan`` walks the elements of one file with ``struct.unpack_from`` over a small window of its bytes
(the first read, then 64 KiB reads where it needs them): values the spec does not ask for are
skipped by their length -- seeked over, never read -- and the raw bytes of the needed ones are
decoded at the end by :func:`beam_pipeline.dicom.fields.decode_collected` (``fields.add_value`` through
a cache), exactly as the pydicom reader in :mod:`beam_pipeline.dicom.header` does.

It walks the top level as ``pydicom.dcmread(stop_before_pixels=True)`` does: to pixel data (or an
item delimiter, or the end of the file), so that it accepts exactly the files pydicom accepts with
the values pydicom gives. Whatever it cannot read with certainty it *declines* with a short cause,
and pydicom, the authority, reads the file: a missing, implicit VR, big endian, deflated or private
transfer syntax; file meta that is not plain explicit VR LE; a command set (group 0000); an unknown
VR; tags out of ascending order or repeated; a VR that disagrees with the spec on whether the element
is a sequence; an undefined length on anything but an SQ; item/delimiter structure that does not add
up; a file ending inside a sequence or inside a 12-byte element header (pydicom raises there).
A file ending inside a top-level element gives ``truncated=True`` as ``header._ends_inside_header``
decides it. Unneeded sequences of defined length are skipped unparsed (pydicom converts them only
on access); undefined-length ones are walked, since pydicom parses them while reading.

The top-level (0008,0005) Specific Character Set is used for decoding but, like in
``header.parse_with_pydicom``, not put in the record; in items it is recorded if asked for.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import uid as _uid
from pydicom.charset import convert_encodings
from pydicom.values import convert_string

from beam_pipeline.dicom.fields import (Attribute, FieldSpec, collected_charset, decode_collected, decoded_cache,
                                        encodings_for)
from beam_pipeline.dicom.header_io import READ_COST, Budget
from beam_pipeline.dicom.records import ParsedHeader

try:  # the compiled loop over plain elements (setup.py builds it where a C compiler is present)
    from beam_pipeline.dicom._walk import walk as _compiled_walk
except ImportError:  # pragma: no cover - depends on the build
    _compiled_walk = None

_HEADER = struct.Struct("<HH2sH").unpack_from   # group, element, VR, 16-bit length
_ITEM = struct.Struct("<HHL").unpack_from       # group, element, 32-bit length (items, delimiters)
_LONG = struct.Struct("<L").unpack_from         # 32-bit length after an "OB\0\0"-style header

CHUNK = 64 * 1024  # bytes per read beyond the first one
_UNDEFINED = 0xFFFFFFFF
_ITEM_TAG, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # where pydicom stops before pixels
_FIRST_STOP = 0x7FE00008  # no tag below it ends a dataset
_NO_END = 1 << 62  # "end" of a dataset that ends at a delimiter, pixel data or the end of file
_CHARSET = 0x00080005
_MEDIA_SOP_CLASS, _TRANSFER_SYNTAX = 0x00020002, 0x00020010

# Header size by VR: 8 bytes (2-byte length) or 12 bytes (2 reserved bytes + 4-byte length).
_SHORT_VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN",
              "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US")
_LONG_VRS = ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
_VR_HEADER = {**{vr.encode(): 8 for vr in _SHORT_VRS}, **{vr.encode(): 12 for vr in _LONG_VRS}}
_SQ = b"SQ"


def _vr_header_table() -> bytes:
    """The same sizes for the compiled loop: one byte per little-endian VR code (0 = unknown VR)."""
    table = bytearray(65536)
    for vr, size in _VR_HEADER.items():
        table[int.from_bytes(vr, "little")] = size
    return bytes(table)


_VR_HEADER_TABLE = _vr_header_table()

# Transfer syntaxes whose dataset is not explicit VR little endian plain bytes, by decline cause.
_DECLINED_SYNTAXES = {
    "1.2.840.10008.1.2": "implicit-vr",
    "1.2.840.10008.1.2.2": "big-endian",
    "1.2.840.10008.1.2.1.99": "deflated",
    "1.2.840.10008.1.2.4.95": "deflated",  # JPIP referenced deflate
    **{str(syntax): "private-syntax" for syntax in _uid.PrivateTransferSyntaxes},
}


@dataclass(frozen=True)
class Declined:
    """The scanner left the file to pydicom; ``cause`` is a short word for the summary's notes."""

    cause: str


class _Decline(Exception):
    """The file is not in the shape this scanner handles; pydicom must read it."""

    def __init__(self, cause: str = "malformed"):
        super().__init__(cause)
        self.cause = cause


class _Truncated(Exception):
    """The file ends inside a top-level element before the stop point."""


# Per-spec lookup tables: tag -> (attribute, item table or None). (0008,0005) is in every table,
# with attribute None where it is read for decoding only.
_Table = dict[int, tuple["Attribute | None", "dict | None"]]
_NO_TABLE: _Table = {_CHARSET: (None, None)}


def _table(attributes: tuple[Attribute, ...]) -> _Table:
    table = {a.tag: (a, _table(a.items) if a.vr == "SQ" else None) for a in attributes}
    table.setdefault(_CHARSET, (None, None))
    return table


def _plan(spec: FieldSpec) -> _Table:
    table = spec.derived.get("fast_header")
    if table is None:
        table = _table(spec.attributes)
        # Top-level (0008,0005) is read for decoding only: header.parse_with_pydicom cannot record
        # it (pydicom converts it while reading, so its raw bytes are gone), and both readers
        # must give the same record. In items it is recorded when the spec asks for it.
        table[_CHARSET] = (None, None)
        spec.derived["fast_header"] = table
    return table


class _Source:
    """A window of the file's bytes (``data`` starts at offset ``base``), moved forward on demand.

    Bytes before the window are dropped, bytes skipped over are never read; reads and elements are
    charged to the budget.
    """

    __slots__ = ("fp", "size", "budget", "data", "base", "fp_pos", "charsets")

    def __init__(self, head: bytes, fp: BinaryIO, size: int, budget: Budget, charsets: set):
        self.charsets = charsets  # (0008,0005) values that pydicom converts (``_check_charset``)
        self.fp = fp
        self.size = size
        self.budget = budget
        self.data = head
        self.base = 0
        self.fp_pos = len(head)

    def window(self, pos: int, need: int) -> bytes:
        """Move the window to start at ``pos`` holding ``need`` bytes (fewer at the end of file)."""
        data, base = self.data, self.base
        have_end = base + len(data)
        if pos <= have_end:
            keep, read_from = data[pos - base:], have_end
        else:
            keep, read_from = b"", pos
        want = min(pos + max(need, CHUNK), self.size) - read_from
        if want > 0:
            self.budget.charge(want)
            if self.fp_pos != read_from:
                self.fp.seek(read_from)
            chunks = [keep]
            got = 0
            while got < want:
                chunk = self.fp.read(want - got)
                if not chunk:
                    self.size = read_from + got  # the file is shorter than it said
                    break
                chunks.append(chunk)
                got += len(chunk)
            self.fp_pos = read_from + got
            keep = b"".join(chunks)
        self.data, self.base = keep, pos
        return keep


def scan(head: bytes, fp: BinaryIO, spec: FieldSpec, size: int, budget: Budget) -> ParsedHeader | Declined:
    """Read a file with preamble + "DICM" of ``size`` bytes; ``head`` is its start (already read).

    Raises :class:`beam_pipeline.dicom.header_io.HeaderTooLarge` when the budget runs out.
    """
    try:
        return _parse(_Source(head, fp, size, budget, spec.derived.setdefault("charsets", set())), spec)
    except _Decline as decline:
        return Declined(decline.cause)
    except RecursionError:  # sequences nested hundreds deep
        return Declined("malformed")
    except (struct.error, IndexError, ValueError, OverflowError):  # a scanner bug: pydicom decides
        return Declined("scanner-error")


def parse(head: bytes, fp: BinaryIO, spec: FieldSpec) -> ParsedHeader | None:
    """``scan`` with the file's size taken from ``fp`` and the default budget; None when declined."""
    here = fp.tell()
    fp.seek(0, 2)
    size = fp.tell()
    fp.seek(here)
    result = scan(head, fp, spec, size, Budget())
    return None if isinstance(result, Declined) else result


def _parse(source: _Source, spec: FieldSpec) -> ParsedHeader:
    meta, pos = _parse_meta(source)
    syntax = meta.get("TransferSyntaxUID")
    if not syntax:
        raise _Decline("no-syntax")
    if syntax in _DECLINED_SYNTAXES:
        raise _Decline(_DECLINED_SYNTAXES[syntax])
    collected: list = []
    try:
        _elements(source, pos, None, _plan(spec), collected, True)
    except _Truncated:
        return ParsedHeader(meta, {}, True)
    record = decode_collected(collected, encodings_for(collected_charset(collected), None), decoded_cache(spec))
    return ParsedHeader(meta, record, False)


def _parse_meta(source: _Source) -> tuple[dict, int]:
    """File meta group (0002): explicit VR LE, read until the first tag of another group."""
    pos = 132
    prev = -1
    raw = {}
    size = source.size
    while True:
        if pos + 8 > size:
            raise _Decline("malformed")  # file ends in the meta group: rare, pydicom decides
        data = source.data
        if pos + 12 > source.base + len(data):
            data = source.window(pos, 12)
        off = pos - source.base
        group, elem, vr, length = _HEADER(data, off)
        if group != 2:
            break
        tag = group << 16 | elem
        header_size = _VR_HEADER.get(vr)
        if header_size is None or tag <= prev:
            raise _Decline("malformed")
        if header_size == 12:
            if pos + 12 > size:
                raise _Decline("malformed")
            length = _LONG(data, off + 8)[0]
            if length == _UNDEFINED:
                raise _Decline("malformed")
        start = pos + header_size
        pos = start + length
        if pos > size:
            raise _Decline("malformed")
        if tag == _MEDIA_SOP_CLASS or tag == _TRANSFER_SYNTAX:
            if vr != b"UI":
                raise _Decline("malformed")
            raw[tag] = _value(source, start, length)
        prev = tag
    if group == 0:
        raise _Decline("command-group")  # pydicom reads a command set as implicit VR
    if group << 16 | elem == _ITEM_END:
        raise _Decline("malformed")  # pydicom's meta reading consumes it and reads on after it
    meta = {}
    for tag, keyword in ((_MEDIA_SOP_CLASS, "MediaStorageSOPClassUID"),
                         (_TRANSFER_SYNTAX, "TransferSyntaxUID")):
        if tag in raw:
            # As str(pydicom's UI value).strip("\0 "): convert_UI strips trailing NULs and spaces,
            # the UID class any whitespace. A multi-valued UID is not plausible.
            value = raw[tag].decode("latin-1").rstrip("\0 ").strip().strip("\0 ")
            if "\\" in value:
                raise _Decline("malformed")
            if value:
                meta[keyword] = value
    return meta, pos


def _value(source: _Source, start: int, length: int) -> bytes:
    data = source.data
    off = start - source.base
    if off + length > len(data):
        data = source.window(start, length)
        off = 0
    return data[off:off + length]


def _elements(source: _Source, pos: int, end: int | None, table: _Table, collected: list,
              top: bool) -> int:
    """The elements of one dataset from ``pos``; returns the offset after them.

    The top level (``top``) ends at pixel data, an item delimiter or the end of the file; an item
    ends at ``end`` (defined length) or at its item delimiter (``end`` None). Needed values are
    appended to ``collected`` as (attribute, raw bytes or list of item lists), the Specific
    Character Set as (None, raw bytes).
    """
    data, base = source.data, source.base
    data_end = base + len(data)
    size = source.size
    limit = _NO_END if end is None else end
    first_stop = _FIRST_STOP
    budget = source.budget
    header = _HEADER
    vr_header = _VR_HEADER
    get_needed = table.get
    walk = _compiled_walk
    vr_table = _VR_HEADER_TABLE
    prev = -1
    count = charged = 0  # elements walked, and charged to the budget (READ_COST each)
    last_end = 0  # end of the last defined-length element, as header._ends_inside_header sees it
    while True:
        if pos >= limit:
            if pos > limit:
                raise _Decline("malformed")
            budget.charge((count - charged) * READ_COST, calls=0)
            return pos
        if pos + 12 > data_end:
            budget.charge((count - charged) * READ_COST, calls=0)
            charged = count
            data = source.window(pos, 12)
            base, size = pos, source.size
            data_end = base + len(data)
        if pos + 8 > size:
            if not top:
                raise _Decline("malformed")  # file ends inside a sequence: pydicom raises
            # End of file, maybe inside an element's 8-byte header (pydicom stops silently).
            if count == 0 or (0 < last_end < size and size - last_end < 12):
                raise _Truncated
            return pos
        if walk is not None:
            # Plain elements in C; whatever it stops at is handled below, with every check.
            pos, prev, walked, last_end = walk(data, base, pos, limit if limit < size else size, prev,
                                               table, collected, last_end, vr_table, _CHARSET)
            if walked:
                count += walked
                continue
        off = pos - base
        group, elem, vr, length = header(data, off)
        tag = group << 16 | elem
        header_size = vr_header.get(vr)
        if tag >= first_stop and (tag == _ITEM_END or (top and tag in _PIXEL_TAGS)):
            budget.charge((count - charged) * READ_COST, calls=0)
            if top:  # pydicom stops here (at an item delimiter it ends the dataset)
                if header_size == 12 and pos + 12 > size:
                    raise _Decline("malformed")  # pydicom reads the 4-byte length and fails
                if count == 0:
                    raise _Truncated  # pydicom's dataset is empty
                return pos
            if end is not None or _ITEM(data, off)[2]:
                raise _Decline("malformed")
            return pos + 8
        if header_size is None or not 0 < group < 0xFFFE:
            raise _Decline("command-group" if top and group == 0 and count == 0 else "malformed")
        if tag <= prev:
            raise _Decline("out-of-order")
        if header_size == 12:
            if pos + 12 > size:
                raise _Decline("malformed")  # pydicom raises struct.error on a cut 12-byte header
            length = _LONG(data, off + 8)[0]
        start = pos + header_size
        entry = get_needed(tag)
        if length == _UNDEFINED:
            if vr != _SQ:
                raise _Decline("malformed")  # undefined length UN (implicit VR SQ) or other oddity
            if entry is None:
                _, pos = _sequence(source, start, None, _NO_TABLE)
            else:
                if entry[1] is None:
                    raise _Decline("malformed")  # a non-SQ attribute encoded as a sequence
                items, pos = _sequence(source, start, None, entry[1])
                collected.append((entry[0], items))
            data, base, size = source.data, source.base, source.size
            data_end = base + len(data)
            budget.charge((count - charged) * READ_COST, calls=0)
            charged = count
        else:
            pos = start + length
            if pos > limit:
                raise _Decline("malformed")
            if pos > size:
                if not top or (entry is not None and entry[1] is not None):
                    raise _Decline("malformed")  # pydicom would parse the cut sequence bytes
                if tag == _CHARSET:
                    _check_charset(_value(source, start, size - start), vr, source)  # pydicom converts the rest
                raise _Truncated
            if entry is not None and entry[1] is not None:
                if vr != _SQ:
                    raise _Decline("malformed")  # e.g. UN: pydicom re-reads it as implicit VR
                if length:
                    items, _ = _sequence(source, start, pos, entry[1])
                    collected.append((entry[0], items))
                    data, base, size = source.data, source.base, source.size
                    data_end = base + len(data)
            elif entry is not None:
                if vr == _SQ:
                    raise _Decline("malformed")
                if tag == _CHARSET and not length:
                    _check_charset(b"", vr, source)
                if length:
                    if pos > data_end:
                        data = source.window(start, length)
                        base = start
                        data_end = base + len(data)
                    value = data[start - base:pos - base]
                    if tag == _CHARSET:
                        _check_charset(value, vr, source)
                        collected.append((None, value))
                        if entry[0] is not None:
                            collected.append((entry[0], value))  # recorded too (in an item)
                    else:
                        collected.append((entry[0], value))
            last_end = pos
        prev = tag
        count += 1


def _sequence(source: _Source, pos: int, end: int | None, table: _Table) -> tuple[list, int]:
    """Items of a sequence starting at ``pos`` (``end`` None: undefined length), each a list of
    collected values; returns them and the offset after the sequence."""
    items = []
    while True:
        if end is not None and pos >= end:
            if pos > end:
                raise _Decline("malformed")
            return items, pos
        if pos + 8 > source.size:
            raise _Decline("malformed")  # file ends inside a sequence: pydicom raises
        data = source.data
        if pos + 8 > source.base + len(data):
            data = source.window(pos, 8)
        group, elem, length = _ITEM(data, pos - source.base)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            if end is not None:
                # pydicom parses a defined-length sequence from its value bytes and stops here,
                # ignoring anything left in the value
                return items, end
            if length:
                raise _Decline("malformed")
            return items, pos
        if tag != _ITEM_TAG:
            raise _Decline("malformed")
        item: list = []
        if length == _UNDEFINED:
            pos = _elements(source, pos, None, table, item, False)
        else:
            item_end = pos + length
            if end is not None and item_end > end:
                raise _Decline("malformed")
            pos = _elements(source, pos, item_end, table, item, False)
        items.append(item)


_CHARSETS_KEPT = 256  # (0008,0005) values known good, per spec (so per worker); emptied when full


def _check_charset(value: bytes, vr: bytes, source: _Source) -> None:
    """pydicom converts each (0008,0005) while reading and fails the file if that raises (e.g. a
    NUL inside a term), and converts it once more by its VR at the end of the dataset (a numeric VR
    fails there): leave such files to pydicom."""
    if vr != b"CS":
        raise _Decline("malformed")
    if value in source.charsets:  # (a worker's files use a few values: each converted once)
        return
    try:
        convert_encodings(convert_string(value, True))
    except Exception:  # noqa: BLE001 -- whatever pydicom would raise, it decides
        raise _Decline("malformed") from None
    if len(source.charsets) >= _CHARSETS_KEPT:
        source.charsets.clear()
    source.charsets.add(value)
