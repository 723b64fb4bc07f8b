"""The MII must-support elements the data allows: endpoint, basedOn, meta.source, and the patient's
identity across sources (IssuerOfPatientID mapped to the identifier system), on generated files
through the real pipeline; the DICOMweb side is in test_dicomweb.py (Orthanc)."""
from __future__ import annotations

import glob
import json
import os
from collections import Counter

import pytest
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest
from helpers import read_ndjson, references, run_pipeline
from issuer_archive import ACCESSION_OID, PATIENT_ID, SYSTEMS, make_issuer_archive, study_files

from beam_pipeline.codes import Reason, sha256_id
from beam_pipeline.fhir import references as refs
from beam_pipeline.fhir.build import build_study
from beam_pipeline.fhir.config import DEFAULT_PATIENT_ID_SYSTEM, ConversionConfig
from beam_pipeline.fhir.study import StudyGroup
from beam_pipeline.run import cli
from beam_pipeline.sources import files as inputs
from terminologies import Terminologies

PROFILE = os.path.join(os.path.dirname(__file__), "mii_profiles",
                       "StructureDefinition-mii-pr-bildgebung-bildgebungsstudie.json")
README = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "mapping.md")
WADO = "https://pacs.example.org/dicom-web"
ACCESSION_SYSTEM = "https://ris.example.org/fhir/sid/accession"
EMPTY_ISSUER_SYSTEM = "https://hosp-c.example/fhir/sid/patient-id"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("issuers") / "archive"
    manifest = make_issuer_archive(root)
    table = tmp_path_factory.mktemp("tables") / "issuers.json"
    table.write_text(json.dumps({**SYSTEMS, "": EMPTY_ISSUER_SYSTEM}), encoding="utf-8")
    return root, manifest["study_uids"], table


def _run(tmp_path_factory, archive, name, *options):
    root, uids, table = archive
    out = tmp_path_factory.mktemp(name)
    options = [str(table) if option == "TABLE" else option for option in options]
    return out, run_pipeline(root, out, *options)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, archive):
    return _run(tmp_path_factory, archive, "default")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, archive):
    return _run(tmp_path_factory, archive, "full", "--patient-id-issuers", "TABLE", "--patients", "--encounters",
                "--service-requests", "--accession-id-system", ACCESSION_SYSTEM, "--wado-rs-base", WADO + "/",
                "--bundles")


def by_uid(out) -> dict[str, dict]:
    return {next(i["value"] for i in s["identifier"] if i["system"] == "urn:dicom:uid")[len("urn:oid:"):]: s
            for s in read_ndjson(out, "ImagingStudy")}


