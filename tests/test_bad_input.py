"""Each kind of bad input lands in its own outcome with a reason; the run finishes; nothing is lost."""
from __future__ import annotations

import os
import shutil

import pydicom
import pytest
from helpers import DICOMDIR_TREE, copy_dicom, pydicom_file, read_ndjson, run_pipeline
from pydicom.uid import generate_uid

CT = pydicom_file("CT_small.dcm")
MR = pydicom_file("MR_small.dcm")


def uid(name: str) -> str:
    return generate_uid(entropy_srcs=[name])


@pytest.fixture(scope="module")
def messy_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    copy_dicom(CT, root / "good" / "ct.dcm")
    copy_dicom(CT, root / "copies" / "ct-again.dcm")                       # exact duplicate
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a DICOM file\n" * 20)
    (root / "notes" / "empty.dcm").write_bytes(b"")
    with open(CT, "rb") as handle:
        (root / "notes" / "truncated.dcm").write_bytes(handle.read(700))
    shutil.copyfile(os.path.join(DICOMDIR_TREE, "DICOMDIR"), root / "DICOMDIR")
    copy_dicom(MR, root / "bad" / "no-study.dcm", StudyInstanceUID=None)
    copy_dicom(MR, root / "bad" / "no-series.dcm", SeriesInstanceUID=None, StudyInstanceUID=uid("s1"))
    copy_dicom(MR, root / "bad" / "no-sop.dcm", SOPInstanceUID=None, StudyInstanceUID=uid("s2"))
    # One study, two instances, two different patients.
    copy_dicom(MR, root / "pid" / "a.dcm", StudyInstanceUID=uid("pid"), SOPInstanceUID=uid("pid-a"))
    copy_dicom(MR, root / "pid" / "b.dcm", StudyInstanceUID=uid("pid"), SOPInstanceUID=uid("pid-b"),
               PatientID="SOMEONE-ELSE")
    copy_dicom(MR, root / "acc" / "a.dcm", StudyInstanceUID=uid("acc"), SOPInstanceUID=uid("acc-a"),
               AccessionNumber="A1")
    copy_dicom(MR, root / "acc" / "b.dcm", StudyInstanceUID=uid("acc"), SOPInstanceUID=uid("acc-b"),
               AccessionNumber="A2")
    # The same SOP instance filed under two different series.
    copy_dicom(MR, root / "dup" / "a.dcm", StudyInstanceUID=uid("dup"), SOPInstanceUID=uid("dup-x"))
    copy_dicom(MR, root / "dup" / "b.dcm", StudyInstanceUID=uid("dup"), SOPInstanceUID=uid("dup-x"),
               SeriesInstanceUID=uid("dup-other-series"))
    copy_dicom(MR, root / "date" / "a.dcm", StudyInstanceUID=uid("date"), StudyDate="20051399",
               SeriesDate="20051399")
    summary = run_pipeline(root, root.parent / (root.name + "-out"))
    return root, root.parent / (root.name + "-out"), summary


def errors_by(out, key):
    return {e.get(key): e for e in read_ndjson(out, "errors") if e.get(key)}


def test_outcomes_add_up_to_files_matched(messy_archive):
    _, _, summary = messy_archive
    assert summary["files_matched"] == 16
    assert sum(summary["outcomes"].values()) == 16
    assert summary["outcomes"] == {
        "converted": 2,            # CT study + the study with the bad date
        "duplicate": 1,
        "skipped_not_dicom": 1,
        "skipped_dicomdir": 1,
        "error": 5,                # empty, truncated, 3 missing uids
        "rejected_with_study": 6,  # 3 studies x 2 files
    }


@pytest.mark.parametrize("name, reason", [
    ("notes/empty.dcm", "empty-file"),
    ("notes/truncated.dcm", "truncated"),
    ("bad/no-study.dcm", "missing-study-instance-uid"),
    ("bad/no-series.dcm", "missing-series-instance-uid"),
    ("bad/no-sop.dcm", "missing-sop-instance-uid"),
])
def test_file_errors_carry_path_and_reason(messy_archive, name, reason):
    root, out, summary = messy_archive
    errors = errors_by(out, "path")
    error = errors[str(root / name)]
    assert error["reason"] == reason
    assert error["detail"]
    assert summary["errors_by_reason"][reason] == 1


