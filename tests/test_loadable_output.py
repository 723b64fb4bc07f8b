"""The output folder as a FHIR server's loader sees it, written by the real pipeline (issue 11).

Every ``*.ndjson`` is FHIR of the type its name says, the top level holds resource files and the
manifest only, the manifest states each file's exact line count, Bundles are PUT by id and
self-contained, ``--patients``/``--encounters`` make every reference resolvable.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from fhir.resources.R4B import get_fhir_model_class
from helpers import TEST_FILES, copy_dicom, pydicom_file, read_ndjson, references, run_pipeline

FLAGS = ("--observations", "--patients", "--encounters", "--bundles")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """pydicom's files (many patients, studies, faults) plus studies with vitals and admissions."""
    root = tmp_path_factory.mktemp("loadable-in")
    shutil.copytree(TEST_FILES, root / "pydicom", symlinks=True)
    copy_dicom(pydicom_file("JPEG2000.dcm"), root / "extra" / "nm.dcm", StudyInstanceUID="1.2.826.0.1.3680043.9.11.1",
               PatientSize="1.78", PatientWeight="80", AdmissionID="ADM-7")
    copy_dicom(pydicom_file("CT_small.dcm"), root / "extra" / "ct.dcm", StudyInstanceUID="1.2.826.0.1.3680043.9.11.2",
               PatientID="8NM1", AdmissionID="ADM-7", PatientSize="1.81")
    return root


@pytest.fixture(scope="module")
def full_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadable-out")
    summary = run_pipeline(archive, out, *FLAGS, "--dataflow_kms_key", "projects/p/cryptoKeys/TOPSECRET")
    return out, summary


def ndjson_files(out) -> list[str]:
    return sorted(glob.glob(os.path.join(str(out), "**", "*.ndjson"), recursive=True))


