"""Where resources go besides files: a FHIR server (HTTP client and its credentials); no Beam."""