def acsn(study: dict) -> dict:
    return next(i for i in study["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN")


# --- patient identity -------------------------------------------------------------------------

def test_a_given_issuer_not_in_the_table_rejects_its_study_by_default(default_run, archive):
    out, summary = default_run
    _, uids, _ = archive
    assert summary["studies"] == {"written": 1, "rejected": 3}
    assert summary["errors_by_reason"] == {Reason.UNKNOWN_PATIENT_ID_ISSUER: 3}
    assert sum(summary["outcomes"].values()) == summary["files_matched"] == 8
    errors = {e["study_uid"]: e for e in read_ndjson(out, "errors")}
    assert set(errors) == {uids[0], uids[1], uids[3]}
    assert "'HOSP_A'" in errors[uids[0]]["detail"] and "'HOSP_B'" in errors[uids[1]]["detail"]
    assert "UniversalEntityID '1.2.276.0.76.4.2'" in errors[uids[3]]["detail"]
    assert not any(PATIENT_ID in e["detail"] for e in errors.values())  # names the issuer, never the patient
    [study] = read_ndjson(out, "ImagingStudy")  # the study without issuer: the default system, as before
    assert study["subject"]["identifier"]["system"] == DEFAULT_PATIENT_ID_SYSTEM
    assert study["subject"]["reference"] == "Patient/" + sha256_id(DEFAULT_PATIENT_ID_SYSTEM, PATIENT_ID)


def test_the_issuer_table_keeps_equal_patient_ids_of_two_hospitals_apart(full_run, archive):
    out, summary = full_run
    _, uids, _ = archive
    assert summary["studies"] == {"written": 4, "rejected": 0}
    studies = by_uid(out)
    systems = [studies[uid]["subject"]["identifier"]["system"] for uid in uids]
    assert systems == [SYSTEMS["HOSP_A"], SYSTEMS["HOSP_B"], EMPTY_ISSUER_SYSTEM, SYSTEMS["1.2.276.0.76.4.2"]]
    assert {studies[uid]["subject"]["identifier"]["value"] for uid in uids} == {PATIENT_ID}
    patients = read_ndjson(out, "Patient")
    assert len(patients) == summary["resources"]["Patient"] == 4  # four people, not one
    for patient in patients:
        Patient.model_validate(patient)
        identifier = patient["identifier"][0]
        assert patient["id"] == sha256_id(identifier["system"], identifier["value"])  # the hash holds the system
    assert {"Patient/" + p["id"] for p in patients} == {s["subject"]["reference"] for s in studies.values()}


def test_unknown_issuers_take_the_default_system_only_when_asked(tmp_path_factory, archive):
    out, summary = _run(tmp_path_factory, archive, "lenient", "--unknown-patient-id-issuer", "default",
                        "--patients", "--meta-source", "urn:example:archive-1")
    assert summary["studies"] == {"written": 4, "rejected": 0}
    assert summary["notes"]["unmapped:IssuerOfPatientID"] == 3  # the issuers left out of the identity
    assert summary["resources"]["Patient"] == 1  # what the user asked for: one system for all
    assert {s["meta"]["source"] for s in read_ndjson(out, "ImagingStudy")} == {"urn:example:archive-1"}


def _record(uid, sop, **fields):
    return {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1", "SOPInstanceUID": sop,
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "Modality": "CT", "PatientID": "P1", **fields}


def test_instances_of_one_study_with_different_issuers_are_a_conflict():
    group = StudyGroup("1.2.3")
    group.add(_record("1.2.3", "1.2.3.1.1", IssuerOfPatientID="HOSP_A"), ())
    group.merge(StudyGroup("1.2.3").add(_record("1.2.3", "1.2.3.1.2"), ()))
    built = build_study(group, ConversionConfig(unknown_patient_id_issuer="default"), Terminologies.load())
    assert built.rejection[0] == Reason.CONFLICTING_PATIENT_ID
    assert "issuers" in built.rejection[1] and "HOSP_A" not in built.rejection[1]


def test_issuer_lookup_order():
    config = ConversionConfig(patient_id_issuers=(("A", "urn:a"), ("1.2.3", "urn:oid:1.2.3")))
    assert refs.patient_id_system(("A", "9.9"), config) == ("urn:a", True)
    assert refs.patient_id_system(("X", "1.2.3"), config) == ("urn:oid:1.2.3", True)  # then the qualifier
    assert refs.patient_id_system(("", ""), config) == (DEFAULT_PATIENT_ID_SYSTEM, True)
    assert refs.patient_id_system(("X", ""), config) == (None, False)


# --- basedOn ----------------------------------------------------------------------------------

def test_based_on_references_the_order_by_accession_number(default_run, full_run, archive):
    _, uids, _ = archive
    [study] = read_ndjson(default_run[0], "ImagingStudy")  # default: a logical reference only
    assert study["basedOn"] == [{"type": "ServiceRequest", "identifier": acsn(study)}]
    assert "system" not in acsn(study)  # no issuer, no --accession-id-system: as the identifier always was

    out, summary = full_run
    studies = by_uid(out)
    assert acsn(studies[uids[0]])["system"] == "urn:oid:" + ACCESSION_OID  # IssuerOfAccessionNumberSequence
    assert [acsn(studies[uid])["system"] for uid in uids[1:]] == [ACCESSION_SYSTEM] * 3  # local issuer: the option
    assert summary["notes"]["unmapped:IssuerOfAccessionNumberSequence"] == 1
    requests = {r["id"]: r for r in read_ndjson(out, "ServiceRequest")}
    assert len(requests) == summary["resources"]["ServiceRequest"] == 4
    for study in studies.values():
        [based_on] = study["basedOn"]
        assert based_on["identifier"] == acsn(study)
        request = requests[based_on["reference"].split("/", 1)[1]]
        ServiceRequest.model_validate(request)
        assert request["identifier"] == [acsn(study)]
        assert request["subject"] == {"reference": study["subject"]["reference"]}
        assert (request["status"], request["intent"]) == ("unknown", "order")


# --- endpoint ---------------------------------------------------------------------------------

def test_one_endpoint_for_every_study(default_run, full_run):
    out, summary = full_run
    [endpoint] = read_ndjson(out, "Endpoint")
    Endpoint.model_validate(endpoint)
    assert endpoint["address"] == WADO  # the service base: {address}/studies/{uid} retrieves a study
    assert endpoint["id"] == sha256_id("dicom-wado-rs", WADO)
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs" and endpoint["status"] == "active"
    assert endpoint["payloadMimeType"] == ["application/dicom"] and endpoint["payloadType"]
    assert summary["resources"]["Endpoint"] == 1
    assert {json.dumps(s["endpoint"]) for s in read_ndjson(out, "ImagingStudy")} == {
        json.dumps([{"reference": "Endpoint/" + endpoint["id"]}])}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["count"] for o in manifest["output"] if o["type"] == "Endpoint"] == [1]

    default_out, default_summary = default_run  # files without --wado-rs-base: none, as before
    assert not glob.glob(str(default_out / "Endpoint-*"))
    assert default_summary["resources"]["Endpoint"] == 0
    assert all("endpoint" not in s for s in read_ndjson(default_out, "ImagingStudy"))


def test_bundles_carry_the_new_resources_and_resolve_every_reference(full_run):
    out, _ = full_run
    bundles = read_ndjson(out, "Bundle")
    assert len(bundles) == 4
    for bundle in bundles:
        types = [e["resource"]["resourceType"] for e in bundle["entry"]]
        assert types[-1] == "ImagingStudy" and {"Endpoint", "ServiceRequest", "Patient"} <= set(types)
        assert types.index("Patient") < types.index("ServiceRequest")  # referenced before referencing
        inside = {e["request"]["url"] for e in bundle["entry"]}
        assert set(references(bundle)) <= inside


