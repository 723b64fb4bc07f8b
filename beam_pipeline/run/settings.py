"""One run's settings (``Settings``): where from, where to, how to group, read and validate.

The CLI turns its arguments into these once; the pipeline, the DoFns and ``convert`` take them.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.run.progress import ProgressSettings
from beam_pipeline.sinks.fhir_server import ServerConfig
from beam_pipeline.sources.dicomweb import Source

# Header reads in flight per worker process on object storage. By Little's law, keeping one core
# busy (~3,000 gs:// headers/s at ~0.3 ms of CPU each) at ~20 ms per request needs ~60 in flight.
DEFAULT_READ_CONCURRENCY = 64
# Beam's portable runner puts --job_server_timeout (300 s by default) on the job's state and
# message streams too, so a Prism or Flink job running longer failed with DEADLINE_EXCEEDED: unless
# given, a run waits this long for its job's end.
JOB_SERVER_TIMEOUT = 7 * 24 * 3600


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
    retry_deadline: float | None = None  # seconds a storage request retries transient answers (None: default)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    progress: ProgressSettings | None = None  # None: quiet
    dicomweb: Source | None = None     # instead of input
    request: str = ""                    # the command line without secrets, for manifest.json
    manifest_base_url: str | None = None  # absolute base of the manifest's file URLs (else relative)
    since: str | None = None             # a previous run's output folder: read only what changed since
    fhir_server: ServerConfig | None = None  # also write every study's Bundle to this FHIR server
    stable_after: float = 0.0            # seconds a study's Bundle must be unchanged before it is sent
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # names this run's hidden folders
