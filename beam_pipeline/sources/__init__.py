"""Where headers come from: files (local folders, globs) and gs:// objects, listed and opened;
DICOMweb servers, searched and fetched. Knows no FHIR and no Beam."""
