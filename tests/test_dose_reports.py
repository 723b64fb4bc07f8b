"""X-Ray Radiation Dose SRs: read with pydicom into plain data, mapped to Observations.

Real SR files from pydicom's test data (pydicom ships no dose report), dose reports generated
after TID 10011 / TID 10001 (``tests/dose_reports.py``), dose reports beside real images in one
study, and malformed reports: each must give notes, never a crash or a lost study.
"""
from __future__ import annotations

import glob
import io
import os

import pytest
from fhir.resources.R4B.observation import Observation

from beam_pipeline.run.convert import convert_files
from beam_pipeline.codes import DOSE_REPORT_KEY, sha256_id
from beam_pipeline.dicom import dose_report, header
from beam_pipeline.dicom.records import DoseReport
from beam_pipeline.fhir import build as fhir_build
from beam_pipeline.fhir import dose, keywords
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.sources import dicomweb
import dose_reports as dr
from helpers import TEST_FILES, copy_dicom, pydicom_file, raw_lines, read_ndjson, references, run_pipeline

SPEC = keywords.header_spec()
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
EVENT_1, EVENT_2 = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"


def _read(path, fast=True):
    with open(path, "rb") as fp:
        return header.read_header(fp, SPEC, use_fast=fast)


def _components(observation) -> dict:
    """DCM code -> valueQuantity (or valueCodeableConcept) of an Observation's components."""
    out = {}
    for component in observation.get("component", ()):
        code = component["code"]["coding"][0]
        assert code["system"] == DCM
        out.setdefault(code["code"], []).append(component.get("valueQuantity") or component["valueCodeableConcept"])
    return {code: values[0] if len(values) == 1 else values for code, values in out.items()}


def _convert(*paths, **config):
    result = convert_files([str(p) for p in paths], ConversionConfig(**config))
    assert sum(result.outcomes.values()) == len(paths)
    return result


def _observations(result) -> list[dict]:
    observations = result.resources.get("Observation", [])
    for observation in observations:  # every new resource is valid R4 (fhir.resources R4B)
        Observation.model_validate(observation)
    return observations


def _summary(observations) -> dict:
    summaries = [o for o in observations if o["code"]["coding"][0]["code"] == "73569-6"]
    assert len(summaries) == 1
    return summaries[0]


# --- reading ---------------------------------------------------------------------------------

def test_both_readers_and_dicom_json_give_the_same_dose_values(tmp_path):
    ds = dr.ct_report()
    path = dr.write(ds, tmp_path / "ct.dcm")
    fast, slow = _read(path, True), _read(path, False)
    report = fast.record[DOSE_REPORT_KEY]
    assert report == slow.record[DOSE_REPORT_KEY]
    assert not fast.notes  # the fast scanner kept the header: only the content tree went to pydicom
    from_json = dicomweb.read_instance(dr.read(path).to_json_dict(), SPEC)
    assert from_json.record[DOSE_REPORT_KEY] == report
    assert report.procedure == ("SCT", "77477000", "Computerized tomography")
    assert report.problems == ()
    values = {(i.concept, i.event): (i.value, i.unit, i.unit_scheme, i.container) for i in report.items}
    assert values[("113813", "")] == ("835.3", "mGy.cm", "UCUM", "113811")
    assert values[("113812", "")] == ("2", "{events}", "UCUM", "113811")
    assert values[("113830", EVENT_1)] == ("12.5", "mGy", "UCUM", "113829")
    assert values[("113838", EVENT_2)] == ("310", "mGy.cm", "UCUM", "113829")
    assert values[("111526", EVENT_1)][0] == "20240305101500"
    # rows the mapping does not read stay out of the record (Exposure Time, Scanning Length, ...)
    assert {i.concept for i in report.items} <= dose.READ_CONCEPTS


def test_without_dose_concepts_a_dose_report_is_read_like_any_instance(tmp_path):
    from beam_pipeline.dicom.fields import build_spec
    path = dr.write(dr.ct_report(), tmp_path / "ct.dcm")
    spec = build_spec(keywords.CORE_KEYWORDS.values(), {})
    with open(path, "rb") as fp:
        assert DOSE_REPORT_KEY not in header.read_header(fp, spec).record


