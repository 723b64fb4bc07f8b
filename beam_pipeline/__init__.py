"""DICOM archive → FHIR R4 ImagingStudy/Device NDJSON, as an Apache Beam pipeline.

``python -m beam_pipeline`` runs the CLI (``run/cli.py``); ``beam_pipeline.run.convert.convert_files``
is the same conversion without Beam. The wings and their import rules: docs/layout.md.
"""
