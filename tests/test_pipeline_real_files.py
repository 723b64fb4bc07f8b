"""The whole pipeline on real DICOM files: ids, references, counts, sorting, validity."""
from __future__ import annotations

import glob
import hashlib
import os
from collections import defaultdict

import pydicom
import pydicom.errors
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.imagingstudy import ImagingStudy
from helpers import DICOMDIR_TREE, read_ndjson, run_pipeline

STUDY_SYSTEM = "https://fhir.diz.uk-erlangen.de/identifiers/imagingstudy-id"
PATIENT_SYSTEM = "https://fhir.diz.uk-erlangen.de/identifiers/patient-id"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def expected_tree():
    """What the dicomdirtests tree holds, read independently with plain pydicom."""
    studies = defaultdict(lambda: {"series": defaultdict(set), "patient": None, "accession": None})
    dicomdirs = 0
    for path in glob.glob(os.path.join(DICOMDIR_TREE, "**"), recursive=True):
        if os.path.isdir(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue  # README.txt and such
        if ds.file_meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
            dicomdirs += 1
            continue
        study = studies[ds.StudyInstanceUID]
        study["series"][ds.SeriesInstanceUID].add(ds.SOPInstanceUID)
        study["patient"] = ds.PatientID
        study["accession"] = ds.get("AccessionNumber") or None
    return studies, dicomdirs


def test_every_study_of_the_tree_is_written_with_readme_ids(dicomdir_run):
    out, summary = dicomdir_run
    studies, dicomdirs = expected_tree()
    written = {s["identifier"][-1]["value"][len("urn:oid:"):]: s for s in read_ndjson(out, "ImagingStudy")}
    assert set(written) == set(studies)
    for uid, expected in studies.items():
        resource = written[uid]
        assert resource["id"] == sha(f"{STUDY_SYSTEM}|{uid}")
        assert resource["identifier"][-1] == {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}
        if expected["accession"]:
            assert resource["identifier"][0]["type"]["coding"][0]["code"] == "ACSN"
            assert resource["identifier"][0]["value"] == expected["accession"]
        subject = resource["subject"]
        assert subject["reference"] == "Patient/" + sha(f"{PATIENT_SYSTEM}|{expected['patient']}")
        assert subject["identifier"]["value"] == expected["patient"]
        assert subject["identifier"]["type"]["coding"][0]["code"] == "MR"
        assert resource["numberOfSeries"] == len(expected["series"])
        assert resource["numberOfInstances"] == sum(len(s) for s in expected["series"].values())
        by_uid = {s["uid"]: s for s in resource["series"]}
        assert set(by_uid) == set(expected["series"])
        for series_uid, sops in expected["series"].items():
            assert {i["uid"] for i in by_uid[series_uid]["instance"]} == sops
            assert by_uid[series_uid]["numberOfInstances"] == len(sops)
        assert resource["status"] == "available"
        assert resource["meta"]["profile"] == [
            "https://www.medizininformatik-initiative.de/fhir/ext/modul-bildgebung/StructureDefinition/"
            "mii-pr-bildgebung-bildgebungsstudie"]
        assert {m["code"] for m in resource["modality"]} == {s["modality"]["code"] for s in resource["series"]}
    assert summary["files_matched"] == sum(1 for p in glob.glob(DICOMDIR_TREE + "/**", recursive=True)
                                           if os.path.isfile(p))
    assert summary["outcomes"]["skipped_dicomdir"] == dicomdirs
    assert summary["outcomes"]["converted"] == sum(
        len(sops) for s in studies.values() for sops in s["series"].values())
    assert sum(summary["outcomes"].values()) == summary["files_matched"]
    assert summary["studies"]["written"] == len(studies)


def test_series_and_instances_are_sorted_by_number_then_uid(dicomdir_run):
    out, _ = dicomdir_run
    for resource in read_ndjson(out, "ImagingStudy"):
        keys = [(s.get("number", float("inf")), s["uid"]) for s in resource["series"]]
        assert keys == sorted(keys)
        for series in resource["series"]:
            keys = [(i.get("number", float("inf")), i["uid"]) for i in series["instance"]]
            assert keys == sorted(keys)
            for instance in series["instance"]:
                assert instance["sopClass"]["system"] == "urn:ietf:rfc:3986"
                assert instance["sopClass"]["code"].startswith("urn:oid:1.2.840.10008.")


def test_every_resource_is_valid_r4b(dicomdir_run):
    out, _ = dicomdir_run
    studies = read_ndjson(out, "ImagingStudy")
    assert studies
    for resource in studies:
        ImagingStudy.model_validate(resource)
    for resource in read_ndjson(out, "Device"):
        Device.model_validate(resource)


def test_devices_are_deduplicated_across_studies_and_referenced(tmp_path):
    from make_archive import make_archive

    manifest = make_archive(tmp_path / "archive", studies=6, series=2, instances=3)
    summary = run_pipeline(tmp_path / "archive", tmp_path / "out")
    devices = read_ndjson(tmp_path / "out", "Device")
    ids = [d["id"] for d in devices]
    assert len(ids) == len(set(ids)), "one line per device for the whole run"
    studies = read_ndjson(tmp_path / "out", "ImagingStudy")
    assert len(studies) == 6
    referenced = {p["actor"]["reference"] for s in studies for se in s["series"] for p in se.get("performer", [])}
    assert referenced == {f"Device/{i}" for i in ids}
    assert len(ids) < sum(len(s["series"]) for s in studies)  # shared by several studies
    for device in devices:
        serial = device["identifier"][0]["value"]
        assert device["id"] == sha(f"{serial}|{device.get('manufacturer', '')}")
        assert device["deviceName"][0]["type"] == "model-name"
        assert device["status"] == "active"
        Device.model_validate(device)
    assert summary["resources"]["Device"] == len(ids)
    assert summary["outcomes"]["converted"] == 6 * 2 * 3
    assert manifest  # generator reports what it wrote


def test_observations_encounter_and_procedure_from_a_real_header(tmp_path):
    from fhir.resources.R4B.observation import Observation
    from helpers import copy_dicom, pydicom_file

    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "77477000", "SCT", "CT scan"
    copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "in" / "ct.dcm", PatientWeight=72.5, PatientSize=1.81,
               AdmissionID="ADM-1", ProcedureCodeSequence=pydicom.Sequence([code]))
    summary = run_pipeline(tmp_path / "in", tmp_path / "out", "--observations")
    study, = read_ndjson(tmp_path / "out", "ImagingStudy")
    observations = read_ndjson(tmp_path / "out", "Observation")
    assert summary["resources"]["Observation"] == len(observations) == 2
    for observation in observations:
        Observation.model_validate(observation)
        assert observation["subject"]["reference"] == study["subject"]["reference"]
    codes = {o["code"]["coding"][0]["code"]: o for o in observations}
    assert codes["29463-7"]["valueQuantity"]["value"] == 72.5
    # PatientSize 1.81 (metres, DICOM) -> 181 cm (UCUM cm, as the R4 bodyheight profile requires)
    assert codes["8302-2"]["valueQuantity"] == {"value": 181, "unit": "cm", "system": "http://unitsofmeasure.org",
                                                "code": "cm"}
    referenced = {e["valueReference"]["reference"] for e in study["extension"] if "valueReference" in e}
    assert referenced == {f"Observation/{o['id']}" for o in observations}
    assert study["encounter"]["reference"].startswith("Encounter/")
    assert study["procedureCode"][0]["coding"][0] == {
        "system": "http://snomed.info/sct", "code": "77477000", "display": "CT scan"}
    ImagingStudy.model_validate(study)