@pytest.mark.parametrize("name", ["test-SR.dcm", "reportsi.dcm", "reportsi_with_empty_number_tags.dcm"])
def test_real_sr_files_are_not_dose_reports(name):
    result = _read(pydicom_file(name))
    assert result.kind == "instance" and result.record["Modality"] == "SR"
    assert DOSE_REPORT_KEY not in result.record


def test_a_real_sr_labelled_as_dose_report_is_noted_not_mapped(tmp_path):
    """pydicom's Comprehensive SR with the dose report SOP class: its root concept is not 113701."""
    path = copy_dicom(pydicom_file("test-SR.dcm"), tmp_path / "sr.dcm", SOPClassUID=dr.RDSR_CLASS, PatientID="SR-1")
    assert _read(path).record[DOSE_REPORT_KEY] == DoseReport(problems=(dose_report.NOT_A_DOSE_REPORT,))
    result = _convert(path)
    assert result.notes == {"unexpected-root:dose-report": 1}
    assert len(result.resources["ImagingStudy"]) == 1 and "Observation" not in result.resources


def test_unreadable_content_is_a_problem_not_an_exception():
    garbage = io.BytesIO(b"not DICOM at all" * 20)
    assert header.read_dose_report(garbage, SPEC) == DoseReport(problems=(dose_report.UNREADABLE,))
    assert dicomweb.json_dose_report({"0040A730": {"vr": "SQ", "Value": ["not an item"]}}, SPEC).problems == (
        dose_report.UNREADABLE,)


# --- mapping ---------------------------------------------------------------------------------

def test_ct_report_gives_a_summary_and_one_observation_per_irradiation_event(tmp_path):
    ds = dr.ct_report()
    result = _convert(dr.write(ds, tmp_path / "ct.dcm"))
    assert not result.errors and not result.notes
    study = result.resources["ImagingStudy"][0]
    observations = _observations(result)
    assert len(observations) == 3
    summary = _summary(observations)
    sop = ds.SOPInstanceUID
    assert summary["id"] == sha256_id(sop, "113701")
    assert summary["identifier"][0]["value"] == "urn:oid:" + sop
    assert summary["identifier"][0]["type"]["coding"][0]["code"] == "sop-instance-uid"
    assert summary["status"] == "final"
    assert summary["effectiveDateTime"] == "2024-03-05T10:15:00+01:00"  # Start of X-Ray Irradiation
    components = _components(summary)
    assert components["113813"] == {"value": 835.3, "unit": "mGy.cm", "system": UCUM, "code": "mGy.cm"}
    assert components["113812"] == {"value": 2, "unit": "{events}", "system": UCUM, "code": "{events}"}
    assert components["121058"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "77477000",
                                                 "display": "Computerized tomography"}
    assert summary["valueString"] == ("Total Number of Irradiation Events: 2 events; "
                                      "CT Dose Length Product Total: 835.3 mGy.cm")
    events = [o for o in observations if o is not summary]
    assert [o["id"] for o in events] == [sha256_id(sop, "113852", uid) for uid in (EVENT_1, EVENT_2)]
    assert [m["reference"] for m in summary["hasMember"]] == ["Observation/" + o["id"] for o in events]
    assert [o["identifier"][0]["value"] for o in events] == ["urn:oid:" + EVENT_1, "urn:oid:" + EVENT_2]
    assert _components(events[0]) == {
        "113830": {"value": 12.5, "unit": "mGy", "system": UCUM, "code": "mGy"},
        "113838": {"value": 525.3, "unit": "mGy.cm", "system": UCUM, "code": "mGy.cm"}}
    assert _components(events[1])["113838"]["value"] == 310
    assert events[0]["effectiveDateTime"] == "2024-03-05T10:15:00+01:00"  # DateTime Started, Berlin
    for observation in observations:  # the ImagingStudy they belong to, and its subject
        assert observation["partOf"][0]["reference"] == "ImagingStudy/" + study["id"]
        assert observation["partOf"][0]["identifier"]["value"] == "urn:oid:" + ds.StudyInstanceUID
        assert observation["focus"] == [{"reference": "ImagingStudy/" + study["id"]}]
        assert observation["subject"] == study["subject"]
    device = result.resources["Device"][0]
    assert summary["device"] == {"reference": "Device/" + device["id"]}
    assert result.counts["lines:Observation"] == 3
    # the ImagingStudy lists the report as any SR instance
    assert study["series"][0]["modality"]["code"] == "SR"
    assert study["series"][0]["instance"][0]["sopClass"]["code"] == "urn:oid:" + dr.RDSR_CLASS


