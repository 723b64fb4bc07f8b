"""Behaviour of the MII mapping on hand-written records: bad values, fallbacks, study elements."""
import hashlib
import json
from collections import Counter

import pytest
from fhir.resources.R4B.observation import Observation
from pydicom.datadict import dictionary_VR, tag_for_keyword

from beam_pipeline.fhir import mii
from beam_pipeline.fhir.config import DEFAULT_ENCOUNTER_ID_SYSTEM, ConversionConfig
from terminologies import Terminologies

TERMS = Terminologies.load()
SCT = "http://snomed.info/sct"


def subs(extensions, url_suffix):
    ext = next(e for e in extensions if e["url"].endswith(url_suffix))
    return {s["url"]: next(v for k, v in s.items() if k.startswith("value")) for s in ext["extension"]}


def test_declared_keywords_are_dicom_keywords_with_sequences_declared():
    for level in mii.KEYWORDS.values():
        for keyword in level:
            assert tag_for_keyword(keyword) is not None, keyword
            if dictionary_VR(tag_for_keyword(keyword)) == "SQ":
                assert keyword in mii.SEQUENCE_ITEM_KEYWORDS, keyword
    for sequence, items in mii.SEQUENCE_ITEM_KEYWORDS.items():
        assert dictionary_VR(tag_for_keyword(sequence)) == "SQ"
        assert all(tag_for_keyword(k) is not None for k in items)
    assert "CodeValue" in mii.SEQUENCE_ITEM_KEYWORDS["RadionuclideCodeSequence"]
    assert "RadionuclideCodeSequence" in mii.SEQUENCE_ITEM_KEYWORDS["RadiopharmaceuticalInformationSequence"]
    assert "Modality" in mii.KEYWORDS["series"] and "ImageType" in mii.KEYWORDS["instance"]


@pytest.mark.parametrize("modality", ["MG", "CR", "DX"])
def test_projection_modalities_share_one_extension(modality):
    out = mii.series_extensions({"Modality": modality, "KVP": 28.0}, TERMS, True, Counter())
    assert [e["url"] for e in out] == [mii.EXT + "modalitaet-mg-cr-dx"]


def test_other_modalities_get_no_modality_extension():
    assert mii.series_extensions({"Modality": "SR", "KVP": 120.0}, TERMS, True, Counter()) == []


def test_unparseable_values_are_counted_not_raised():
    notes = Counter()
    out = mii.series_extensions({"Modality": "CT", "_invalid": ("KVP", "CTDIvol")}, TERMS, True, notes)
    assert out == []
    assert notes == Counter({"unparseable:KVP": 1, "unparseable:CTDIvol": 1})


GARBAGE = ("", "abc", -1, 0, float("nan"), float("inf"), True, (), ("x", 1), ({},), {"a": 1}, None)


@pytest.mark.parametrize("garbage", GARBAGE, ids=repr)
def test_garbage_never_raises_nor_yields_empty_extensions(garbage):
    keywords = {k for level in mii.KEYWORDS.values() for k in level}
    record = {k: garbage for k in keywords} | {"Modality": "PT", mii.INVALID_KEY: garbage}
    notes = Counter()
    extensions = (mii.series_extensions(record, TERMS, False, notes) + mii.instance_extensions(record, TERMS, notes)
                  + mii.study_elements(record, ConversionConfig(observations=True), TERMS, notes, study_uid="1")
                  .get("extension", []))
    for ext in extensions:
        assert ext.get("extension") or any(k.startswith("value") for k in ext)
        assert not ("extension" in ext and any(k.startswith("value") for k in ext))
    assert json.dumps(extensions, allow_nan=False)  # no NaN/inf leaks into FHIR decimals


def test_zero_quantities_are_unknown():
    notes = Counter()
    out = mii.series_extensions({"Modality": "CT", "KVP": 0.0, "CTDIvol": 3.5}, TERMS, True, notes)
    assert set(subs(out, "modalitaet-ct")) == {"CTDIvol"}
    assert notes["unmapped:KVP"] == 1


def test_output_is_deterministic():
    record = {"Modality": "MR", "ScanningSequence": ("SE", "IR"), "SequenceVariant": ("SK", "SP", "bogus"),
              "EchoTime": 12.0, "ContrastBolusAgent": "Gadovist", "SliceThickness": 3.0}
    runs = [json.dumps(mii.series_extensions(dict(record), TERMS, False, Counter())) for _ in range(3)]
    assert len(set(runs)) == 1


