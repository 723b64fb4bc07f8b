"""DICOM archive → FHIR R4 ImagingStudy/Device NDJSON, as an Apache Beam pipeline."""
