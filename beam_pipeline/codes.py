"""Every code a user reads in the output, and the FHIR/DICOM constants, in one place.

Reason codes go into the errors output and ``summary.json["errors_by_reason"]``; docs/output.md's
table mirrors :class:`Reason`. Outcomes partition the input files: each file gets exactly one.
"""
from __future__ import annotations

import hashlib
from enum import StrEnum

from terminologies import SYSTEMS


class Outcome(StrEnum):
    """What happened to one input file (they add up to ``files_matched``)."""

    CONVERTED = "converted"
    DUPLICATE = "duplicate"
    SKIPPED_NOT_DICOM = "skipped_not_dicom"
    SKIPPED_DICOMDIR = "skipped_dicomdir"
    ERROR = "error"
    REJECTED_WITH_STUDY = "rejected_with_study"


class Reason(StrEnum):
    """Why a file, an instance, a folder or a study went to the errors output."""

    # one file
    EMPTY_FILE = "empty-file"
    TRUNCATED = "truncated"
    UNREADABLE = "unreadable"
    NOT_A_REGULAR_FILE = "not-a-regular-file"
    DANGLING_SYMLINK = "dangling-symlink"
    HEADER_TOO_LARGE = "header-too-large"
    MISSING_STUDY_INSTANCE_UID = "missing-study-instance-uid"
    MISSING_SERIES_INSTANCE_UID = "missing-series-instance-uid"
    MISSING_SOP_INSTANCE_UID = "missing-sop-instance-uid"
    MISSING_SOP_CLASS_UID = "missing-sop-class-uid"
    INVALID_UID = "invalid-uid"
    # one study
    CONFLICTING_PATIENT_ID = "conflicting-patient-id"
    CONFLICTING_ACCESSION = "conflicting-accession-number"
    CONFLICTING_DUPLICATE = "conflicting-duplicate-instance"
    MISSING_PATIENT_ID = "missing-patient-id"
    MISSING_MODALITY = "missing-modality"
    UNKNOWN_PATIENT_ID_ISSUER = "unknown-patient-id-issuer"
    INVALID_FHIR = "invalid-fhir"
    # directory mode
    MULTIPLE_STUDIES_IN_DIRECTORY = "multiple-studies-in-directory"
    STUDY_IN_REJECTED_DIRECTORY = "study-in-rejected-directory"
    # DICOMweb source
    STUDY_NOT_FOUND = "study-not-found"
    FETCH_FAILED = "fetch-failed"
    # FHIR server sink (--fhir-server): the server refused a study's transaction (or a deletion)
    FHIR_SERVER_REFUSED = "fhir-server-refused"
    # storage or server still failing after the retry deadline: worth trying again later
    UNAVAILABLE = "unavailable"


# Failures that a later run may not repeat (storage or server faults, not the file's content): an
# incremental run reads these files again, and the run's exit code marks it incomplete.
TRANSIENT_REASONS = frozenset({Reason.UNAVAILABLE, Reason.FETCH_FAILED})
# Exit code of a run that finished but left files unread for a transient reason (a scheduler retries).
EXIT_INCOMPLETE = 4


class SourceUnavailable(OSError):
    """Storage or a server still failing transiently after the retry deadline: the file is
    reported as ``unavailable`` (never as ``unreadable``), whatever reader was holding it."""


# Key of a record's list of keywords whose values did not parse (see ``fields``).
INVALID_KEY = "_invalid"
# Key of a dose report's values in its instance record (a ``dicom.records.DoseReport``).
DOSE_REPORT_KEY = "_dose_report"

# FHIR systems and profiles.
MII_BASE = "https://www.medizininformatik-initiative.de/fhir/ext/modul-bildgebung/"
MII_STRUCTURE = MII_BASE + "StructureDefinition/"
IMAGING_STUDY_PROFILE = MII_STRUCTURE + "mii-pr-bildgebung-bildgebungsstudie"
DEVICE_PROFILE = MII_STRUCTURE + "mii-pr-bildgebung-geraet"
DCM_SYSTEM = SYSTEMS["DCM"]  # the coding-scheme table of the terminologies is the one source
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

RESOURCE_TYPES = ("ImagingStudy", "Device", "Observation", "Patient", "Encounter", "Endpoint", "ServiceRequest",
                  "Bundle")
# Built by several studies alike (same id, same content): written once per run.
SHARED_TYPES = ("Device", "Patient", "Encounter", "Endpoint", "ServiceRequest")
ENDPOINT_CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
ENDPOINT_PAYLOAD_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"


def sha256_id(*parts: str) -> str:
    """Content id of the README: sha256 hex of the parts joined by ``|``."""
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()


# Code system of the reason codes in the OperationOutcome error files (``bulk_data.error_outcome``).
REASON_SYSTEM = "urn:dicom-fhir-beam:reason"
