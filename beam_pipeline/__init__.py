"""DICOM archive → FHIR R4 ImagingStudy/Device NDJSON, as an Apache Beam pipeline.

``python -m beam_pipeline`` runs the CLI (``run/cli.py``); ``convert_files`` is the same conversion
without Beam (loaded on first use, so importing the package stays cheap).
"""


def __getattr__(name):
    if name == "convert_files":
        from beam_pipeline.run.convert import convert_files

        return convert_files
    raise AttributeError(f"module 'beam_pipeline' has no attribute {name!r}")
