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
