"""DICOM archive → FHIR R4 ImagingStudy/Device NDJSON, as an Apache Beam pipeline.

``python -m beam_pipeline`` runs the CLI (``run/cli.py``); ``beam_pipeline.run.convert.convert_files``
is the same conversion without Beam. The wings and their import rules: docs/layout.md.
"""

import logging as _logging


class _KnownHarmless(_logging.Filter):
    """Drops the one warning every ``import apache_beam`` prints without apitools installed (it
    concerns BigQuery, which this tool never uses); every other record passes. Installed when the
    package is first imported, before Beam is, in every process: the CLI's and every worker's
    (multi-processing, portable and Dask workers import this package to unpickle its steps)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not (record.name == "root" and record.getMessage().startswith("apitools not found"))


_logging.getLogger().addFilter(_KnownHarmless())
