"""Bounded sources of header bytes: a read budget per header, and deflated data inflated on demand.

One odd file must not cost a run its memory or hours: a ``DICM`` preamble followed by 2 GiB of
zeros is, to pydicom, 268 million empty implicit VR elements; a 1 MB deflated file can inflate to
1 GiB. Both readers therefore draw on a :class:`Budget` per header -- the bytes they read plus a
fixed cost per read call (or per element walked), so a header of millions of empty elements runs out
as fast as one of huge values -- and raise :class:`HeaderTooLarge` when it is spent. Values that
are only skipped (seeked over) cost nothing, so a 512 MiB private element is not a problem.
"""
from __future__ import annotations

import io
import zlib
from typing import BinaryIO

MAX_HEADER_BYTES = 64 * 1024 * 1024  # default budget of one header
READ_COST = 256  # charged per read call / element on top of its bytes (a quarter million at most)
_INFLATE_IN = 64 * 1024  # compressed bytes fed to the inflater at a time
_INFLATE_OUT = 256 * 1024  # most inflated bytes produced per step
_KEEP_BEHIND = 64 * 1024  # inflated bytes kept before the position (pydicom rewinds a few bytes)


class HeaderTooLarge(Exception):
    """The header needs more reading than the budget allows (reason ``header-too-large``)."""


class Budget:
    """What one header may cost: ``max_bytes`` of reads, each read call charged READ_COST extra."""

    __slots__ = ("max_bytes", "left")

    def __init__(self, max_bytes: int = MAX_HEADER_BYTES):
        self.max_bytes = max_bytes
        self.left = max_bytes

    def charge(self, nbytes: int, calls: int = 1) -> None:
        self.left -= nbytes + calls * READ_COST
        if self.left < 0:
            raise HeaderTooLarge(
                f"the header needs more than {_amount(self.max_bytes)} of reading "
                f"(or more than {self.max_bytes // READ_COST} elements) before its end or pixel data"
            )


def _amount(nbytes: int) -> str:
    return f"{nbytes // (1024 * 1024)} MiB" if nbytes >= 1024 * 1024 else f"{nbytes // 1024} KiB"


class BoundedReader:
    """A seekable file seen through a budget: reads are charged (only what the file can give), seeks
    are free. Handed to pydicom so that it cannot walk gigabytes of zeros or read huge values.

    A plain class with the few methods pydicom calls: it sits on pydicom's hottest path (a few
    reads per element).
    """

    __slots__ = ("_fp", "_size", "_budget", "_pos")

    def __init__(self, fp: BinaryIO, size: int, budget: Budget):
        self._fp = fp
        self._size = size
        self._budget = budget
        self._pos = fp.tell()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._fp.seek(offset, whence)
        self._pos = self._fp.tell()
        return self._pos

    def read(self, size: int = -1) -> bytes:
        can = self._size - self._pos
        if size is None or size < 0 or size > can:
            size = can if can > 0 else 0
        budget = self._budget
        budget.left -= size + READ_COST
        if budget.left < 0:
            budget.charge(0, calls=0)  # raises HeaderTooLarge
        data = self._fp.read(size)
        self._pos += len(data)
        return data


class InflatedStream(io.RawIOBase):
    """The dataset of a deflated file (1.2.840.10008.1.2.1.99), inflated only as far as it is read.

    Positions continue from ``offset`` (the end of the file meta) as if the file were not deflated.
    Inflated bytes are charged to the budget whether read or skipped; only the last 64 KiB before
    the position are kept, for the short rewinds pydicom makes. Corrupt or cut-off compressed data
    raises ``zlib.error`` when reading reaches it, as ``zlib.decompress`` does in pydicom.
    """

    def __init__(self, fp: BinaryIO, offset: int, budget: Budget):
        super().__init__()
        self._fp = fp
        self._budget = budget
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._start = offset  # position of self._buffer[0]
        self._pos = offset
        self._ended = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _end(self) -> int:
        return self._start + len(self._buffer)

    def _fill(self, upto: int | None) -> None:
        """Inflate until the data reach position ``upto`` (None: the end) or the stream ends."""
        while not self._ended and (upto is None or self._end() < upto):
            compressed = self._inflater.unconsumed_tail
            if not compressed:
                compressed = self._fp.read(_INFLATE_IN)
                self._budget.charge(len(compressed))
            out = self._inflater.decompress(compressed, _INFLATE_OUT)
            self._budget.charge(len(out), calls=0)
            self._buffer += out
            if self._inflater.eof:
                self._ended = True
            elif not compressed and not out:
                raise zlib.error("the deflated data end before the end of the compressed stream")
            drop = min(self._pos - _KEEP_BEHIND - self._start, len(self._buffer))
            if drop > 0:
                del self._buffer[:drop]
                self._start += drop

    def at_end(self) -> bool:
        """True when nothing follows the position (inflates at most a little to find out)."""
        self._fill(self._pos + 1)
        return self._pos >= self._end()

    def size(self) -> int:
        """Position of the end of the inflated data; only valid once ``at_end()``."""
        return self._end()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            self._fill(None)
            offset += self._end()
        if offset < self._start:
            raise OSError("cannot seek back that far in inflated data")
        self._pos = offset
        return offset

    def read(self, size: int = -1) -> bytes:
        self._budget.charge(0)
        if size is None or size < 0:
            self._fill(None)
            size = max(0, self._end() - self._pos)
        self._fill(self._pos + size)
        begin = self._pos - self._start
        data = bytes(self._buffer[begin:begin + size])
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
