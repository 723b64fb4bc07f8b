"""Field specs the reader tests and the fuzz campaign read files with (besides the default one)."""
from __future__ import annotations

from beam_pipeline.dicom import fields
from beam_pipeline.fhir import keywords

CODE_ITEMS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")

# Needs nothing past group 0028 (the scanner walks on to pixel data without decoding).
CORE_SPEC = fields.build_spec(
    [*keywords.CORE_KEYWORDS.values(),
     ("ProcedureCodeSequence", "ImageType", "PixelSpacing", "KVP", "InstitutionName")],
    {"ProcedureCodeSequence": CODE_ITEMS, **keywords.CORE_SEQUENCE_ITEM_KEYWORDS},
)
# Reaches (5200,9229): sequences at several depths, text in other character sets, numbers.
WIDE_SPEC = fields.build_spec(
    [*keywords.CORE_KEYWORDS.values(),
     ("ImageType", "PixelSpacing", "KVP", "InstitutionName", "StationName", "StudyID",
      "AdditionalPatientHistory", "PatientAddress", "PatientComments", "ImageComments",
      "SoftwareVersions", "OtherPatientIDs", "SliceThickness", "Rows", "Columns", "WindowCenter",
      "RescaleSlope", "ImagePositionPatient", "CodeValue", "ProcedureCodeSequence",
      "RequestedProcedureCodeSequence", "SourceImageSequence", "DerivationCodeSequence",
      "ReferencedImageSequence", "RequestAttributesSequence", "PerformedProcedureCodeSequence",
      "ConceptNameCodeSequence", "ReferencedSeriesSequence", "SharedFunctionalGroupsSequence",
      "DirectoryRecordSequence")],
    {
        **keywords.CORE_SEQUENCE_ITEM_KEYWORDS,
        "ProcedureCodeSequence": CODE_ITEMS,
        "RequestedProcedureCodeSequence": (*CODE_ITEMS, "SpecificCharacterSet"),
        "DerivationCodeSequence": CODE_ITEMS,
        "PerformedProcedureCodeSequence": CODE_ITEMS,
        "ConceptNameCodeSequence": CODE_ITEMS,
        "PurposeOfReferenceCodeSequence": CODE_ITEMS,
        "ScheduledProtocolCodeSequence": CODE_ITEMS,
        "SourceImageSequence": ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID",
                                "PurposeOfReferenceCodeSequence"),
        "ReferencedImageSequence": ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"),
        "RequestAttributesSequence": ("RequestedProcedureID", "ScheduledProcedureStepID",
                                      "ScheduledProtocolCodeSequence"),
        "ReferencedSeriesSequence": ("SeriesInstanceUID", "ReferencedInstanceSequence"),
        "ReferencedInstanceSequence": ("ReferencedSOPInstanceUID",),
        "SharedFunctionalGroupsSequence": ("PixelMeasuresSequence", "PlaneOrientationSequence"),
        "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
        "PlaneOrientationSequence": ("ImageOrientationPatient",),
        "DirectoryRecordSequence": ("DirectoryRecordType", "ReferencedFileID", "PatientID"),
    },
)
SPECS = {"core": CORE_SPEC, "wide": WIDE_SPEC, "default": keywords.header_spec()}
