"""Typed settings: what the mapping needs (``ConversionConfig``) and what a run needs (``Settings``).

The CLI turns its arguments into these once; the pipeline, the DoFns and ``convert`` take them,
never an argparse Namespace or a dict.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from beam_pipeline.header_io import MAX_HEADER_BYTES

if TYPE_CHECKING:
    from beam_pipeline.progress import ProgressSettings
    from beam_pipeline.dicomweb import Source

# Header reads in flight per worker process on object storage. By Little's law, keeping one core
# busy (~3,000 gs:// headers/s at ~0.3 ms of CPU each) at ~20 ms per request needs ~60 in flight.
DEFAULT_READ_CONCURRENCY = 64
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
    patients: bool = False      # minimal Patient for each subject reference
    encounters: bool = False    # minimal Encounter for each encounter reference
    bundles: bool = False       # one transaction Bundle per study as well


@dataclass(frozen=True)
class Settings:
    """One run: where from (files under ``input``, or a DICOMweb server), where to, how to group,
    read and validate."""

    input: str | None
    output: str
    group_by: str = "study"              # "study" | "directory"
    use_fast_reader: bool = True
    max_header_bytes: int = MAX_HEADER_BYTES  # a header needing more reading: header-too-large
    validate: str = "sampled"            # "sampled" | "full" | "none"
    read_concurrency: int = DEFAULT_READ_CONCURRENCY
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    progress: "ProgressSettings | None" = None  # None: quiet
    dicomweb: "Source | None" = None     # instead of input
    request: str = ""                    # the command line without secrets, for manifest.json
    manifest_base_url: str | None = None  # absolute base of the manifest's file URLs (else relative)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # names this run's hidden folders
