"""Output a FHIR server loads as it is: transaction Bundles, Patient/Encounter, manifest, error outcomes.

Pure functions over resources built from real DICOM headers (pydicom's test files): no Beam here.
"""
from __future__ import annotations

import json
import shlex
import warnings
from collections import Counter

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from helpers import copy_dicom, pydicom_file, references

from beam_pipeline.codes import Reason
from beam_pipeline.dicom import header
from beam_pipeline.fhir import build as fhir_build
from beam_pipeline.fhir import bulk_data
from beam_pipeline.fhir.bundles import transaction_bundle
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.fhir.keywords import header_spec, instance_keys
from beam_pipeline.fhir.referenced import referenced_resources
from beam_pipeline.fhir.study import StudyGroup
from terminologies import Terminologies

CONFIG = ConversionConfig(observations=True)
# FHIR R4 IssueType codes (http://hl7.org/fhir/issue-type).
ISSUE_TYPES = frozenset(
    "invalid structure required value invariant security login unknown expired forbidden suppressed processing "
    "not-supported duplicate multiple-matches not-found deleted too-long code-invalid extension too-costly "
    "business-rule conflict transient lock-error no-store exception timeout incomplete throttled informational".split())


@pytest.fixture(scope="module")
def terms():
    return Terminologies.load()


def read_record(path, use_fast=True) -> dict:
    with warnings.catch_warnings(), open(path, "rb") as handle:
        warnings.simplefilter("ignore")
        result = header.read_header(handle, header_spec(), use_fast=use_fast)
    assert result.kind == header.INSTANCE, result
    return result.record