def lines_of(path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return handle.read().splitlines()


def manifest_of(out) -> dict:
    with open(os.path.join(str(out), "manifest.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_every_ndjson_file_holds_fhir_resources_of_the_type_its_name_says(full_run):
    out, summary = full_run
    files = ndjson_files(out)
    types = {os.path.basename(path).split("-", 1)[0] for path in files}
    assert types == {"ImagingStudy", "Device", "Observation", "Patient", "Encounter", "Bundle", "OperationOutcome"}
    for path in files:
        resource_type = os.path.basename(path).split("-", 1)[0]
        model = get_fhir_model_class(resource_type)
        for line in lines_of(path):
            resource = json.loads(line)
            assert resource["resourceType"] == resource_type, path
            model.model_validate(resource)


def test_top_level_holds_resource_files_and_the_manifest_only(full_run, dicomdir_run):
    for out, _ in (full_run, dicomdir_run):
        top = sorted(entry.name for entry in os.scandir(out) if entry.is_file())
        assert "manifest.json" in top
        others = [name for name in top if name != "manifest.json"]
        assert others and all(name.endswith(".ndjson") and name.split("-")[0] in
                              ("ImagingStudy", "Device", "Observation", "Patient", "Encounter") for name in others)
        assert os.path.isfile(os.path.join(out, "_report", "summary.json"))
    out, summary = full_run
    errors = read_ndjson(out, "errors")
    outcomes = read_ndjson(out, "OperationOutcome")
    assert len(errors) == len(outcomes) == sum(summary["errors_by_reason"].values()) > 0
    reasons = sorted(o["issue"][0]["details"]["coding"][0]["code"] for o in outcomes)
    assert reasons == sorted(e["reason"] for e in errors)


def test_manifest_lists_each_file_with_its_exact_line_count(full_run):
    out, summary = full_run
    manifest = manifest_of(out)
    top_level = {os.path.relpath(p, out) for p in ndjson_files(out) if os.path.dirname(p) == str(out)}
    assert {entry["url"] for entry in manifest["output"]} == top_level
    for entry in manifest["output"]:
        assert entry["url"].startswith(entry["type"] + "-")
        assert entry["count"] == len(lines_of(os.path.join(out, entry["url"])))
    totals = {}
    for entry in manifest["output"]:
        totals[entry["type"]] = totals.get(entry["type"], 0) + entry["count"]
    assert totals == {k: v for k, v in summary["resources"].items() if v and k != "Bundle"}
    reported = {os.path.relpath(p, out) for p in ndjson_files(os.path.join(out, "_report"))}
    assert {e["url"] for e in manifest["error"]} == reported
    assert all(e["type"] == "OperationOutcome" and e["count"] == len(lines_of(os.path.join(out, e["url"])))
               for e in manifest["error"])
    bundles = manifest["extension"]["transactionBundles"]
    assert sum(b["count"] for b in bundles) == summary["resources"]["Bundle"] == summary["studies"]["written"]
    assert all(b["count"] == len(lines_of(os.path.join(out, b["url"]))) for b in bundles)
    assert manifest["requiresAccessToken"] is False
    assert manifest["transactionTime"].endswith("Z")
    assert manifest["request"].startswith("python -m beam_pipeline --input ")
    assert "--bundles" in manifest["request"] and "TOPSECRET" not in manifest["request"]


def test_bundles_are_put_by_id_and_self_contained(full_run):
    out, summary = full_run
    bundles = read_ndjson(out, "Bundle")
    assert len(bundles) == summary["studies"]["written"]
    written = {f"{t}/{r['id']}": r for t in ("ImagingStudy", "Device", "Observation", "Patient", "Encounter")
               for r in read_ndjson(out, t)}
    in_bundles = set()
    for bundle in bundles:
        assert bundle["type"] == "transaction"
        urls = {entry["request"]["url"] for entry in bundle["entry"]}
        for entry in bundle["entry"]:
            resource = entry["resource"]
            url = f"{resource['resourceType']}/{resource['id']}"
            assert entry["request"] == {"method": "PUT", "url": url}
            assert resource == written[url]  # the same resource as in the bulk files
            in_bundles.add(url)
        assert set(references([e["resource"] for e in bundle["entry"]])) <= urls  # with --patients/--encounters
    assert in_bundles == set(written)


def test_patients_and_encounters_make_every_reference_resolvable(full_run):
    out, _ = full_run
    ids = {f"{t}/{r['id']}" for t in ("ImagingStudy", "Device", "Observation", "Patient", "Encounter")
           for r in read_ndjson(out, t)}
    subjects = [r["subject"]["reference"] for t in ("ImagingStudy", "Observation", "Encounter")
                for r in read_ndjson(out, t)]
    assert subjects and set(subjects) <= ids
    for resource_type in ("ImagingStudy", "Device", "Observation", "Patient", "Encounter"):
        for resource in read_ndjson(out, resource_type):
            assert set(references(resource)) <= ids, resource_type
    visits = [e["identifier"][0]["value"] for e in read_ndjson(out, "Encounter")]
    assert visits.count("ADM-7") == 1  # two studies of one admission: one Encounter
    patients = read_ndjson(out, "Patient")
    assert len(patients) == len({p["id"] for p in patients})  # each once, however many studies refer to it


def test_body_height_in_centimetres_through_the_pipeline(full_run):
    out, _ = full_run
    heights = {o["valueQuantity"]["value"] for o in read_ndjson(out, "Observation")
               if o["code"]["coding"][0]["code"] == "8302-2"}
    assert {178, 181} <= heights
    assert all(o["valueQuantity"]["code"] == "cm" for o in read_ndjson(out, "Observation")
               if o["code"]["coding"][0]["code"] == "8302-2")


def test_rerun_writes_the_same_bundles_and_counts_with_an_absolute_base(archive, full_run, tmp_path):
    out, _ = full_run
    again = tmp_path / "again"
    run_pipeline(archive, again, *FLAGS, "--manifest-base-url", "https://storage.googleapis.com/bucket/run1/")
    assert sorted(map(json.dumps, read_ndjson(again, "Bundle"))) == sorted(map(json.dumps, read_ndjson(out, "Bundle")))
    first, second = manifest_of(out), manifest_of(again)
    assert [e["url"] for e in second["output"]] == [
        "https://storage.googleapis.com/bucket/run1/" + e["url"] for e in first["output"]]
    assert [e["count"] for e in second["output"]] == [e["count"] for e in first["output"]]


def test_without_flags_no_patients_encounters_or_bundles(dicomdir_run):
    out, summary = dicomdir_run
    assert not read_ndjson(out, "Patient") and not read_ndjson(out, "Bundle") and not read_ndjson(out, "Encounter")
    manifest = manifest_of(out)
    assert "extension" not in manifest
    assert {e["type"] for e in manifest["output"]} == {"ImagingStudy"} | (
        {"Device"} if summary["resources"]["Device"] else set())
    assert all(not e["url"].startswith(("/", "http")) for e in manifest["output"])
