"""What a study refers to beyond its series: who the patient is (PatientID and its issuer), which
order it fulfils (``basedOn``, by accession number) and where its images are (``endpoint``).
Pure functions over plain records and the ``ConversionConfig``.

Patient identity: the system of the PatientID comes from a table issuer -> system
(``ConversionConfig.patient_id_issuers``), looked up by IssuerOfPatientID (0010,0021) and then by the
UniversalEntityID of IssuerOfPatientIDQualifiersSequence (0010,0024). A study without an issuer takes
the table's entry for ``""`` or else ``patient_id_system`` (single-source archives, where the issuer is
usually empty, keep the ids they have always had). A study whose issuer is given but not in the table
is rejected (``unknown-patient-id-issuer``) unless ``unknown_patient_id_issuer == "default"``: two
hospitals' equal PatientIDs never become one Patient without the user asking for it.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Mapping

from beam_pipeline.codes import ENDPOINT_CONNECTION_TYPES, ENDPOINT_PAYLOAD_TYPES, V2_0203, sha256_id
from beam_pipeline.fhir.config import ConversionConfig

ACCESSION_ISSUER = "IssuerOfAccessionNumberSequence"
WADO_RS = "dicom-wado-rs"

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")


# --- patient identity ---------------------------------------------------------------------------

def patient_id_system(issuer: tuple[str, str], config: ConversionConfig) -> tuple[str | None, bool]:
    """(system, whether the issuer was known) for a PatientID's ``study.patient_issuer``.

    (None, False) when the issuer is given, not in the table and unknown issuers are rejected.
    """
    table = dict(config.patient_id_issuers)
    local, universal = issuer
    if not local and not universal:
        return table.get("", config.patient_id_system), True
    for key in (local, universal):
        if key and key in table:
            return table[key], True
    if config.unknown_patient_id_issuer == "default":
        return config.patient_id_system, False
    return None, False


def unknown_issuer_detail(issuer: tuple[str, str]) -> str:
    """The rejection's detail: names the issuer (an organisation's namespace, no patient data)."""
    local, universal = issuer
    where = (f"IssuerOfPatientID {ascii(local[:64])}" if local else "")
    if universal:
        where += (" / " if where else "") + f"qualifier UniversalEntityID {ascii(universal[:64])}"
    return f"{where} has no system in the --patient-id-issuers table"


# --- accession number: identifier and basedOn ---------------------------------------------------

def universal_system(item: Mapping) -> str | None:
    """The identifier system a Hierarchic Designator item names globally: an ISO OID, a UUID or a
    URI as its UniversalEntityID (PS3.3 Table 10-17); None for local namespaces and other types."""
    uid, kind = item.get("UniversalEntityID"), item.get("UniversalEntityIDType")
    if not isinstance(uid, str) or not isinstance(kind, str):
        return None
    kind = kind.strip().upper()
    if kind == "ISO" and _OID.fullmatch(uid):
        return "urn:oid:" + uid
    if kind == "UUID" and _UUID.fullmatch(uid):
        return "urn:uuid:" + uid.lower()
    if kind in ("URI", "URL") and _ABSOLUTE_URI.fullmatch(uid):
        return uid
    return None


def accession_system(study: Mapping, config: ConversionConfig, notes: Counter) -> str | None:
    """System of the ACSN identifier: from IssuerOfAccessionNumberSequence where it names a global
    namespace, else ``accession_id_system`` (an issuer that cannot be used is counted)."""
    items = study.get(ACCESSION_ISSUER)
    item = next((i for i in items if isinstance(i, Mapping)), None) if isinstance(items, tuple) else None
    if item:
        system = universal_system(item)
        if system:
            return system
        notes[f"unmapped:{ACCESSION_ISSUER}"] += 1
    return config.accession_id_system


_ACSN_TYPE = {"coding": [{"system": V2_0203, "code": "ACSN"}]}  # one object in all: resources are not changed


def accession_identifier(value: str, system: str | None) -> dict:
    identifier = {"type": _ACSN_TYPE}
    if system:
        identifier["system"] = system
    identifier["value"] = value
    return identifier


def service_request_id(identifier: Mapping) -> str:
    system = identifier.get("system")
    return sha256_id(system, identifier["value"]) if system else sha256_id(identifier["value"])


def based_on(identifier: dict, literal: bool) -> dict:
    """The order a study fulfils: a logical reference by accession number (no ServiceRequest needs to
    exist); with ``literal`` (stubs are written) also ``ServiceRequest/<id>``."""
    reference = {"reference": "ServiceRequest/" + service_request_id(identifier)} if literal else {}
    reference["type"] = "ServiceRequest"
    reference["identifier"] = identifier
    return reference


# --- endpoint -----------------------------------------------------------------------------------

def endpoint(base: str) -> dict:
    """The WADO-RS service a study's images are retrieved from; ``address`` is the service base
    (``{address}/studies/{StudyInstanceUID}`` is the study), so one Endpoint serves every study."""
    return {
        "resourceType": "Endpoint",
        "id": sha256_id(WADO_RS, base),
        "status": "active",
        "connectionType": {"system": ENDPOINT_CONNECTION_TYPES, "code": WADO_RS},
        "name": "DICOMweb WADO-RS",
        "payloadType": [{"coding": [{"system": ENDPOINT_PAYLOAD_TYPES, "code": "any"}], "text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": base,
    }
