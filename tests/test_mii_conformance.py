"""Every extension ``beam_pipeline.fhir.mii`` emits, checked against the MII StructureDefinitions.

Headers are real (pydicom's test files); PT/MG/DX and fuller NM/US cases start from a real header
and set the attributes those modalities carry. The profiles are copied into ``tests/mii_profiles``
(verbatim from the MII module, see SOURCE.txt there) so the test is self-contained.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from helpers import with_changes
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VM, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from beam_pipeline.fhir import mii
from beam_pipeline.fhir.config import ConversionConfig
from terminologies import Terminologies

PROFILES = Path(__file__).parent / "mii_profiles"
DICOMDIR_TREE = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
STUDY_PROFILE = "StructureDefinition-mii-pr-bildgebung-bildgebungsstudie.json"
STUDY, SERIES, INSTANCE = "ImagingStudy", "ImagingStudy.series", "ImagingStudy.series.instance"
PRIMITIVE_TYPES = {"Boolean": bool, "String": str}


# --- the profiles -------------------------------------------------------------------------------

def _json(name: str) -> dict:
    return json.loads((PROFILES / name).read_text(encoding="utf-8"))


def _flat_codes(concepts):
    for concept in concepts:
        yield concept["code"]
        yield from _flat_codes(concept.get("concept", ()))


@lru_cache(maxsize=None)
def code_systems() -> dict[str, frozenset]:
    return {(cs := _json(p.name))["url"]: frozenset(_flat_codes(cs["concept"])) for p in PROFILES.glob("CodeSystem-*.json")}


@lru_cache(maxsize=None)
def value_sets() -> dict[str, frozenset]:
    """MII value set url -> allowed (system, code) pairs."""
    out = {}
    for path in PROFILES.glob("ValueSet-*.json"):
        vs = _json(path.name)
        pairs = set()
        for include in vs["compose"]["include"]:
            if "system" in include:
                codes = [c["code"] for c in include.get("concept", ())] or code_systems()[include["system"]]
                pairs.update((include["system"], code) for code in codes)
        out[vs["url"]] = frozenset(pairs)
    return out


@lru_cache(maxsize=None)
def extension_profiles() -> dict[str, dict]:
    """Extension url -> {context, simple value types/patterns, sub-extension slices}."""
    profiles = {}
    for path in PROFILES.glob("StructureDefinition-mii-ex-*.json"):
        sd = _json(path.name)
        els = {e["id"]: e for e in sd["differential"]["element"]}
        subs = {}
        for eid, el in els.items():
            if (m := re.fullmatch(r"Extension\.extension:([^.]+)", eid)) is None:
                continue
            prefix = f"{eid}.value[x]"
            types = {t["code"] for e2 in els.values() if e2["id"] == prefix or e2["id"].startswith(prefix + ":")
                     for t in e2.get("type", ())}
            bindings = {e2["binding"]["valueSet"] for e2 in els.values() if e2["id"].startswith(prefix)
                        and e2.get("binding", {}).get("strength") == "required"}
            subs[els[f"{eid}.url"]["fixedUri"]] = {
                "name": m.group(1), "min": el.get("min", 0), "max": el.get("max", "*"), "types": types,
                "patterns": _patterns(els, prefix), "bindings": bindings,
            }
        value = els.get("Extension.value[x]", {})
        profiles[sd["url"]] = {
            "context": {c["expression"] for c in sd["context"]},
            "complex": value.get("max") == "0",
            "types": {t["code"] for t in value.get("type", ())},
            "patterns": _patterns(els, "Extension.value[x]"),
            "min_subs": els.get("Extension.extension", {}).get("min", 0),
            "subs": subs,
        }
    return profiles


def _patterns(els, prefix):
    out = {}
    for field in ("unit", "system", "code"):
        el = els.get(f"{prefix}.{field}", {})
        for key in ("patternString", "patternUri", "patternCode"):
            if key in el:
                out[field] = el[key]
    return out


@lru_cache(maxsize=None)
def study_profile_slices() -> dict[str, dict[str, str]]:
    """Element path -> {extension url: max} for the extension slices of the ImagingStudy profile."""
    out: dict[str, dict[str, str]] = {}
    for el in _json(STUDY_PROFILE)["differential"]["element"]:
        if ".extension:" in el["id"] and el.get("type"):
            out.setdefault(el["path"].rsplit(".extension", 1)[0], {})[el["type"][0]["profile"][0]] = el["max"]
    return out


# --- the checker --------------------------------------------------------------------------------

def _value_items(element: dict) -> list[tuple[str, object]]:
    return [(k, v) for k, v in element.items() if k.startswith("value")]


def check_value(key: str, value, types: set, patterns: dict, bindings: set, where: str) -> list[str]:
    kind = key[len("value"):]
    fhir_type = kind[0].lower() + kind[1:] if kind in PRIMITIVE_TYPES else kind
    errors = [] if fhir_type in types else [f"{where}: {key} not among {sorted(types)}"]
    if kind in PRIMITIVE_TYPES:
        if not isinstance(value, PRIMITIVE_TYPES[kind]) or value == "":
            errors.append(f"{where}: {key} has {value!r}")
    elif kind == "Quantity":
        number = value.get("value")
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            errors.append(f"{where}: quantity value {number!r}")
        for field, expected in patterns.items():
            if value.get(field) != expected:
                errors.append(f"{where}: quantity {field} {value.get(field)!r} != pattern {expected!r}")
        if set(patterns) != {"unit", "system", "code"} or set(value) != {"value", "unit", "system", "code"}:
            errors.append(f"{where}: quantity must carry exactly value/unit/system/code: {value}")
    elif kind == "CodeableConcept":
        codings = value.get("coding", [])
        if not codings and not value.get("text"):
            errors.append(f"{where}: empty CodeableConcept")
        for coding in codings:
            if not (isinstance(coding.get("system"), str) and isinstance(coding.get("code"), str)):
                errors.append(f"{where}: coding without system/code {coding}")
            if coding.get("system") in code_systems() and coding["code"] not in code_systems()[coding["system"]]:
                errors.append(f"{where}: {coding['code']} not in {coding['system']}")
            if bindings and not any((coding["system"], coding["code"]) in value_sets()[vs] for vs in bindings):
                errors.append(f"{where}: {coding['code']} outside the required value sets")
    elif kind == "Reference":
        if not (value.get("reference") or value.get("display")):
            errors.append(f"{where}: empty Reference")
    return errors


def check_extension(ext: dict, context: str) -> list[str]:
    """All profile violations of one emitted extension at ``context``."""
    profile = extension_profiles().get(ext.get("url"))
    if profile is None:
        return [f"unknown extension url {ext.get('url')!r}"]
    where = ext["url"].rsplit("-", 1)[-1]
    errors = [] if context in profile["context"] else [f"{where}: context {context} not in {profile['context']}"]
    values = _value_items(ext)
    if set(ext) - {"url", "extension"} - {k for k, _ in values}:
        errors.append(f"{where}: unexpected keys {sorted(ext)}")
    if not profile["complex"]:
        if "extension" in ext or len(values) != 1:
            return errors + [f"{where}: a simple extension needs exactly one value[x]"]
        return errors + check_value(*values[0], profile["types"], profile["patterns"], set(), where)
    if values:
        errors.append(f"{where}: complex extension carries {values[0][0]}")
    subs = ext.get("extension") or []
    if len(subs) < max(1, profile["min_subs"]):
        errors.append(f"{where}: no sub-extensions")
    counts = Counter(sub.get("url") for sub in subs)
    for url, sub_profile in profile["subs"].items():
        if counts[url] < sub_profile["min"]:
            errors.append(f"{where}: {url} missing (min {sub_profile['min']})")
        if sub_profile["max"] != "*" and counts[url] > int(sub_profile["max"]):
            errors.append(f"{where}: {url} repeated {counts[url]}x (max {sub_profile['max']})")
    for sub in subs:
        sub_profile = profile["subs"].get(sub.get("url"))
        if sub_profile is None:
            errors.append(f"{where}: sub-extension {sub.get('url')!r} is not a slice")
            continue
        sub_values = _value_items(sub)
        if set(sub) != {"url", *(k for k, _ in sub_values)} or len(sub_values) != 1:
            errors.append(f"{where}.{sub['url']}: needs exactly url + one value[x]: {sorted(sub)}")
            continue
        errors += check_value(*sub_values[0], sub_profile["types"], sub_profile["patterns"],
                              sub_profile["bindings"], f"{where}.{sub['url']}")
    return errors


def check_extensions(extensions: list[dict], context: str) -> list[str]:
    errors = [e for ext in extensions for e in check_extension(ext, context)]
    allowed = study_profile_slices()[context]
    for url, count in Counter(ext["url"] for ext in extensions).items():
        if url not in allowed:
            errors.append(f"{url} is not an extension slice of {context}")
        elif allowed[url] != "*" and count > int(allowed[url]):
            errors.append(f"{url} repeated {count}x at {context}")
    return errors


# --- DICOM header -> record (the reader's contract) ----------------------------------------------

ALL_KEYWORDS = tuple(dict.fromkeys(k for level in mii.KEYWORDS.values() for k in level))


def record_from_dataset(ds: Dataset, keywords=ALL_KEYWORDS) -> dict:
    """The record contract: present non-empty elements, typed by VR, tuples where the VM is not 1."""
    record, invalid = {}, []
    for keyword in keywords:
        element = ds[keyword] if keyword in ds else None
        if element is None or element.is_empty:
            continue
        if element.VR == "SQ":
            items = mii.SEQUENCE_ITEM_KEYWORDS.get(keyword, ())
            record[keyword] = tuple(record_from_dataset(item, items) for item in element.value)
            continue
        raw = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
        try:
            if element.VR in ("DS", "FL", "FD"):
                values = [float(v) for v in raw]
            elif element.VR in ("IS", "US", "UL", "SS", "SL"):
                values = [int(v) for v in raw]
            else:
                values = [str(v).strip(" \x00") for v in raw]
        except (TypeError, ValueError):
            invalid.append(keyword)
            continue
        multi = dictionary_VM(tag_for_keyword(keyword)) != "1"
        record[keyword] = tuple(values) if multi else values[0]
    if invalid:
        record[mii.INVALID_KEY] = tuple(invalid)
    return record


def read(path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(str(path), stop_before_pixels=True)


def code_item(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def radiopharmaceutical_info(**attributes) -> Sequence:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return Sequence([item])


def modified(ds: Dataset, **changes) -> Dataset:
    return with_changes(deepcopy(ds), **changes)


def region(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


# --- cases: header -> expected extension urls with their sub-extension urls -----------------------

CT, MR, MGX, PT, NM, US = (mii.EXT + f"modalitaet-{m}" for m in ("ct", "mr", "mg-cr-dx", "pt", "nm", "us"))
KM, DETAILS = mii.EXT + "kontrastmittel", mii.EXT + "instanz-details"
X_RAY = {"KVP", "exposureTime", "exposure", "xRayTubeCurrent"}
ALL_DETAILS = {"pixelSpacingX", "pixelSpacingY", "sliceThickness", "imageType"}
NUCLEAR = {"radiopharmaceutical", "radionuclide", "tracerExposureTime", "radionuclideTotalDose", "radionuclideHalfLife"}


def _cases():
    ct = read(get_testdata_file("CT_small.dcm"))
    nm = read(get_testdata_file("JPEG2000.dcm"))
    us = read(get_testdata_file("examples_palette.dcm"))
    cr = read(DICOMDIR_TREE / "77654033" / "CR3" / "6278")
    return {
        "CT_small": (ct, {CT: X_RAY | {"convolutionalKernel"}, KM: {"contrastBolus", "contrastBolusDetails"}},
                     ALL_DETAILS),
        "MR_small": (read(get_testdata_file("MR_small.dcm")), {
            MR: {"scanningSequence", "scanningSequenceVariant", "echoTime", "repetitionTime", "flipAngle"}},
            ALL_DETAILS),
        "MR_overlay_contrast": (read(get_testdata_file("examples_overlay.dcm")), {
            MR: {"magneticFieldStrength", "scanningSequence", "scanningSequenceVariant", "echoTime",
                 "repetitionTime", "flipAngle"},
            KM: {"contrastBolus", "contrastBolusDetails"}}, ALL_DETAILS),
        "MR_projection": (read(DICOMDIR_TREE / "98892003" / "MR700" / "4648"), {MR: None}, None),
        "CT_localizer": (read(DICOMDIR_TREE / "98892001" / "CT2N" / "6924"), {CT: X_RAY | {"convolutionalKernel"}},
                         ALL_DETAILS),
        "CT_j2k": (read(get_testdata_file("J2K_pixelrep_mismatch.dcm")), {CT: X_RAY | {"convolutionalKernel"}},
                   ALL_DETAILS),
        "NM_real": (nm, {}, {"pixelSpacingX", "pixelSpacingY", "imageType"}),
        "US_real": (us, {US: {"transducerType", "ultrasoundColor"}}, {"imageType"}),
        "CR_real": (cr, {MGX: {"viewPosition"}}, None),
        "CR_left_lateral": (read(DICOMDIR_TREE / "77654033" / "CR1" / "6154"), {MGX: {"viewPosition"}}, None),
        "PT_built": (modified(
            ct, Modality="PT", Units="BQML", SeriesType=["WHOLE BODY", "IMAGE"], ContrastBolusAgent=None,
            RadiopharmaceuticalInformationSequence=radiopharmaceutical_info(
                Radiopharmaceutical="FDG", RadiopharmaceuticalStartTime="100000",
                RadionuclideTotalDose="350000000", RadionuclideHalfLife="6586.2",
                RadiopharmaceuticalCodeSequence=Sequence([code_item("SCT", "35321007", "Fluorodeoxyglucose F^18^")]),
                RadionuclideCodeSequence=Sequence([code_item("SCT", "77004003", "^18^Fluorine")]))),
            {PT: NUCLEAR | {"units", "seriesType"}}, ALL_DETAILS),
        "NM_built_legacy_codes": (modified(
            nm, RadiopharmaceuticalInformationSequence=radiopharmaceutical_info(
                Radiopharmaceutical="Tc-99m MDP", RadiopharmaceuticalStartDateTime="19970806090000",
                RadionuclideTotalDose="740", RadionuclideHalfLife="21624",
                RadionuclideCodeSequence=Sequence([code_item("SRT", "C-163A8", "^99m^Technetium")]))),
            {NM: NUCLEAR}, {"pixelSpacingX", "pixelSpacingY", "imageType"}),
        "MG_built": (modified(
            cr, Modality="MG", ViewPosition="MLO", KVP="28", ImageLaterality="L",
            ViewCodeSequence=Sequence([code_item("SCT", "399368009", "medio-lateral oblique")])),
            {MGX: {"KVP", "viewPosition"}}, None),
        "DX_built": (modified(cr, Modality="DX", ViewPosition="PA", KVP="125", Exposure="4", ExposureTime="10",
                              XRayTubeCurrent="400"), {MGX: X_RAY | {"viewPosition"}}, None),
        "US_built": (modified(
            us, ContrastBolusAgent="NONE", BurnedInAnnotation="YES", SequenceOfUltrasoundRegions=Sequence([
                region(RegionSpatialFormat=1), region(TransducerFrequency=3500, PulseRepetitionFrequency=4000)])),
            {US: {"transducerType", "ultrasoundColor", "transducerFrequency", "pulseRepetitionFrequency"},
             KM: {"contrastBolus"}}, {"imageType", "burnedInAnnotation"}),
    }


CASES = _cases()
TERMS = Terminologies.load()
CONFIG = ConversionConfig(observations=True)
CONTEXT = {"study_uid": "1.2.3", "subject": {"reference": "Patient/p1"},
           "started": "2024-07-19T12:03:30+02:00"}


def _by_url(extensions):
    return {ext["url"]: ext for ext in extensions}


@pytest.mark.parametrize("include_instances", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_series_extensions_conform(name, include_instances):
    ds, expected, _ = CASES[name]
    notes = Counter()
    extensions = mii.series_extensions(record_from_dataset(ds), TERMS, include_instances, notes)
    assert check_extensions(extensions, SERIES) == []
    emitted = _by_url(extensions)
    thickness = mii.EXT + "serie-schichtdicke"
    assert set(emitted) - {thickness} == set(expected)
    assert (thickness in emitted) == (not include_instances and "SliceThickness" in ds and float(ds.SliceThickness) > 0)
    for url, subs in expected.items():
        if subs is not None:
            assert {sub["url"] for sub in emitted[url]["extension"]} == subs, url


@pytest.mark.parametrize("name", sorted(CASES))
def test_instance_extensions_conform(name):
    ds, _, expected = CASES[name]
    extensions = mii.instance_extensions(record_from_dataset(ds), TERMS, Counter())
    assert check_extensions(extensions, INSTANCE) == []
    assert [ext["url"] for ext in extensions] == [DETAILS]
    if expected is not None:
        assert {sub["url"] for sub in extensions[0]["extension"]} == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_study_elements_conform(name):
    ds = modified(CASES[name][0], AdmissionID="ADM-1", PatientWeight="71.5", PatientSize="1.8")
    out = mii.study_elements(record_from_dataset(ds), CONFIG, TERMS, Counter(), **CONTEXT)
    assert check_extensions(out["extension"], STUDY) == []
    assert [o["code"]["coding"][0]["code"] for o in out["observations"]] == ["29463-7", "8302-2"]
    for observation in out["observations"]:
        Observation.model_validate(observation)
    references = {ext["valueReference"]["reference"] for ext in out["extension"] if "valueReference" in ext}
    assert references == {f"Observation/{o['id']}" for o in out["observations"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_emitted_extensions_are_valid_fhir(name):
    """The extensions inside a minimal ImagingStudy pass the R4B model (datatypes, no empty values)."""
    record = record_from_dataset(CASES[name][0])
    study = {
        "resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/p1"},
        "series": [{
            "uid": "1.2.3.4", "modality": {"system": mii.SYSTEMS["DCM"], "code": record.get("Modality", "OT")},
            "extension": mii.series_extensions(record, TERMS, False, Counter()),
            "instance": [{"uid": "1.2.3.4.5", "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2"},
                          "extension": mii.instance_extensions(record, TERMS, Counter())}],
        }],
    }
    assert ImagingStudy.model_validate(study).series[0].instance[0].extension


def test_non_square_pixels_map_columns_to_x():
    ds = CASES["CT_localizer"][0]
    subs = {s["url"]: s for s in mii.instance_extensions(record_from_dataset(ds), TERMS, Counter())[0]["extension"]}
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    assert row_spacing != column_spacing
    assert subs["pixelSpacingX"]["valueQuantity"]["value"] == column_spacing
    assert subs["pixelSpacingY"]["valueQuantity"]["value"] == row_spacing


def test_dicom_terms_with_spaces_become_mii_codes():
    mr = mii.instance_extensions(record_from_dataset(CASES["MR_projection"][0]), TERMS, Counter())
    nm = mii.instance_extensions(record_from_dataset(CASES["NM_real"][0]), TERMS, Counter())
    us = mii.series_extensions(record_from_dataset(CASES["US_real"][0]), TERMS, True, Counter())
    codes = [c["code"] for ext in (mr[0], nm[0], us[0]) for sub in ext["extension"]
             for c in sub.get("valueCodeableConcept", {}).get("coding", ())]
    assert {"PROJECTIONIMAGE", "WHOLEBODY", "CURVED_LINEAR"} <= set(codes)


def test_legacy_snomed_rt_radionuclide_is_recoded():
    extensions = mii.series_extensions(record_from_dataset(CASES["NM_built_legacy_codes"][0]), TERMS, True, Counter())
    subs = {s["url"]: s for s in extensions[0]["extension"]}
    assert subs["radionuclide"]["valueCodeableConcept"]["coding"][0]["code"] == "72454006"
    assert subs["radionuclideTotalDose"]["valueQuantity"]["code"] == "MBq"  # NM doses are MBq in DICOM
    assert subs["tracerExposureTime"]["valueQuantity"]["value"] == 3 * 3600 + 29 * 60 + 31  # 09:00:00 -> 12:29:31


def test_kvp_zero_means_unknown():
    notes = Counter()
    extensions = mii.series_extensions(record_from_dataset(CASES["CR_real"][0]), TERMS, True, notes)
    assert "KVP" not in {s["url"] for s in extensions[0]["extension"]}
    assert notes["unmapped:KVP"] == 1


# --- the module's own examples ------------------------------------------------------------------

EXAMPLES = sorted(p.name for p in PROFILES.glob("ImagingStudy-mii-exa-*.json"))


def test_examples_are_present():
    assert len(EXAMPLES) == 7


@pytest.mark.parametrize("name", EXAMPLES + ["Device-mii-exa-bildgebung-geraet.json"])
def test_examples_parse_with_r4b(name):
    resource = _json(name)
    model = {"ImagingStudy": ImagingStudy, "Device": Device}[resource["resourceType"]]
    assert model.model_validate(resource).id == resource["id"]


def _summary(extensions: list[dict]) -> dict:
    """Order-free structure: url -> {sub url -> (value kind, comparable value)}."""
    def value(element):
        (key, val), = _value_items(element)
        if key == "valueQuantity":
            return key, (val["value"], val["unit"])
        if key == "valueCodeableConcept":
            return key, tuple(c["code"] for c in val.get("coding", ()))
        if key == "valueReference":
            return key, None  # the example points at a MedicationAdministration; we carry the agent name
        return key, val
    return {ext["url"]: ({s["url"]: value(s) for s in ext["extension"]} if "extension" in ext else value(ext))
            for ext in extensions}


EXAMPLE_HEADERS = {
    "ct": dict(Modality="CT", ConvolutionKernel="SOFT", CTDIvol=4.04, KVP="110", Exposure="38", ExposureTime="600",
               XRayTubeCurrent="96", ContrastBolusAgent="Imeron 350", PixelSpacing=["1.36", "1.36"],
               SliceThickness="4", ImageType=["DERIVED", "PRIMARY", "AXIAL"]),
    "cr": dict(Modality="CR", KVP="110", Exposure="38", ExposureTime="600", XRayTubeCurrent="96", ViewPosition="RPO",
               ContrastBolusAgent="NONE", ImageType=["ORIGINAL", "PRIMARY"], PixelSpacing=None, SliceThickness=None),
    "mr": dict(Modality="MR", MagneticFieldStrength="3", ScanningSequence="SE", SequenceVariant=["SP", "SK"],
               EchoTime="388", RepetitionTime="5000", InversionTime="900", FlipAngle="130", ContrastBolusAgent="NONE",
               PixelSpacing=["0.260417", "0.260417"], SliceThickness="3", ImageType=["ORIGINAL", "SECONDARY", "OTHER"]),
    "mr-series": dict(Modality="MR", MagneticFieldStrength="3", ScanningSequence="SE", SequenceVariant=["SP", "SK"],
                      EchoTime="388", RepetitionTime="5000", InversionTime="900", FlipAngle="130",
                      ContrastBolusAgent="NONE", SliceThickness="4"),
    "nm": dict(Modality="NM", Units="BQML", SeriesTime="114640", PixelSpacing=["2.89", "2.89"], SliceThickness="4",
               ImageType=["ORIGINAL", "PRIMARY", "DYNAMIC", "EMISSION"],
               RadiopharmaceuticalInformationSequence=radiopharmaceutical_info(
                   RadiopharmaceuticalStartTime="090000", RadionuclideTotalDose="196", RadionuclideHalfLife="6586.2",
                   RadiopharmaceuticalCodeSequence=Sequence([code_item("SCT", "35321007", "Fluorodeoxyglucose F^18^")]),
                   RadionuclideCodeSequence=Sequence([code_item("SCT", "77004003", "^18^Fluorine")]))),
    "pt": dict(Modality="PT", Units="BQML", SeriesTime="114640", PixelSpacing=["2.89", "2.89"], SliceThickness="4",
               SeriesType=["DYNAMIC", "IMAGE"], ImageType=["ORIGINAL", "PRIMARY"],
               RadiopharmaceuticalInformationSequence=radiopharmaceutical_info(
                   RadiopharmaceuticalStartTime="090000", RadionuclideTotalDose="196", RadionuclideHalfLife="6586.2",
                   RadiopharmaceuticalCodeSequence=Sequence([code_item("SCT", "35321007", "Fluorodeoxyglucose F^18^")]),
                   RadionuclideCodeSequence=Sequence([code_item("SCT", "77004003", "^18^Fluorine")]))),
    "us": dict(Modality="US", TransducerType="CURVED LINEAR", UltrasoundColorDataPresent=0, ContrastBolusAgent="NONE",
               SequenceOfUltrasoundRegions=Sequence([region(TransducerFrequency=1670, PulseRepetitionFrequency=5860)]),
               ImageType=["ORIGINAL", "SECONDARY", "ABDOMINAL", "0001"], BurnedInAnnotation="YES",
               PixelSpacing=None, SliceThickness=None),
}
# Start every example header from the same real CT header, cleared of what the example lacks.
CLEARED = dict(CTDIvol=None, KVP=None, Exposure=None, ExposureTime=None, XRayTubeCurrent=None, ConvolutionKernel=None,
               ContrastBolusAgent=None, SeriesTime=None, AcquisitionTime=None, RequestAttributesSequence=None)


@pytest.mark.parametrize("name", EXAMPLES)
def test_mapping_reproduces_example_structure(name):
    example = _json(name)
    key = re.fullmatch(r"ImagingStudy-mii-exa-bildgebung-bildgebungsstudie-(.+)\.json", name).group(1)
    reason = example["extension"][0]["valueString"]
    request = Sequence([region(ReasonForTheRequestedProcedure=reason)])
    ds = modified(read(get_testdata_file("CT_small.dcm")),
                  **{**CLEARED, **EXAMPLE_HEADERS[key], "RequestAttributesSequence": request})
    record = record_from_dataset(ds)
    series = example["series"][0]
    with_instances = "instance" in series

    ours = mii.series_extensions(record, TERMS, with_instances, Counter())
    assert check_extensions(ours, SERIES) == []
    expected = _summary(series["extension"])
    if key in ("nm", "pt"):
        # the examples write the DICOM term BQML as a UCUM code; CID 84 (the binding) has UCUM "Bq/ml"
        url = NM if key == "nm" else PT
        assert expected[url]["units"] == ("valueCodeableConcept", ("BQML",))
        expected[url]["units"] = ("valueCodeableConcept", (TERMS.units("BQML")["code"],))
    assert _summary(ours) == expected

    if with_instances:
        instance_ours = mii.instance_extensions(record, TERMS, Counter())
        assert check_extensions(instance_ours, INSTANCE) == []
        assert _summary(instance_ours) == _summary(series["instance"][0]["extension"])

    study = mii.study_elements(record, ConversionConfig(), TERMS, Counter(), **CONTEXT)
    assert _summary(study["extension"]) == _summary(example["extension"])


def test_checker_rejects_violations():
    """The checker itself must catch what it claims to: wrong code, value[x] on complex, bad slice."""
    good = mii.series_extensions(record_from_dataset(CASES["CT_small"][0]), TERMS, True, Counter())[0]
    assert check_extension(good, SERIES) == []
    wrong_code = deepcopy(good)
    wrong_code["extension"][0]["valueQuantity"]["code"] = "V"
    with_value = {**deepcopy(good), "valueString": "x"}
    bad_slice = deepcopy(good)
    bad_slice["extension"].append({"url": "magneticFieldStrength", "valueBoolean": True})
    repeated = deepcopy(good)
    repeated["extension"].append(deepcopy(good["extension"][0]))
    image_type = {"url": DETAILS, "extension": [{"url": "imageType", "valueCodeableConcept": {
        "coding": [{"system": mii.CS + "instance-image-type", "code": "PDC"}]}}]}  # abstract, in no value set
    empty = {"url": KM, "extension": []}
    for broken, context in ((wrong_code, SERIES), (with_value, SERIES), (bad_slice, SERIES), (repeated, SERIES),
                            (good, INSTANCE), (image_type, INSTANCE), (empty, SERIES)):
        assert check_extension(broken, context), broken


def test_module_code_lists_match_the_profile_value_sets():
    """mii.MII_CODES (what the mapping may emit) must equal what the bound value sets allow."""
    for system, codes in mii.MII_CODES.items():
        bound = {code for pairs in value_sets().values() for s, code in pairs if s == system}
        assert codes == bound, system
