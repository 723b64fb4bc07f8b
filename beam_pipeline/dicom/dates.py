"""DICOM dates and times (DA, TM, DT) parsed once, for the FHIR dateTimes and for time arithmetic.

Strict where FHIR needs it: a date is ``YYYYMMDD`` (the ACR-NEMA ``YYYY.MM.DD`` too); a time is
``HH[MM[SS[.F{1,6}]]]`` (colons tolerated); anything else is "unparseable" for the caller to note.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import NamedTuple

_DATE = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TIME = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")


class Clock(NamedTuple):
    hour: int
    minute: int
    second: int
    fraction: str  # the digits after the decimal point as written ("" when none)


def parse_date(text: str | None) -> datetime | None:
    """Midnight of a DICOM DA, or None when it is not a real calendar day."""
    match = _DATE.match(text or "")
    if not match:
        return None
    try:
        return datetime(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def parse_time(text: str | None) -> Clock | None:
    """A DICOM TM, or None when it is not a valid time of day."""
    match = _TIME.match(text or "")
    if not match:
        return None
    clock = Clock(int(match[1]), int(match[2] or 0), int(match[3] or 0), match[4] or "")
    if clock.hour > 23 or clock.minute > 59 or clock.second > 59:
        return None
    return clock


def combine(day: datetime, clock: Clock) -> datetime:
    return day.replace(hour=clock.hour, minute=clock.minute, second=clock.second) + timedelta(
        microseconds=int((clock.fraction + "000000")[:6]))


def parse_datetime(date: str | None, time: str | None) -> datetime | None:
    """A naive datetime from DA + TM, or from a DT passed as ``date`` with ``time`` "" (its UTC
    offset dropped); None unless both a day and at least the hour parse."""
    if not time and date:
        text = re.split(r"[+-]", date, maxsplit=1)[0]  # a DT: YYYYMMDDHH[MM[SS[.F]]][&ZZXX]
        date, time = text[:8], text[8:]
    day, clock = parse_date(date), parse_time(time)
    return combine(day, clock) if day and clock else None