@pytest.mark.parametrize("study, reason", [
    ("pid", "conflicting-patient-id"),
    ("acc", "conflicting-accession-number"),
    ("dup", "conflicting-duplicate-instance"),
])
def test_inconsistent_studies_are_rejected_whole(messy_archive, study, reason):
    _, out, summary = messy_archive
    error = errors_by(out, "study_uid")[uid(study)]
    assert error["reason"] == reason
    assert error["files"] == 2
    assert "SOMEONE-ELSE" not in error["detail"]  # no patient ids in messages
    written = {s["identifier"][-1]["value"] for s in read_ndjson(out, "ImagingStudy")}
    assert f"urn:oid:{uid(study)}" not in written
    assert summary["studies"]["rejected"] == 3


def test_not_dicom_and_dicomdir_are_skipped_without_error(messy_archive):
    root, out, _ = messy_archive
    paths = {e.get("path") for e in read_ndjson(out, "errors")}
    assert str(root / "notes" / "readme.txt") not in paths
    assert str(root / "DICOMDIR") not in paths


def test_exact_duplicates_count_once(messy_archive):
    _, out, _ = messy_archive
    ct = [s for s in read_ndjson(out, "ImagingStudy") if s["modality"][0]["code"] == "CT"]
    assert len(ct) == 1
    assert ct[0]["numberOfInstances"] == 1
    assert len(ct[0]["series"][0]["instance"]) == 1


def test_unparseable_date_leaves_started_out_and_is_counted(messy_archive):
    _, out, summary = messy_archive
    study = [s for s in read_ndjson(out, "ImagingStudy") if s["identifier"][-1]["value"] == f"urn:oid:{uid('date')}"]
    assert len(study) == 1
    assert "started" not in study[0]
    assert "started" not in study[0]["series"][0]
    assert summary["notes"]["unparseable:StudyDate"] == 1


def test_directory_mode_rejects_a_folder_with_two_studies(tmp_path):
    root = tmp_path / "archive"
    copy_dicom(CT, root / "folder-one" / "ct.dcm")
    copy_dicom(MR, root / "folder-two" / "mr.dcm")
    copy_dicom(CT, root / "folder-two" / "sub" / "ct.dcm", StudyInstanceUID=uid("other"), SOPInstanceUID=uid("o"))
    summary = run_pipeline(root, tmp_path / "out", "--group-by", "directory")
    errors = read_ndjson(tmp_path / "out", "errors")
    assert [e["reason"] for e in errors] == ["multiple-studies-in-directory"]
    assert errors[0]["path"] == str(root / "folder-two")
    assert errors[0]["files"] == 2
    assert len(errors[0]["study_uids"]) == 2
    studies = read_ndjson(tmp_path / "out", "ImagingStudy")
    assert len(studies) == 1 and studies[0]["modality"][0]["code"] == "CT"
    assert summary["outcomes"]["rejected_with_study"] == 2
    assert summary["outcomes"]["converted"] == 1
    assert sum(summary["outcomes"].values()) == summary["files_matched"] == 3


def test_study_mode_joins_one_study_across_folders(tmp_path):
    root = tmp_path / "archive"
    copy_dicom(MR, root / "a" / "1.dcm", SOPInstanceUID=uid("x1"))
    copy_dicom(MR, root / "b" / "2.dcm", SOPInstanceUID=uid("x2"))
    run_pipeline(root, tmp_path / "out")
    studies = read_ndjson(tmp_path / "out", "ImagingStudy")
    assert len(studies) == 1 and studies[0]["numberOfInstances"] == 2


def test_directory_mode_with_a_relative_input_path(tmp_path, monkeypatch):
    copy_dicom(CT, tmp_path / "archive" / "one" / "ct.dcm")
    copy_dicom(MR, tmp_path / "archive" / "two" / "mr.dcm")
    monkeypatch.chdir(tmp_path)
    summary = run_pipeline("archive", "out", "--group-by", "directory")
    assert summary["outcomes"]["converted"] == 2
    assert summary["studies"]["written"] == 2


