"""DICOM bytes become plain records: the fast header scanner (and its compiled loop), the pydicom
fallback, the budget of one header, DICOM dates, value decoding. Knows no FHIR and no Beam: what
to read is handed in as data (a ``FieldSpec`` built from keyword lists)."""