# --- meta.source ------------------------------------------------------------------------------

def test_meta_source_is_the_input_root(default_run, full_run, archive):
    root, _, _ = archive
    for out, _ in (default_run, full_run):
        sources = {s["meta"]["source"] for s in read_ndjson(out, "ImagingStudy")}
        assert sources == {root.as_uri()}  # never a patient's folder or a file below it
        assert not any(PATIENT_ID in source for source in sources)


def test_meta_source_of_a_glob_is_its_fixed_folder(tmp_path, archive):
    root, _, _ = archive
    summary = run_pipeline(f"{root}/*/study0000[12]/*/*.dcm", tmp_path / "out", "--patient-id-issuers",
                           str(archive[2]))
    assert summary["studies"]["written"] == 2
    assert {s["meta"]["source"] for s in read_ndjson(tmp_path / "out", "ImagingStudy")} == {root.as_uri()}


def test_root_uri_never_goes_below_the_root(tmp_path, archive):
    root, _, _ = archive
    one_file = study_files(root, 3)[0]
    assert inputs.root_uri(inputs.resolve_pattern(one_file)) == "file://" + os.path.dirname(one_file)
    odd = tmp_path / "Study [2020] ü"
    odd.mkdir()
    assert inputs.root_uri(inputs.resolve_pattern(str(odd))) == odd.as_uri()
    assert odd.as_uri().endswith("/Study%20%5B2020%5D%20%C3%BC")
    assert inputs.root_uri("gs://bucket/archive/2024/**") == "gs://bucket/archive/2024"
    assert inputs.root_uri("gs://bucket/archive/*/Pat Mueller*.dcm") == "gs://bucket/archive"
    assert inputs.root_uri("gs://bucket/archive/x.dcm") == "gs://bucket/archive"


# --- the profile: every must-support element the data allows ----------------------------------

def test_every_must_support_element_of_the_profile_is_written_or_documented(full_run, archive):
    _, uids, _ = archive
    with open(PROFILE, encoding="utf-8") as handle:
        elements = json.load(handle)["differential"]["element"]
    must = {e["path"].split(".", 1)[1] for e in elements if e.get("mustSupport") and e["path"].count(".") == 1}
    study = by_uid(full_run[0])[uids[0]]  # the study with an AdmissionID (encounter) and issuers
    ImagingStudy.model_validate(study)
    missing = {name for name in must if name not in study}
    assert missing == {"procedureReference", "reasonReference"}  # left to other pipelines, see docs/mapping.md
    assert set(study["meta"]) == {"source", "profile"}
    with open(README, encoding="utf-8") as handle:
        readme = handle.read()
    assert "`procedureReference`" in readme and "`reasonReference`" in readme


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("not json", "cannot be read as JSON"),
    ('["HOSP_A"]', "must be a JSON object"),
    ('{"HOSP_A": "not a uri"}', "is not an absolute URI"),
])
def test_a_bad_issuer_table_is_a_usage_error(tmp_path, capsys, content, message):
    table = tmp_path / "issuers.json"
    table.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--patient-id-issuers", str(table)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["ftp://pacs/dicom-web", "https://user:secret@pacs/dicom-web", "https://pacs/x?key=1"])
def test_a_bad_wado_rs_base_is_a_usage_error(tmp_path, capsys, url):
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--wado-rs-base", url])
    assert stop.value.code == 2
    assert "secret" not in capsys.readouterr().err


def test_without_the_new_options_only_meta_source_and_based_on_are_new(default_run):
    """The default output differs from the earlier one only in the two elements the issue demands."""
    out, _ = default_run
    [study] = read_ndjson(out, "ImagingStudy")
    keys = Counter(study)
    assert "endpoint" not in keys and "basedOn" in keys and study["meta"]["source"].startswith("file://")
    assert list(study["meta"]) == ["source", "profile"]  # FHIR's element order
    assert list(study)[:4] == ["resourceType", "id", "meta", "identifier"]


def test_both_readers_decode_the_issuer_sequences_alike(archive):
    import warnings

    from beam_pipeline.dicom import header
    from beam_pipeline.fhir.keywords import header_spec

    root, _, _ = archive
    spec = header_spec()
    seen = Counter()
    for path in sorted(glob.glob(f"{root}/**/*.dcm", recursive=True)):
        with warnings.catch_warnings(), open(path, "rb") as fast, open(path, "rb") as slow:
            warnings.simplefilter("ignore")
            by_scanner = header.read_header(fast, spec, use_fast=True)
            by_pydicom = header.read_header(slow, spec, use_fast=False)
        assert by_scanner.notes == () and by_scanner.record == by_pydicom.record, path
        seen.update(k for k in by_scanner.record if k.startswith("Issuer"))
    assert seen == {"IssuerOfPatientID": 4, "IssuerOfPatientIDQualifiersSequence": 2,
                    "IssuerOfAccessionNumberSequence": 4}