def test_projection_report_maps_the_accumulated_totals(tmp_path):
    result = _convert(dr.write(dr.projection_report(), tmp_path / "xa.dcm"))
    assert not result.notes
    observations = _observations(result)
    assert len(observations) == 1  # events of projection X-ray carry no value the mapping takes
    summary = observations[0]
    components = _components(summary)
    assert {code: (q["value"], q["code"]) for code, q in components.items() if code != "121058"} == {
        "113722": (0.00123, "Gy.m2"), "113726": (0.0008, "Gy.m2"), "113727": (0.00043, "Gy.m2"),
        "113730": (95.5, "s"), "113725": (0.0451, "Gy")}
    assert components["121058"]["coding"][0]["code"] == "113704"
    assert summary["effectiveDateTime"] == "2024-03-05T10:20:00+01:00"  # the first event's start
    assert "hasMember" not in summary
    assert all("text" not in c["code"] for c in summary["component"])  # one plane: no plane named


def test_biplane_totals_are_kept_per_plane(tmp_path):
    ds = dr.projection_report(accumulated=[dr.accumulated_xray(("113620", "Plane A"), dap="0.002"),
                                           dr.accumulated_xray(("113621", "Plane B"), dap="0.001")])
    summary = _observations(_convert(dr.write(ds, tmp_path / "biplane.dcm")))[0]
    dap = [c for c in summary["component"] if c["code"]["coding"][0]["code"] == "113722"]
    assert [(c["code"]["text"], c["valueQuantity"]["value"]) for c in dap] == [
        ("Dose Area Product Total (Plane A)", 0.002), ("Dose Area Product Total (Plane B)", 0.001)]


def test_ids_are_deterministic_and_off_switch_writes_none(tmp_path):
    path = dr.write(dr.ct_report(sop_uid="1.2.826.0.1.3680043.8.498.99"), tmp_path / "ct.dcm")
    first, again = _convert(path), _convert(path)
    assert first.lines["Observation"] == again.lines["Observation"]
    off = _convert(path, dose_reports=False)
    assert "Observation" not in off.lines and not off.notes
    assert off.lines["ImagingStudy"] == first.lines["ImagingStudy"]


def _num(concept, value, unit, scheme="UCUM"):
    return dr.num(dr.dcm(concept, "x"), value, unit, scheme)


def _accumulated(*items):
    return [dr.container(dr.dcm("113811", "CT Accumulated Dose Data"), items)]


ODD_REPORTS = {
    "missing unit": (lambda: dr.ct_report(accumulated=[_num("113813", "835.3", None), _num("113812", "2", "{events}")]),
                     {"no-unit:dose-report.113813": 1}, {"113812"}),
    "value not a number": (lambda: dr.ct_report(dlp_total="12345678"), {"unparseable:dose-report.113813": 1},
                           {"113812"}),  # the bytes become "about 80" below (pydicom writes no such DS)
    "infinite value": (lambda: dr.ct_report(dlp_total="1e400"), {"unparseable:dose-report.113813": 1}, {"113812"}),
    "no value": (lambda: dr.ct_report(dlp_total=None), {"no-value:dose-report.113813": 1}, {"113812"}),
    "negative value": (lambda: dr.ct_report(dlp_total="-5"), {"out-of-range:dose-report.113813": 1}, {"113812"}),
    "unit not UCUM": (lambda: dr.ct_report(accumulated=[_num("113813", "835.3", "mGy.cm", "99LOCAL")]),
                      {"non-ucum-unit:dose-report.113813": 1}, set()),
    "another UCUM unit": (lambda: dr.ct_report(accumulated=[_num("113813", "83.53", "cGy.cm")]),
                          {"unexpected-unit:dose-report.113813": 1}, {"113813"}),
    "totals at the root": (lambda: dr.ct_report(extra=[_num("113813", "835.3", "mGy.cm")], accumulated=[]),
                           {"unexpected-nesting:dose-report.113813": 1}, {"113813"}),
    "duplicate total": (lambda: dr.ct_report(accumulated=[_num("113813", "835.3", "mGy.cm"),
                                                          _num("113813", "1.0", "mGy.cm")]),
                        {"duplicate:dose-report.113813": 1}, {"113813"}),
    "unparseable start": (lambda: dr.ct_report(start="2024-03-05 10:15"), {"unparseable:dose-report.113809": 1},
                          {"113812", "113813"}),
}