def test_multi_valued_terms_become_codings_of_one_concept_and_unknown_ones_are_counted():
    notes = Counter()
    out = mii.series_extensions({"Modality": "MR", "SequenceVariant": ("SK", "SP", "SK", "XYZ")}, TERMS, True, notes)
    concept = subs(out, "modalitaet-mr")["scanningSequenceVariant"]
    assert [c["code"] for c in concept["coding"]] == ["SK", "SP"]
    assert notes["unmapped:SequenceVariant"] == 1


def test_convolution_kernels_are_kept_together():
    out = mii.series_extensions({"Modality": "CT", "ConvolutionKernel": ("Br40d", "3")}, TERMS, True, Counter())
    assert subs(out, "modalitaet-ct")["convolutionalKernel"] == "Br40d\\3"


def test_enhanced_ct_exposure_attributes_are_fallbacks():
    record = {"Modality": "CT", "ExposureInmAs": 12.5, "XRayTubeCurrentInmA": 250.5, "ExposureTime": 500}
    values = subs(mii.series_extensions(record, TERMS, True, Counter()), "modalitaet-ct")
    assert values["exposure"]["value"] == 12.5 and values["xRayTubeCurrent"]["code"] == "mA"


def test_view_code_sequence_wins_and_view_position_is_the_fallback():
    coded = {"Modality": "MG", "ViewPosition": "CC",
             "ViewCodeSequence": ({"CodeValue": "399368009", "CodingSchemeDesignator": "SCT", "CodeMeaning": "MLO"},)}
    assert subs(mii.series_extensions(coded, TERMS, True, Counter()), "mg-cr-dx")["viewPosition"]["coding"][0][
        "code"] == "399368009"
    legacy = dict(coded, ViewCodeSequence=({"CodeValue": "R-10226", "CodingSchemeDesignator": "SRT"},))
    assert subs(mii.series_extensions(legacy, TERMS, True, Counter()), "mg-cr-dx")["viewPosition"]["coding"][0][
        "code"] == "399162004"  # CC from the table


def test_unknown_view_position_is_noted():
    notes = Counter()
    assert mii.series_extensions({"Modality": "DX", "ViewPosition": "RLD"}, TERMS, True, notes) == []
    assert notes["unmapped:ViewPosition"] == 1


@pytest.mark.parametrize("agent, expected", [
    ("Ultravist 370", [("contrastBolus", True), ("contrastBolusDetails", {"display": "Ultravist 370"})]),
    ("NONE", [("contrastBolus", False)]),
    ("kein km", [("contrastBolus", False)]),
])
def test_contrast(agent, expected):
    notes = Counter()
    out = mii.series_extensions({"Modality": "OT", "ContrastBolusAgent": agent}, TERMS, True, notes)
    assert list(subs(out, "kontrastmittel").items()) == expected
    assert not notes


def test_slice_thickness_moves_to_series_only_without_instances():
    record = {"Modality": "OT", "SliceThickness": 2.5}
    assert mii.series_extensions(record, TERMS, True, Counter()) == []
    out = mii.series_extensions(record, TERMS, False, Counter())
    assert out == [{"url": mii.EXT + "serie-schichtdicke", "valueQuantity": {
        "value": 2.5, "unit": "millimeter", "system": "http://unitsofmeasure.org", "code": "mm"}}]


def _pet(**item):
    return {"Modality": "PT", "RadiopharmaceuticalInformationSequence": (item,)}


def test_tracer_time_wraps_midnight_for_bare_times():
    record = _pet(RadiopharmaceuticalStartTime="233000") | {"SeriesTime": "003000.5"}
    values = subs(mii.series_extensions(record, TERMS, True, Counter()), "modalitaet-pt")
    assert values["tracerExposureTime"]["value"] == 3600.5


def test_tracer_time_spans_days_with_dates():
    record = {**_pet(RadiopharmaceuticalStartDateTime="20240101080000+0100"), "Modality": "NM",
              "SeriesDate": "20240103", "SeriesTime": "080000"}
    values = subs(mii.series_extensions(record, TERMS, True, Counter()), "modalitaet-nm")
    assert values["tracerExposureTime"]["value"] == 2 * 86400


def test_free_text_radiopharmaceutical_is_coded_when_the_table_knows_it():
    notes = Counter()
    values = subs(mii.series_extensions(_pet(Radiopharmaceutical="Fluorodeoxyglucose F^18^"), TERMS, True, notes),
                  "modalitaet-pt")
    assert values["radiopharmaceutical"] == {"coding": [TERMS.radiopharmaceutical("35321007")],
                                             "text": "Fluorodeoxyglucose F^18^"}
    values = subs(mii.series_extensions(_pet(Radiopharmaceutical="FDG"), TERMS, True, notes), "modalitaet-pt")
    assert values["radiopharmaceutical"] == {"text": "FDG"}
    assert notes == Counter({"uncoded:Radiopharmaceutical": 1})


