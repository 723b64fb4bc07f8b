"""Radiation dose reports (``dicom.records.DoseReport``) -> Observations, after the HL7 Radiation
Dose Summary IG (http://hl7.org/fhir/uv/radiation-dose-summary, R4). Pure functions over plain data.

Per dose report (an X-Ray Radiation Dose SR instance):

- one *summary* Observation shaped as the IG's ``RadiationDoseSummary`` (code LOINC 73569-6,
  identifier the SR's SOP Instance UID, ``partOf`` and ``focus`` its ImagingStudy, ``subject``,
  ``effectiveDateTime`` the start of irradiation, ``valueString`` a one-line summary, ``device``
  the modality, ``component`` the accumulated values with DCM codes and UCUM quantities, including
  ``Procedure reported`` (121058));
- one *irradiation event* Observation per CT irradiation event with per-event values (code DCM
  113852, identifier its Irradiation Event UID, components Mean CTDIvol and DLP), after the IG's
  ballot profile ``ct-irradiation-event-summary`` (0.1.0; 1.0.0 dropped per-event resources), and
  listed in the summary's ``hasMember``.

The profiles are not claimed in ``meta.profile``: the IG requires ``performer`` (the irradiation
authorizing Practitioner), which this converter does not write, and its own ``ModalityDevice``.

The values are taken as the report writes them: a value must be a number with a UCUM unit; the
unit the template prescribes is expected, another UCUM unit is kept as written (and noted). Whatever
does not fit is left out and counted in ``notes`` (``kind:dose-report.<concept>``), never fatal.
Ids are hashes: ``sha256(SOP Instance UID | 113701)`` for the summary, ``sha256(SOP Instance UID
| 113852 | Irradiation Event UID)`` for an event.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, NamedTuple

from beam_pipeline.codes import DCM_SYSTEM, sha256_id
from beam_pipeline.dicom.records import DoseItem, DoseReport
from terminologies import SYSTEMS

UCUM = "http://unitsofmeasure.org"
LOINC_SYSTEM = "http://loinc.org"
RDS_IG = "http://hl7.org/fhir/uv/radiation-dose-summary/"
IDENTIFIER_TYPE = RDS_IG + "CodeSystem/dicom-identifier-type"
SUMMARY_CODE = ("73569-6", "Radiation exposure and protection information [Description] Document Diagnostic imaging")
ROOT_CONCEPT = "113701"                       # X-Ray Radiation Dose Report
EVENT_CODE = ("113852", "Irradiation Event")
PROCEDURE_REPORTED = ("121058", "Procedure reported")
WHAT = "dose-report"                          # the "what" of the notes

REPORT, EVENT = "report", "event"


class Concept(NamedTuple):
    """One dose value the mapping takes from a report, as TID 10011 / TID 10001 define it."""

    code: str        # DCM concept of the NUM content item
    display: str
    unit: str        # UCUM unit the template prescribes
    level: str       # REPORT: accumulated, on the summary; EVENT: per irradiation event
    container: str   # DCM concept of the container the template puts it in


CONCEPTS = (
    # CT (TID 10012 CT Accumulated Dose Data; TID 10013 CT Irradiation Event Data, its CT Dose container)
    Concept("113812", "Total Number of Irradiation Events", "{events}", REPORT, "113811"),
    Concept("113813", "CT Dose Length Product Total", "mGy.cm", REPORT, "113811"),
    Concept("113830", "Mean CTDIvol", "mGy", EVENT, "113829"),
    Concept("113838", "DLP", "mGy.cm", EVENT, "113829"),
    # projection X-ray (TID 10002 Accumulated X-Ray Dose Data, with TID 10004 included)
    Concept("113722", "Dose Area Product Total", "Gy.m2", REPORT, "113702"),
    Concept("113726", "Fluoro Dose Area Product Total", "Gy.m2", REPORT, "113702"),
    Concept("113727", "Acquisition Dose Area Product Total", "Gy.m2", REPORT, "113702"),
    Concept("113725", "Dose (RP) Total", "Gy", REPORT, "113702"),
    Concept("113730", "Total Fluoro Time", "s", REPORT, "113702"),
)
BY_CODE = {concept.code: concept for concept in CONCEPTS}
START_OF_IRRADIATION = "113809"  # DATETIME at the root (TID 10011)
EVENT_STARTED = "111526"         # DATETIME Started of an irradiation event
# What the dose report reader is asked to keep (handed to it as data through the FieldSpec).
READ_CONCEPTS = frozenset({*BY_CODE, START_OF_IRRADIATION, EVENT_STARTED})

PLANES = {"113620": "Plane A", "113621": "Plane B", "113622": "Single Plane", "113890": "All Planes"}
PROBLEM_NOTES = {  # DoseReport.problems -> notes
    "root": f"unexpected-root:{WHAT}", "depth": f"too-deep:{WHAT}", "items": f"too-many-items:{WHAT}",
    "unreadable": f"unreadable:{WHAT}", "too-large": f"too-large:{WHAT}",
}

_FHIR_CODE = re.compile(r"^[^\s]+( [^\s]+)*$")
_DT = re.compile(r"^(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$")
_MAX_EXACT_INT = 2 ** 53


class DoseContext(NamedTuple):
    """What the Observations of one report take from its study."""

    sop_uid: str
    study_uid: str
    study_reference: str                 # "ImagingStudy/<id>"
    subject: dict
    started: str | None                  # the study's start: the fallback effectiveDateTime
    device_reference: str | None         # "Device/<id>" of the report's series, if written
    to_datetime: Callable[[str, str | None, str | None, str], str | None]  # (date, time, offset, what)


def _note(notes: Counter, kind: str, concept: str = "") -> None:
    notes[f"{kind}:{WHAT}.{concept}" if concept else f"{kind}:{WHAT}"] += 1


def _number(text: str):
    """int (integral values) or float of a DS value as written, None when it is not a finite number."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if value.is_integer() and abs(value) < _MAX_EXACT_INT:
        return int(value)  # 310 and 310.0 are the same value, whichever source wrote it
    return value