@pytest.mark.parametrize("case", sorted(ODD_REPORTS))
def test_odd_reports_are_noted_and_the_study_is_written(tmp_path, case):
    build, notes, mapped = ODD_REPORTS[case]
    path = dr.write(build(), tmp_path / "odd.dcm")
    if case == "value not a number":
        data = open(path, "rb").read()
        assert data.count(b"12345678") == 1
        open(path, "wb").write(data.replace(b"12345678", b"about 80"))
    result = _convert(path)
    assert not result.errors
    assert result.notes == notes
    assert len(result.resources["ImagingStudy"]) == 1
    summary = _summary(_observations(result))
    assert set(_components(summary)) - {"121058"} == mapped
    if case == "another UCUM unit":  # kept as written, never converted or relabelled
        assert _components(summary)["113813"] == {"value": 83.53, "unit": "cGy.cm", "system": UCUM, "code": "cGy.cm"}
    if case == "unparseable start":  # the first event's start stands in
        assert summary["effectiveDateTime"] == "2024-03-05T10:15:00+01:00"


def test_events_nested_differently_or_without_uid(tmp_path):
    flat = dr.ct_event(EVENT_1, "12.5", "525.3", dose_container=False)  # CT Dose values directly in the event
    no_uid = dr.ct_event(EVENT_2, "8", "300")
    no_uid.ContentSequence = [item for item in no_uid.ContentSequence if item.ValueType != "UIDREF"]
    ds = dr.ct_report(events=[(flat, None, None), (no_uid, None, None)], event_count="2")
    result = _convert(dr.write(ds, tmp_path / "odd.dcm"))
    assert result.notes == {"unexpected-nesting:dose-report.113830": 1, "unexpected-nesting:dose-report.113838": 1,
                            "no-event:dose-report.113830": 1, "no-event:dose-report.113838": 1}
    observations = _observations(result)
    assert len(observations) == 2  # the summary and the event that has a UID
    assert _components(observations[1])["113830"]["value"] == 12.5


def test_a_report_without_values_or_too_deep_is_noted(tmp_path):
    empty = dr.ct_report(accumulated=[], events=())
    chain = inner = dr.container(dr.dcm("113811", "CT Accumulated Dose Data"), [])
    for _ in range(dose_report.MAX_DEPTH + 2):
        inner.ContentSequence.append(dr.container(dr.dcm("113811", "CT Accumulated Dose Data"), []))
        inner = inner.ContentSequence[-1]
    inner.ContentSequence.append(_num("113813", "1", "mGy.cm"))
    deep = dr.ct_report(accumulated=[], extra=[chain])
    result = _convert(dr.write(empty, tmp_path / "empty.dcm"), dr.write(deep, tmp_path / "deep.dcm"))
    assert result.notes == {"empty:dose-report": 1, "too-deep:dose-report": 1}
    assert len(result.resources["ImagingStudy"]) == 1  # both in one study, written
    assert len(_observations(result)) == 3  # the deep report's events are still read
    assert not result.errors


def test_odd_codes_and_texts_stay_valid(tmp_path):
    ds = dr.ct_report()
    procedure = ds.ContentSequence[0].ConceptCodeSequence[0]
    procedure.CodingSchemeDesignator = "99LOCAL"  # no FHIR system: no procedure component
    result = _convert(dr.write(ds, tmp_path / "ct.dcm"))
    summary = _summary(_observations(result))
    assert "121058" not in _components(summary)
    ds.ContentSequence[0].ConceptCodeSequence[0].CodingSchemeDesignator = "SCT"
    ds.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning = "CT\x07 scan"
    summary = _summary(_observations(_convert(dr.write(ds, tmp_path / "ct.dcm"))))
    assert _components(summary)["121058"]["coding"][0]["display"] == "CT scan"