def test_instance_details_and_burned_in_annotation():
    record = {"PixelSpacing": (0.5, 0.25), "ImageType": ("ORIGINAL", "PRIMARY", "M", "ND"), "BurnedInAnnotation": "NO"}
    notes = Counter()
    values = subs(mii.instance_extensions(record, TERMS, notes), "instanz-details")
    assert values["pixelSpacingX"]["value"] == 0.25 and values["pixelSpacingY"]["value"] == 0.5
    assert [c["code"] for c in values["imageType"]["coding"]] == ["ORIGINAL", "PRIMARY"]
    assert values["burnedInAnnotation"] is False
    assert notes["unmapped:ImageType"] == 2


def test_imager_pixel_spacing_is_the_projection_fallback():
    values = subs(mii.instance_extensions({"ImagerPixelSpacing": (0.1, 0.1)}, TERMS, Counter()), "instanz-details")
    assert values["pixelSpacingX"]["value"] == 0.1


def test_no_instance_extension_without_values():
    assert mii.instance_extensions({"SOPInstanceUID": "1.2"}, TERMS, Counter()) == []


CONFIG = ConversionConfig(observations=True)
CONTEXT = {"study_uid": "1.2.840.1", "subject": {"reference": "Patient/p"},
           "started": "2024-07-19T12:03:30+02:00"}


def test_encounter_reference_hashes_system_and_admission_id():
    out = mii.study_elements({"AdmissionID": "V123"}, ConversionConfig(), TERMS, Counter())
    system = DEFAULT_ENCOUNTER_ID_SYSTEM
    assert out == {"encounter": {
        "reference": "Encounter/" + hashlib.sha256(f"{system}|V123".encode()).hexdigest(),
        "identifier": {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "VN",
                                            "display": "Visit number"}]}, "system": system, "value": "V123"}}}
    custom = mii.study_elements({"AdmissionID": "V123"}, ConversionConfig(encounter_id_system="urn:x"), TERMS, Counter())
    assert custom["encounter"]["identifier"]["system"] == "urn:x"
    assert custom["encounter"]["reference"] != out["encounter"]["reference"]