def _quantity(item: DoseItem, concept: Concept, notes: Counter) -> dict | None:
    """The valueQuantity of a NUM item, or None (noted) when it has no number or no UCUM unit."""
    if not item.value:
        _note(notes, "no-value", concept.code)
        return None
    number = _number(item.value)
    if number is None:
        _note(notes, "unparseable", concept.code)
        return None
    if number < 0:
        _note(notes, "out-of-range", concept.code)
        return None
    if not item.unit:
        _note(notes, "no-unit", concept.code)
        return None
    if item.unit_scheme != "UCUM" or not _FHIR_CODE.match(item.unit):
        _note(notes, "non-ucum-unit", concept.code)
        return None
    if item.unit != concept.unit:
        _note(notes, "unexpected-unit", concept.code)
    return {"value": number, "unit": item.unit, "system": UCUM, "code": item.unit}


def _text_of(quantity: dict) -> str:
    unit = quantity["unit"]
    unit = unit[1:-1] if unit.startswith("{") and unit.endswith("}") else unit  # {events} -> events
    return f"{quantity['value']} {unit}"


def _component(concept: Concept, quantity: dict, plane: str | None) -> dict:
    code = {"coding": [{"system": DCM_SYSTEM, "code": concept.code, "display": concept.display}]}
    if plane is not None:
        code["text"] = f"{concept.display} ({PLANES.get(plane, 'plane ' + plane if plane else 'no plane')})"
    return {"code": code, "valueQuantity": quantity}


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable()).strip()


def _procedure(report: DoseReport) -> dict | None:
    scheme, code, meaning = report.procedure
    if scheme not in SYSTEMS or not _FHIR_CODE.match(code or ""):
        return None
    coding = {"system": SYSTEMS[scheme], "code": code}
    if _printable(meaning):
        coding["display"] = _printable(meaning)
    return {"code": {"coding": [{"system": DCM_SYSTEM, "code": PROCEDURE_REPORTED[0],
                                 "display": PROCEDURE_REPORTED[1]}]},
            "valueCodeableConcept": {"coding": [coding]}}


def _datetime(text: str, what: str, ctx: DoseContext, notes: Counter) -> str | None:
    match = _DT.match(text)
    if not match:
        _note(notes, "unparseable", what)
        return None
    return ctx.to_datetime(match[1], match[2], match[3], f"{WHAT}.{what}")


def _study_reference(ctx: DoseContext) -> dict:
    return {"reference": ctx.study_reference,
            "identifier": {"type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "study-instance-uid",
                                                "display": "Study Instance UID"}]},
                           "system": "urn:dicom:uid", "value": "urn:oid:" + ctx.study_uid}}


def _identifier(code: str, display: str, uid: str) -> dict:
    return {"type": {"coding": [{"system": IDENTIFIER_TYPE, "code": code, "display": display}]},
            "system": "urn:dicom:uid", "value": "urn:oid:" + uid}


class _Sorted(NamedTuple):
    report: list          # (concept, quantity, plane) of the summary
    events: dict          # event uid -> [(concept, quantity)]
    event_starts: dict    # event uid -> DT text
    start: str            # root Start of X-Ray Irradiation