def test_validator_accepts_every_dose_observation(tmp_path, terms=None):
    """The run's own validator (fhir.resources R4B), as process_study calls it."""
    from terminologies import Terminologies

    from beam_pipeline.fhir.study import StudyGroup
    paths = [dr.write(dr.ct_report(), tmp_path / "ct.dcm"), dr.write(dr.projection_report(), tmp_path / "xa.dcm")]
    for path in paths:
        record = _read(path).record
        group = StudyGroup(record["StudyInstanceUID"]).add(record, keywords.instance_keys())
        built = fhir_build.build_study(group, ConversionConfig(), Terminologies.load())
        assert [t for t, _ in built.resources].count("Observation") >= 1
        assert fhir_build.Validator(full=True).problem(built.resources) is None


# --- in the pipeline, beside images ------------------------------------------------------------

def _study_with_images(folder, with_report: bool):
    ct = pydicom_file("CT_small.dcm")
    study_uid = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    copy_dicom(ct, folder / "ct1.dcm")
    copy_dicom(ct, folder / "ct2.dcm", SOPInstanceUID="1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.99", InstanceNumber=2)
    if with_report:  # written by the scanner: the study-level attributes of its images
        images = dr.read(ct)
        study_level = {k: images.get(k) for k in keywords.CORE_KEYWORDS["study"] if k in images}
        report = dr.ct_report(study_uid, "1.2.826.0.1.3680043.8.498.900", "1.2.826.0.1.3680043.8.498.901",
                              **study_level)
        dr.write(report, folder / "dose.dcm")
    return study_uid


def test_dose_report_in_the_same_study_as_images(tmp_path):
    images_only, with_report = tmp_path / "images", tmp_path / "mixed"
    images_only.mkdir(), with_report.mkdir()
    _study_with_images(images_only, False)
    _study_with_images(with_report, True)
    run_pipeline(images_only, tmp_path / "out-images")
    summary = run_pipeline(with_report, tmp_path / "out", "--bundles")
    off = run_pipeline(with_report, tmp_path / "out-off", "--no-dose-reports")
    assert summary["outcomes"]["converted"] == 3 == sum(summary["outcomes"].values())
    assert summary["studies"]["written"] == 1
    assert summary["resources"]["Observation"] == 3 and off["resources"]["Observation"] == 0
    assert not summary.get("notes")
    study = read_ndjson(tmp_path / "out", "ImagingStudy")[0]
    before = read_ndjson(tmp_path / "out-images", "ImagingStudy")[0]
    by_modality = {series["modality"]["code"]: series for series in study["series"]}
    assert set(by_modality) == {"CT", "SR"}
    assert by_modality["SR"]["instance"][0]["uid"] == "1.2.826.0.1.3680043.8.498.901"
    assert [s for s in study["series"] if s["modality"]["code"] == "CT"] == before["series"]  # images unchanged
    assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 3
    # the ImagingStudy is the same with dose reports off: dose reports only add Observations
    assert raw_lines(tmp_path / "out", "ImagingStudy") == raw_lines(tmp_path / "out-off", "ImagingStudy")
    observations = read_ndjson(tmp_path / "out", "Observation")
    assert {o["partOf"][0]["reference"] for o in observations} == {"ImagingStudy/" + study["id"]}
    assert all(o["subject"] == study["subject"] for o in observations)
    bundle = read_ndjson(tmp_path / "out", "Bundle")[0]
    entries = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    assert {"Observation/" + o["id"] for o in observations} <= entries
    assert set(references(bundle)) - entries <= {study["subject"]["reference"]}


def test_default_output_of_files_without_dose_reports_is_unchanged(tmp_path):
    """pydicom's test files (real SRs among them) convert byte for byte as with dose reports off."""
    paths = sorted(p for p in glob.glob(os.path.join(TEST_FILES, "*")) if os.path.isfile(p))
    default, off = convert_files(paths), convert_files(paths, ConversionConfig(dose_reports=False))
    assert default.lines == off.lines and default.counts == off.counts and default.errors == off.errors
    assert "Observation" not in default.lines