def test_procedure_codes_by_scheme():
    items = ({"CodeValue": "77477000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "CT"},
             {"CodeValue": "24627-2", "CodingSchemeDesignator": "LN", "CodeMeaning": "Chest CT"},
             {"CodeValue": "113091", "CodingSchemeDesignator": "DCM"},
             {"CodeValue": "CTTHX", "CodingSchemeDesignator": "99LOCAL", "CodeMeaning": "CT Thorax"},
             {"CodingSchemeDesignator": "99LOCAL"})
    notes = Counter()
    codes = mii.study_elements({"ProcedureCodeSequence": items}, ConversionConfig(), TERMS, notes)["procedureCode"]
    assert [c.get("coding", [{}])[0].get("system") for c in codes] == [
        SCT, "http://loinc.org", "http://dicom.nema.org/resources/ontology/DCM", None, None]
    assert codes[3] == {"text": "CT Thorax"} and codes[4] == {"text": "99LOCAL"}
    assert notes == Counter({"uncoded:ProcedureCodeSequence": 2})


def test_reason_for_request_joins_distinct_reasons():
    study = {"RequestAttributesSequence": ({"ReasonForTheRequestedProcedure": "V.a. Fraktur"}, {},
                                           {"ReasonForTheRequestedProcedure": "Schmerzen"},
                                           {"ReasonForTheRequestedProcedure": "V.a. Fraktur"})}
    out = mii.study_elements(study, ConversionConfig(), TERMS, Counter())
    assert out["extension"] == [{"url": mii.EXT + "bildgebungsgrund", "valueString": "V.a. Fraktur; Schmerzen"}]


def test_observations_only_when_configured():
    study = {"PatientWeight": 80.0, "PatientSize": 1.8}
    assert mii.study_elements(study, ConversionConfig(), TERMS, Counter(), **CONTEXT) == {}
    out = mii.study_elements(study, CONFIG, TERMS, Counter(), **CONTEXT)
    weight, height = out["observations"]
    assert weight["id"] == hashlib.sha256(b"1.2.840.1|29463-7").hexdigest()
    assert height["valueQuantity"] == {"value": 180, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}
    assert weight["subject"] == CONTEXT["subject"] and weight["effectiveDateTime"] == CONTEXT["started"]
    assert [e["valueReference"]["reference"] for e in out["extension"]] == [
        f"Observation/{weight['id']}", f"Observation/{height['id']}"]
    for observation in out["observations"]:
        Observation.model_validate(observation)


@pytest.mark.parametrize("metres, centimetres", [
    (1.81, 181), (1.8, 180), (1.755, 175.5), (0.57, 57), (1.1, 110), (2.999, 299.9), (1.234567, 123.4567)])
def test_body_height_is_written_in_exact_centimetres(metres, centimetres):
    """UCUM cm as the R4 bodyheight profile requires; no binary noise such as 0.57 * 100 = 56.99999999999999."""
    (height,) = mii.study_elements({"PatientSize": metres}, CONFIG, TERMS, Counter(), **CONTEXT)["observations"]
    assert height["valueQuantity"]["value"] == centimetres
    assert repr(height["valueQuantity"]["value"]) == repr(centimetres)
    assert (height["valueQuantity"]["unit"], height["valueQuantity"]["code"]) == ("cm", "cm")


@pytest.mark.parametrize("study, note", [
    ({"PatientWeight": 0.0}, "unmapped:PatientWeight"),
    ({"PatientSize": 175.0}, "unmapped:PatientSize"),  # centimetres in a metres field
    ({"_invalid": ("PatientWeight",)}, "unparseable:PatientWeight"),
])
def test_implausible_or_invalid_vitals_are_left_out(study, note):
    notes = Counter()
    assert mii.study_elements(study, CONFIG, TERMS, notes, **CONTEXT) == {}
    assert notes == Counter({note: 1})


@pytest.mark.parametrize("garbage", GARBAGE, ids=repr)
def test_garbage_inside_code_items_never_raises(garbage):
    item = {k: garbage for k in mii.CODE_ITEM_KEYWORDS}
    record = {"Modality": "PT", "ViewCodeSequence": (item,), "ProcedureCodeSequence": (item,),
              "RadiopharmaceuticalInformationSequence": ({"RadionuclideCodeSequence": (item,),
                                                          "RadiopharmaceuticalCodeSequence": (item,),
                                                          "RadiopharmaceuticalStartTime": garbage},)}
    notes = Counter()
    mii.series_extensions(record, TERMS, True, notes)
    out = mii.study_elements(record, ConversionConfig(), TERMS, notes)
    assert all(c.get("coding") or c.get("text") for c in out.get("procedureCode", []))


def test_study_elements_of_a_header_without_their_values_are_none_and_an_unparseable_one_is_noted():
    """A study header without any of the values the study elements are made from gives none (and
    no note); one whose weight did not parse gives none either, but counts it."""
    from beam_pipeline.codes import INVALID_KEY

    notes = Counter()
    assert mii.study_elements({"StudyDate": "20240101", "Modality": "CT"}, CONFIG, TERMS, notes, **CONTEXT) == {}
    assert not notes
    assert mii.study_elements({INVALID_KEY: ("PatientWeight",)}, CONFIG, TERMS, notes, **CONTEXT) == {}
    assert notes == Counter({"unparseable:PatientWeight": 1})
    weighed = mii.study_elements({"PatientWeight": 70.0}, CONFIG, TERMS, Counter(), **CONTEXT)
    assert len(weighed["observations"]) == 1 and weighed["extension"]


def test_without_observations_vital_signs_alone_make_no_study_elements_and_others_still_do():
    """Without --observations a weight or height makes nothing, so a header with only those gives
    none at once (and no note); with a reason for the request or a procedure code beside them, those
    are mapped as before; an unparseable value of theirs is still noted."""
    from beam_pipeline.codes import INVALID_KEY

    plain, notes = ConversionConfig(), Counter()
    assert mii.study_elements({"PatientWeight": 70.0, "PatientSize": 1.8}, plain, TERMS, notes) == {}
    assert not notes
    reason = {"RequestAttributesSequence": ({"ReasonForTheRequestedProcedure": "Schmerzen"},)}
    out = mii.study_elements({"PatientWeight": 70.0, **reason}, plain, TERMS, notes)
    assert out == {"extension": [{"url": mii.EXT + "bildgebungsgrund", "valueString": "Schmerzen"}]}
    coded = ({"CodeValue": "77477000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "CT"},)
    assert mii.study_elements({"PatientSize": 1.8, "ProcedureCodeSequence": coded}, plain, TERMS, notes)["procedureCode"]
    assert mii.study_elements({"PatientWeight": 70.0, INVALID_KEY: ("ProcedureCodeSequence",)}, plain, TERMS, notes) == {}
    assert not notes or set(notes) == {"unparseable:ProcedureCodeSequence"}
    assert mii.study_elements({"PatientWeight": 70.0}, CONFIG, TERMS, Counter(), **CONTEXT)["observations"]
