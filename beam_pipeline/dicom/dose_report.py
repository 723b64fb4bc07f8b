"""X-Ray Radiation Dose SR: the dose values of its content tree as plain data (``DoseReport``).

A dose report (SOP class 1.2.840.10008.5.1.4.1.1.88.67, root concept (113701, DCM, "X-Ray
Radiation Dose Report")) carries its numbers in a tree of content items built from TID 10011 (CT)
or TID 10001 (projection X-ray). The header readers skip that tree; for these few, small files
(no pixel data) ``header`` hands the pydicom dataset to :func:`read_report`, which walks the tree
and keeps the NUM and DATETIME items whose DCM concept the caller asks for, each with the context
that gives it meaning: the container it sits in, the Irradiation Event UID of its event and the
acquisition plane. Values stay as written (text); judging them (numbers, units, nesting) is the
mapping's business. Knows no FHIR.
"""
from __future__ import annotations

from typing import Iterable

from beam_pipeline.dicom.records import DoseItem, DoseReport

DOSE_SR_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.88.67"})  # X-Ray Radiation Dose SR
ROOT_CONCEPT = "113701"            # X-Ray Radiation Dose Report
PROCEDURE_REPORTED = "121058"
IRRADIATION_EVENT_UID = "113769"
ACQUISITION_PLANE = "113764"

MAX_DEPTH = 16          # real reports nest 3-4 levels
MAX_ITEMS = 200_000     # content items walked per report (a CT report has a few hundred)

# Tags (pydicom keywords cost a dictionary look-up each; these are read per content item).
_VALUE_TYPE = 0x0040A040
_CONCEPT_NAME = 0x0040A043
_CONTENT = 0x0040A730
_MEASURED_VALUE = 0x0040A300
_NUMERIC_VALUE = 0x0040A30A
_UNITS = 0x004008EA
_DATETIME = 0x0040A120
_UID = 0x0040A124
_CONCEPT_CODE = 0x0040A168
_CODE_VALUE = 0x00080100
_SCHEME = 0x00080102
_MEANING = 0x00080104

# Problems a report can have (the mapping turns them into notes).
NOT_A_DOSE_REPORT = "root"    # the SOP class says dose report, the root concept does not
TOO_DEEP = "depth"            # containers nested deeper than MAX_DEPTH: the rest is not read
TOO_MANY = "items"            # more than MAX_ITEMS content items: the rest is not read
UNREADABLE = "unreadable"     # pydicom could not read the content tree
TOO_LARGE = "too-large"       # reading the whole dataset needed more than the header budget


def is_dose_report(record: dict) -> bool:
    return record.get("SOPClassUID") in DOSE_SR_CLASSES


def _text(ds, tag: int) -> str:
    """The first value of an element as text ("" when absent or empty), without converting it
    through its VR (a NumericValue that is not a number must not raise here)."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").split("\\")[0].strip("\0 ").strip()
    if not isinstance(value, (str, int, float)):  # a multi-valued element: its first value
        value = next(iter(value), "")
    if isinstance(value, float):  # DS read from DICOM JSON, where it is a number, not text
        original = getattr(value, "original_string", None)
        value = original if isinstance(original, str) else _float_text(value)
    return str(value).strip("\0 ").strip()


def _float_text(value: float) -> str:
    """The shortest text of a number (``2.0`` -> ``2``), as a file would carry it."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _meaning(ds) -> str:
    """CodeMeaning decoded with the report's character set (pydicom's conversion)."""
    try:
        value = ds.get(_MEANING)
    except Exception:  # a meaning that does not decode is only left out
        return ""
    text = value.value if value is not None else None
    return text.strip() if isinstance(text, str) else ""


def _items(ds, tag: int) -> list:
    elem = ds.get(tag)
    value = elem.value if elem is not None else None
    return list(value) if value else []


def _code(ds, tag: int) -> tuple[str, str]:
    """(scheme, code value) of the first item of a code sequence, ("", "") when there is none."""
    items = _items(ds, tag)
    if not items:
        return "", ""
    return _text(items[0], _SCHEME), _text(items[0], _CODE_VALUE)


class _Walk:
    def __init__(self, concepts: frozenset[str]):
        self.concepts = concepts
        self.items: list[DoseItem] = []
        self.problems: list[str] = []
        self.procedure = ("", "", "")
        self.seen = 0

    def container(self, ds, concept: str, event: str, plane: str, depth: int) -> None:
        children = _items(ds, _CONTENT)
        self.seen += len(children)
        if self.seen > MAX_ITEMS:
            self.problems.append(TOO_MANY)
            return
        kids = [(child, _text(child, _VALUE_TYPE), _code(child, _CONCEPT_NAME)) for child in children]
        for child, value_type, (scheme, code) in kids:  # the context first: it may follow the values
            if scheme != "DCM":
                continue
            if value_type == "UIDREF" and code == IRRADIATION_EVENT_UID:
                event = _text(child, _UID) or event
            elif value_type == "CODE" and code == ACQUISITION_PLANE:
                plane = _code(child, _CONCEPT_CODE)[1] or plane
            elif value_type == "CODE" and code == PROCEDURE_REPORTED and depth == 0:
                items = _items(child, _CONCEPT_CODE)
                if items:
                    self.procedure = (_text(items[0], _SCHEME), _text(items[0], _CODE_VALUE), _meaning(items[0]))
        for child, value_type, (scheme, code) in kids:
            if value_type == "CONTAINER":
                if depth + 1 > MAX_DEPTH:
                    self.problems.append(TOO_DEEP)
                    continue
                self.container(child, code if scheme == "DCM" else "", event, plane, depth + 1)
                if TOO_MANY in self.problems:
                    return
            elif scheme == "DCM" and code in self.concepts and value_type in ("NUM", "DATETIME"):
                self.items.append(self._value(child, value_type, code, concept, event, plane))

    @staticmethod
    def _value(item, value_type: str, code: str, container: str, event: str, plane: str) -> DoseItem:
        if value_type == "DATETIME":
            return DoseItem(code, _text(item, _DATETIME), "", "", container, event, plane)
        measured = _items(item, _MEASURED_VALUE)
        value = unit = scheme = ""
        if measured:
            value = _text(measured[0], _NUMERIC_VALUE)
            scheme, unit = _code(measured[0], _UNITS)
        return DoseItem(code, value, unit, scheme, container, event, plane)


def read_report(ds, concepts: Iterable[str]) -> DoseReport:
    """The wanted values of a dose report's content tree; never raises (problems say what failed)."""
    try:
        root = _code(ds, _CONCEPT_NAME)
        if _text(ds, _VALUE_TYPE) != "CONTAINER" or root != ("DCM", ROOT_CONCEPT):
            return DoseReport(problems=(NOT_A_DOSE_REPORT,))
        walk = _Walk(frozenset(concepts))
        walk.container(ds, ROOT_CONCEPT, "", "", 0)
    except Exception:  # pydicom raises many types on a corrupt nested item; the report is the problem
        return DoseReport(problems=(UNREADABLE,))
    return DoseReport(walk.procedure, tuple(walk.items), tuple(dict.fromkeys(walk.problems)))
