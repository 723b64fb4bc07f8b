"""Plain records become FHIR resources: grouping per study and the multi-study guard,
ImagingStudy, Device and Observation, the MII extensions, referenced Patient and Encounter,
transaction Bundles, the Bulk Data manifest and error outcomes. Knows no Beam."""