def _sort(report: DoseReport, notes: Counter) -> _Sorted:
    """The report's items by level, each value once (the first, in document order)."""
    out = _Sorted([], {}, {}, "")
    seen = set()
    start = ""
    for item in report.items:
        if item.concept == START_OF_IRRADIATION:
            start = start or (item.value if not item.event else "")
            continue
        if item.concept == EVENT_STARTED:
            if item.event:
                out.event_starts.setdefault(item.event, item.value)
            continue
        concept = BY_CODE.get(item.concept)
        if concept is None:
            continue
        if concept.level == REPORT and item.event:  # a total inside an event: not the report's total
            _note(notes, "unexpected-nesting", concept.code)
            continue
        if concept.level == EVENT and not item.event:
            _note(notes, "no-event", concept.code)
            continue
        key = (concept.code, item.plane if concept.level == REPORT else item.event)
        if key in seen:
            _note(notes, "duplicate", concept.code)
            continue
        quantity = _quantity(item, concept, notes)
        if quantity is None:
            continue
        seen.add(key)
        if item.container != concept.container:
            _note(notes, "unexpected-nesting", concept.code)
        if concept.level == REPORT:
            out.report.append((concept, quantity, item.plane))
        else:
            out.events.setdefault(item.event, []).append((concept, quantity))
    return out._replace(start=start)


def dose_observations(report: DoseReport, ctx: DoseContext, notes: Counter) -> list[dict]:
    """The summary Observation of one dose report and its irradiation event Observations (the
    summary first); [] when the report yields no value (noted)."""
    for problem in report.problems:
        _note_problem(problem, notes)
    values = _sort(report, notes)
    if not values.report and not values.events:
        if not report.problems:
            _note(notes, "empty")
        return []
    start = _datetime(values.start, START_OF_IRRADIATION, ctx, notes) if values.start else None
    event_starts = {uid: _datetime(started, EVENT_STARTED, ctx, notes) if started else None
                    for uid, started in values.event_starts.items()}  # every event, mapped values or not
    start = start or next((moment for moment in event_starts.values() if moment), None)
    effective = start or ctx.started
    events = [_event(uid, measured, event_starts.get(uid) or effective, ctx) for uid, measured in values.events.items()]
    planes = {plane for _, _, plane in values.report}
    summary = {
        "resourceType": "Observation",
        "id": sha256_id(ctx.sop_uid, ROOT_CONCEPT),
        "identifier": [_identifier("sop-instance-uid", "SOP Instance UID", ctx.sop_uid)],
        "partOf": [_study_reference(ctx)],
        "status": "final",
        "code": {"coding": [{"system": LOINC_SYSTEM, "code": SUMMARY_CODE[0], "display": SUMMARY_CODE[1]}]},
        "subject": dict(ctx.subject),
        "focus": [{"reference": ctx.study_reference}],
    }
    if effective:
        summary["effectiveDateTime"] = effective
    texts = [f"{concept.display}: {_text_of(quantity)}" for concept, quantity, _ in values.report]
    summary["valueString"] = "; ".join(texts) or f"{len(events)} irradiation event(s), see hasMember"
    if ctx.device_reference:
        summary["device"] = {"reference": ctx.device_reference}
    if events:
        summary["hasMember"] = [{"reference": "Observation/" + event["id"]} for event in events]
    components = [c for c in (_procedure(report),) if c]
    components += [_component(concept, quantity, plane if len(planes) > 1 else None)
                   for concept, quantity, plane in values.report]
    if components:
        summary["component"] = components
    return [summary, *events]


def _note_problem(problem: str, notes: Counter) -> None:
    notes[PROBLEM_NOTES.get(problem, f"unreadable:{WHAT}")] += 1


def _event(uid: str, measured: list, effective: str | None, ctx: DoseContext) -> dict:
    event = {
        "resourceType": "Observation",
        "id": sha256_id(ctx.sop_uid, EVENT_CODE[0], uid),
        "identifier": [_identifier("irradiation-event-uid", "Irradiation Event UID", _printable(uid) or "unknown")],
        "partOf": [_study_reference(ctx)],
        "status": "final",
        "code": {"coding": [{"system": DCM_SYSTEM, "code": EVENT_CODE[0], "display": EVENT_CODE[1]}]},
        "subject": dict(ctx.subject),
        "focus": [{"reference": ctx.study_reference}],
    }
    if effective:
        event["effectiveDateTime"] = effective
    event["component"] = [_component(concept, quantity, None) for concept, quantity in measured]
    return event
