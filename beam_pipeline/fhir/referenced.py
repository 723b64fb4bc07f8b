"""Minimal Patient and Encounter resources for the references a study makes (``--patients``, ``--encounters``).

Servers that enforce referential integrity (HAPI does by default) refuse an ImagingStudy whose
``subject`` or ``encounter`` does not exist. In most platforms those resources come from the patient
data pipeline; for the others we write the least that makes the references resolve: the id the
reference already names and the identifier it already carries. Pure functions over resource dicts.
"""
from __future__ import annotations

from typing import Iterable, Mapping

DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def _target(reference: Mapping, resource_type: str) -> str | None:
    """The id of a literal ``Type/id`` reference to ``resource_type``, else None."""
    text = reference.get("reference") if isinstance(reference, Mapping) else None
    if not isinstance(text, str) or not text.startswith(resource_type + "/"):
        return None
    return text[len(resource_type) + 1:] or None


def patient(subject: Mapping) -> dict | None:
    """The Patient a ``subject`` reference names: its id and MR identifier, nothing invented."""
    patient_id = _target(subject, "Patient")
    if patient_id is None:
        return None
    resource = {"resourceType": "Patient", "id": patient_id}
    if subject.get("identifier"):
        resource["identifier"] = [dict(subject["identifier"])]
    return resource


def encounter(reference: Mapping, subject: Mapping | None) -> dict | None:
    """The Encounter a reference names: id, VN identifier, subject, status ``unknown``.

    R4 requires ``Encounter.class``; DICOM does not say whether the visit was inpatient or
    ambulatory, so the class carries only a data-absent-reason instead of a guessed code.
    """
    encounter_id = _target(reference, "Encounter")
    if encounter_id is None:
        return None
    resource = {"resourceType": "Encounter", "id": encounter_id}
    if reference.get("identifier"):
        resource["identifier"] = [dict(reference["identifier"])]
    resource["status"] = "unknown"
    resource["class"] = {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}
    if subject and _target(subject, "Patient"):
        resource["subject"] = {"reference": subject["reference"]}
    return resource


def service_request(reference: Mapping, subject: Mapping | None) -> dict | None:
    """The ServiceRequest a literal ``basedOn`` names (``--service-requests``): id, the ACSN
    identifier, status ``unknown``, intent ``order`` and the study's subject (R4 requires it)."""
    request_id = _target(reference, "ServiceRequest")
    if request_id is None or not (subject and _target(subject, "Patient")):
        return None
    resource = {"resourceType": "ServiceRequest", "id": request_id}
    if reference.get("identifier"):
        resource["identifier"] = [dict(reference["identifier"])]
    resource["status"] = "unknown"
    resource["intent"] = "order"
    resource["subject"] = {"reference": subject["reference"]}
    return resource


def referenced_resources(resources: Iterable[tuple[str, dict]], patients: bool, encounters: bool
                         ) -> list[tuple[str, dict]]:
    """Patient/Encounter resources for the subject/encounter references of a study's ImagingStudy."""
    out: dict[tuple[str, str], dict] = {}
    for resource_type, resource in resources:
        if resource_type != "ImagingStudy":
            continue
        subject = resource.get("subject")
        if patients and subject and (made := patient(subject)):
            out.setdefault(("Patient", made["id"]), made)
        if encounters and resource.get("encounter") and (made := encounter(resource["encounter"], subject)):
            out.setdefault(("Encounter", made["id"]), made)
    return [(resource_type, out[(resource_type, rid)]) for resource_type, rid in sorted(out)]