def build(paths, terms, config=CONFIG) -> list[list[tuple[str, dict]]]:
    """The resources of each study, as the pipeline builds them (one list per study, by study uid)."""
    groups: dict[str, StudyGroup] = {}
    for path in paths:
        record = read_record(path)
        groups.setdefault(record["StudyInstanceUID"], StudyGroup(record["StudyInstanceUID"])).add(
            record, instance_keys())
    studies = []
    for uid in sorted(groups):
        built = fhir_build.build_study(groups[uid], config, terms)
        assert built.rejection is None, built.rejection
        studies.append(built.resources)
    return studies


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Real headers: an NM study with a scanner (Device), vitals and an admission; a CT of the same
    patient in the same admission; an MR of another patient."""
    root = tmp_path_factory.mktemp("archive")
    return [
        copy_dicom(pydicom_file("JPEG2000.dcm"), root / "nm.dcm", PatientSize="1.78", PatientWeight="80",
                   AdmissionID="ADM-7"),
        copy_dicom(pydicom_file("CT_small.dcm"), root / "ct.dcm", PatientID="8NM1", AdmissionID="ADM-7",
                   PatientSize="1.81"),
        copy_dicom(pydicom_file("MR_small.dcm"), root / "mr.dcm"),
    ]


# --- body height ---------------------------------------------------------------------------------

@pytest.mark.parametrize("use_fast", [True, False], ids=["fast-reader", "pydicom"])
@pytest.mark.parametrize("size, centimetres", [("1.78", 178), ("1.81", 181), ("1.755", 175.5), ("0.57", 57)])
def test_body_height_from_a_real_header_is_in_centimetres(tmp_path, terms, use_fast, size, centimetres):
    path = copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "ct.dcm", PatientSize=size)
    assert read_record(path, use_fast)["PatientSize"] == float(size)  # metres, as DICOM writes it
    built = fhir_build.build_study(StudyGroup(read_record(path)["StudyInstanceUID"]).add(
        read_record(path, use_fast), instance_keys()), CONFIG, terms)
    (height,) = [r for t, r in built.resources if t == "Observation" and r["code"]["coding"][0]["code"] == "8302-2"]
    assert height["valueQuantity"] == {"value": centimetres, "unit": "cm", "system": "http://unitsofmeasure.org",
                                       "code": "cm"}
    assert json.dumps(height["valueQuantity"]["value"]) == json.dumps(centimetres)  # no 177.99999999999997
    Observation.model_validate(height)


# --- Patient and Encounter -----------------------------------------------------------------------

def test_patients_and_encounters_resolve_every_subject_and_encounter_reference(archive, terms):
    studies = build(archive, terms)
    made = {}
    for resources in studies:
        for resource_type, resource in referenced_resources(resources, patients=True, encounters=True):
            made.setdefault(f"{resource_type}/{resource['id']}", resource)
    assert sorted(k.split("/")[0] for k in made) == ["Encounter", "Patient", "Patient"]  # deduplicated
    for resources in studies:
        for resource_type, resource in resources:
            for key in ("subject", "encounter"):
                if key in resource:
                    assert resource[key]["reference"] in made, (resource_type, key)
    for key, resource in made.items():
        if key.startswith("Patient/"):
            Patient.model_validate(resource)
            (identifier,) = resource["identifier"]
            assert identifier["type"]["coding"][0]["code"] == "MR"
            assert identifier["system"] == CONFIG.patient_id_system and identifier["value"] in {"8NM1", "4MR1"}
            assert resource["id"] == bulk_data.sha256_id(CONFIG.patient_id_system, identifier["value"])
        else:
            Encounter.model_validate(resource)
            assert resource["identifier"][0]["type"]["coding"][0]["code"] == "VN"
            assert resource["identifier"][0]["value"] == "ADM-7"
            assert resource["subject"]["reference"] in made and resource["status"] == "unknown"


def test_nothing_is_made_unless_asked(archive, terms):
    for resources in build(archive, terms):
        assert referenced_resources(resources, patients=False, encounters=False) == []
        assert {t for t, _ in referenced_resources(resources, patients=True, encounters=False)} == {"Patient"}


# --- transaction Bundles -------------------------------------------------------------------------

@pytest.mark.parametrize("with_referenced", [False, True], ids=["resources-only", "with-patients-encounters"])
def test_bundles_put_by_id_and_reference_only_their_own_entries(archive, terms, with_referenced):
    for resources in build(archive, terms):
        if with_referenced:
            resources = resources + referenced_resources(resources, patients=True, encounters=True)
        bundle = transaction_bundle(resources)
        Bundle.model_validate(bundle)
        assert bundle["type"] == "transaction"
        entries = bundle["entry"]
        assert len(entries) == len({(t, r["id"]) for t, r in resources})
        for entry in entries:
            resource = entry["resource"]
            assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
        assert len({e["fullUrl"] for e in entries}) == len(entries)
        in_bundle = {e["request"]["url"] for e in entries}
        for reference in references([e["resource"] for e in entries]):
            if with_referenced:
                assert reference in in_bundle
            else:
                assert reference in in_bundle or reference.split("/")[0] in ("Patient", "Encounter")
        position = {e["request"]["url"]: i for i, e in enumerate(entries)}
        study_url = next(url for url in position if url.startswith("ImagingStudy/"))
        assert all(position[ref] < position[study_url]  # referenced entries come first
                   for ref in references(entries[position[study_url]]) if ref in position)


def test_bundle_is_the_same_whatever_the_order_of_its_resources(archive, terms):
    studies = build(archive, terms)
    nm = next(s for s in studies if any(t == "Device" for t, _ in s))  # the study with a scanner
    assert {t for t, _ in nm} == {"ImagingStudy", "Device", "Observation"}
    assert transaction_bundle(nm) == transaction_bundle(list(reversed(nm))) == transaction_bundle(nm + nm)
    ids = {transaction_bundle(resources)["id"] for resources in studies}
    assert len(ids) == len(studies)


# --- manifest --------------------------------------------------------------------------------------

def write_ndjson(path, resources) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in resources), encoding="utf-8")


def test_manifest_lists_each_file_with_its_line_count(tmp_path, archive, terms):
    by_type: dict[str, list] = {}
    for resources in build(archive, terms):
        for resource_type, resource in resources:
            by_type.setdefault(resource_type, []).append(resource)
    files = []
    for resource_type, resources in by_type.items():  # two shards for each type with more than one line
        halves = [resources[: len(resources) // 2], resources[len(resources) // 2:]]
        for index, half in enumerate(h for h in halves if h):
            name = f"{resource_type}-{index:05d}-of-00002.ndjson"
            write_ndjson(tmp_path / name, half)
            files.append((resource_type, name, len((tmp_path / name).read_text().splitlines())))
    errors = [bulk_data.error_outcome({"reason": "truncated", "path": "/a/b.dcm", "detail": "ends early"})]
    (tmp_path / "_report").mkdir()
    write_ndjson(tmp_path / "_report" / "OperationOutcome-00000-of-00001.ndjson", errors)
    manifest = bulk_data.manifest(
        transaction_time="2026-11-25T14:00:00.000Z", request="python -m beam_pipeline --input x --output y",
        requires_access_token=False, outputs=reversed(files),
        errors=[("_report/OperationOutcome-00000-of-00001.ndjson", 1)])
    assert [o["url"] for o in manifest["output"]] == sorted(name for _, name, _ in files)
    for entry in manifest["output"]:
        lines = (tmp_path / entry["url"]).read_text(encoding="utf-8").splitlines()
        assert entry["count"] == len(lines) > 0
        assert {json.loads(line)["resourceType"] for line in lines} == {entry["type"]}
        assert entry["url"].startswith(entry["type"] + "-")
    (error,) = manifest["error"]
    assert error["type"] == "OperationOutcome" and (tmp_path / error["url"]).exists()
    assert sum(e["count"] for e in manifest["output"]) == sum(len(v) for v in by_type.values())

    absolute = bulk_data.manifest(transaction_time=manifest["transactionTime"], request="x", requires_access_token=True,
                                  outputs=files, errors=[], base_url="https://storage.example/bucket/run1/")
    assert absolute["output"][0]["url"] == "https://storage.example/bucket/run1/" + manifest["output"][0]["url"]
    assert absolute["requiresAccessToken"] is True and absolute["error"] == []


def test_transaction_time_is_a_fhir_instant():
    from datetime import datetime, timezone

    from fhir.resources.R4B.meta import Meta

    stamp = bulk_data.transaction_time(datetime(2026, 11, 25, 15, 4, 5, 123456, tzinfo=timezone.utc))
    assert stamp == "2026-11-25T15:04:05.123Z"
    Meta.model_validate({"lastUpdated": bulk_data.transaction_time()})  # Meta.lastUpdated is an instant


@pytest.mark.parametrize("argv, hidden, kept", [
    (["--input", "/data", "--output", "gs://b/out", "--access_token", "ya29.SECRET"], "ya29.SECRET",
     "--output gs://b/out"),
    (["--input", "/data", "--db-password=hunter2", "--observations"], "hunter2", "--observations"),
    (["--input", "https://user:s3cret@pacs.example/dicomweb", "--output", "/o"], "s3cret", "pacs.example/dicomweb"),
    (["--manifest-base-url", "https://b.example/o?X-Goog-Signature=abc123", "--output", "/o"], "abc123",
     "https://b.example/o?"),
    (["--service_account_key_file", "/keys/sa.json", "--runner", "DataflowRunner"], "/keys/sa.json",
     "--runner DataflowRunner"),
])
def test_request_line_leaves_out_secrets(argv, hidden, kept):
    line = bulk_data.request_line(argv)
    assert hidden not in line
    assert kept in line and line.startswith("python -m beam_pipeline ")
    assert len(shlex.split(line)) == len(argv) + 3  # one token per argument: nothing dropped, only values hidden


# --- errors as OperationOutcome ------------------------------------------------------------------

@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_becomes_a_valid_operation_outcome(reason):
    error = {"reason": str(reason), "path": "/archive/a b/1.dcm", "detail": "what went wrong"}
    outcome = bulk_data.error_outcome(error)
    OperationOutcome.model_validate(outcome)
    (issue,) = outcome["issue"]
    assert issue["severity"] == "error" and issue["code"] in ISSUE_TYPES
    assert issue["details"]["coding"] == [{"system": bulk_data.REASON_SYSTEM, "code": str(reason)}]
    assert issue["details"]["text"] == f"{reason}: what went wrong"
    assert issue["diagnostics"] == "path: /archive/a b/1.dcm"
    assert bulk_data.error_outcome(dict(reversed(list(error.items())))) == outcome  # id: hash of the content


def test_study_errors_name_the_study_and_folder_errors_their_studies():
    study = bulk_data.error_outcome({"reason": "conflicting-patient-id", "study_uid": "1.2.3", "files": 4,
                                     "detail": "2 PatientIDs"})
    assert study["issue"][0]["diagnostics"] == "study_uid: 1.2.3; files: 4"
    folder = bulk_data.error_outcome({"reason": "multiple-studies-in-directory", "path": "/in/a",
                                      "study_uids": ["1.2", "1.3"], "files": 5, "detail": "2 StudyInstanceUIDs"})
    assert folder["issue"][0]["diagnostics"] == "path: /in/a; study_uids: 1.2, 1.3; files: 5"
    assert folder["id"] != study["id"]
    fetch = bulk_data.error_outcome({"reason": "fetch-failed", "study_uid": "1.2.3", "status": 503, "detail": "x"})
    assert fetch["issue"][0]["diagnostics"] == "study_uid: 1.2.3; status: 503"
    unknown = bulk_data.error_outcome({"reason": "some-new-reason"})
    assert unknown["issue"][0]["code"] == "processing" and "diagnostics" not in unknown["issue"][0]
    OperationOutcome.model_validate(unknown)
    assert Counter(o["issue"][0]["code"] for o in (study, folder)) == Counter({"business-rule": 2})