def test_missing_input_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline(tmp_path / "nowhere", tmp_path / "out")
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_output_names_no_patient(tmp_path):
    """The CLI's own output (summary, logs, warnings) never carries patient names or ids."""
    import subprocess
    import sys

    copy_dicom(CT, tmp_path / "in" / "a.dcm", PatientID="SECRET-PID-4711", PatientName="Secret^Name",
               StudyDate="2005XX01")
    copy_dicom(CT, tmp_path / "in" / "b.dcm", PatientID="OTHER-PID-0815", PatientName="Other^Name",
               SOPInstanceUID=uid("b"))
    copy_dicom(MR, tmp_path / "in" / "c.dcm", PatientID="THIRD-PID-9")
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, check=True)
    console = done.stdout + done.stderr
    assert "rejected: 1" in console  # the conflicting study was reported
    for secret in ("SECRET-PID-4711", "OTHER-PID-0815", "THIRD-PID-9", "Secret", "Other^Name"):
        assert secret not in console


def test_an_element_out_of_order_does_not_hide_the_study(tmp_path):
    """The fast scanner stops at the first tag past the last one it needs; a private element
    written out of order (group 0099 before 0020) must not make the file look UID-less."""
    from beam_pipeline.dicom import header
    from beam_pipeline.fhir.keywords import header_spec

    data = bytearray(open(CT, "rb").read())
    at = data.index(b"\x09\x00\x10\x00LO")  # CT_small's private creator (0009,0010)
    data[at:at + 2] = b"\x99\x00"
    path = tmp_path / "odd.dcm"
    path.write_bytes(bytes(data))
    spec = header_spec()
    with open(path, "rb") as fp:
        fast = header.read_header(fp, spec)
    with open(path, "rb") as fp:
        slow = header.read_header(fp, spec, use_fast=False)
    assert fast.kind == slow.kind == header.INSTANCE
    assert fast.record == slow.record


def test_directory_mode_rejects_a_study_whose_other_part_is_in_a_rejected_folder(tmp_path):
    root = tmp_path / "archive"
    split = uid("split")
    copy_dicom(MR, root / "X" / "a.dcm", StudyInstanceUID=split, SOPInstanceUID=uid("split-a"))
    copy_dicom(CT, root / "X" / "other.dcm")                       # X holds two studies: rejected
    copy_dicom(MR, root / "Y" / "b.dcm", StudyInstanceUID=split, SOPInstanceUID=uid("split-b"))
    copy_dicom(MR, root / "Z" / "c.dcm", StudyInstanceUID=split, SOPInstanceUID=uid("split-c"))
    copy_dicom(MR, root / "W" / "d.dcm")                           # an unrelated, clean folder
    summary = run_pipeline(root, tmp_path / "out", "--group-by", "directory")
    written = read_ndjson(tmp_path / "out", "ImagingStudy")
    assert [s["identifier"][-1]["value"] for s in written] == [f"urn:oid:{pydicom.dcmread(MR).StudyInstanceUID}"]
    reasons = sorted(e["reason"] for e in read_ndjson(tmp_path / "out", "errors"))
    assert reasons == ["multiple-studies-in-directory", "study-in-rejected-directory"]
    assert summary["outcomes"]["rejected_with_study"] == 4
    assert summary["outcomes"]["converted"] == 1
    assert summary["studies"] == {"written": 1, "rejected": 2}
    assert sum(summary["outcomes"].values()) == summary["files_matched"] == 5


def test_a_fifo_in_the_archive_is_an_error_not_a_hang(tmp_path):
    copy_dicom(MR, tmp_path / "in" / "mr.dcm")
    os.mkfifo(tmp_path / "in" / "pipe.dcm")
    summary = run_pipeline(tmp_path / "in", tmp_path / "out")
    assert summary["errors_by_reason"] == {"not-a-regular-file": 1}
    assert summary["outcomes"]["converted"] == 1


def test_a_folder_named_like_a_glob_is_walked(tmp_path):
    copy_dicom(MR, tmp_path / "Patient [1]" / "S1" / "mr.dcm")
    summary = run_pipeline(tmp_path / "Patient [1]", tmp_path / "out")
    assert summary["files_matched"] == 1 and summary["outcomes"]["converted"] == 1


def test_directory_mode_with_a_relative_glob(tmp_path, monkeypatch):
    copy_dicom(CT, tmp_path / "archive" / "one" / "ct.dcm")
    copy_dicom(MR, tmp_path / "archive" / "two" / "mr.dcm")
    monkeypatch.chdir(tmp_path)
    summary = run_pipeline("archive/*/*.dcm", "out", "--group-by", "directory")
    assert summary["outcomes"]["converted"] == 2 and summary["studies"]["written"] == 2
