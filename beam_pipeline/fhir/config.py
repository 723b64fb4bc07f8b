"""The mapping's options (``ConversionConfig``): id systems, time zone, which resources to write.

The CLI builds one per run; the builders take it, never an argparse Namespace or a dict.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STUDY_ID_SYSTEM = "https://fhir.diz.uk-erlangen.de/identifiers/imagingstudy-id"
DEFAULT_PATIENT_ID_SYSTEM = "https://fhir.diz.uk-erlangen.de/identifiers/patient-id"
DEFAULT_ENCOUNTER_ID_SYSTEM = "https://fhir.diz.uk-erlangen.de/identifiers/encounter-id"


@dataclass(frozen=True)
class ConversionConfig:
    """Options of the mapping; defaults follow the converter we grow from."""

    study_id_system: str = DEFAULT_STUDY_ID_SYSTEM
    patient_id_system: str = DEFAULT_PATIENT_ID_SYSTEM
    accession_id_system: str | None = None
    encounter_id_system: str = DEFAULT_ENCOUNTER_ID_SYSTEM
    patient_id_length: int | None = None
    timezone: str = "Europe/Berlin"
    include_instances: bool = True
    include_devices: bool = True
    observations: bool = False
    dose_reports: bool = True   # Observations from X-Ray Radiation Dose SRs (``dose``)
    patients: bool = False      # minimal Patient for each subject reference
    encounters: bool = False    # minimal Encounter for each encounter reference
    bundles: bool = False       # one transaction Bundle per study as well
    service_requests: bool = False  # minimal ServiceRequest for each basedOn (accession number)
    # Where the studies came from (meta.source): the DICOMweb base or the input root as a URI.
    source: str | None = None
    # DICOMweb (WADO-RS) service base of the Endpoint every study references; None: no endpoint.
    wado_rs_base: str | None = None
    # (issuer, system) pairs: IssuerOfPatientID (or the qualifiers' UniversalEntityID) -> system.
    # The issuer "" stands for studies without an issuer (default: patient_id_system).
    patient_id_issuers: tuple[tuple[str, str], ...] = ()
    # A PatientID whose issuer is not in the table: "reject" its study, or take the "default" system.
    unknown_patient_id_issuer: str = "reject"
