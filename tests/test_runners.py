"""Same input, same results on every runner: the in-process runner (1 and 2 workers), the
BundleBasedDirectRunner, and Beam's portable path (embedded job server with subprocess workers;
a job service with an external worker pool), as Flink and Dataflow run it.

Each case runs the CLI as a user would; resource and error lines and summary.json counts must be
identical. The inputs are pydicom's real files plus a generated archive with faults.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import TEST_FILES, copy_dicom, pydicom_file, raw_lines
from make_archive import make_archive
from runners import RUNNERS, job_service_and_worker_pool, venv_env

OUTPUTS = ("ImagingStudy", "Device", "Observation", "Patient", "Encounter", "Bundle", "errors", "OperationOutcome")
LOADABLE = ("--observations", "--patients", "--encounters", "--bundles")


def add_faults(faults):
    faults.mkdir()
    (faults / "empty.dcm").write_bytes(b"")
    with open(pydicom_file("CT_small.dcm"), "rb") as handle:
        (faults / "truncated.dcm").write_bytes(handle.read(600))
    copy_dicom(pydicom_file("MR_small.dcm"), faults / "bad-uid.dcm", SOPInstanceUID="1.2.3.x")
    copy_dicom(pydicom_file("MR_small.dcm"), faults / "other-patient.dcm", PatientID="SOMEONE-ELSE",
               SOPInstanceUID="1.2.826.0.1.3680043.9.7.1")
    os.symlink(faults / "nowhere.dcm", faults / "dangling.dcm")
    with open(os.path.join(os.fsencode(faults), b"M\xfcller.dcm"), "wb") as handle:
        handle.write(b"DICM but not really")


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """study mode: pydicom's files and a generated archive with faults; directory mode: one
    generated study per first-level folder, a folder with two studies, a folder of faults."""
    study_mode = tmp_path_factory.mktemp("runner-archive")
    shutil.copytree(TEST_FILES, study_mode / "pydicom", symlinks=True)
    make_archive(study_mode / "generated", studies=4, series=2, instances=6)
    add_faults(study_mode / "generated" / "faults")
    directory_mode = tmp_path_factory.mktemp("runner-folders")
    make_archive(directory_mode, studies=6, series=2, instances=5, layout="flat-study-dirs")
    copy_dicom(pydicom_file("CT_small.dcm"), directory_mode / "two-studies" / "ct.dcm")
    copy_dicom(pydicom_file("MR_small.dcm"), directory_mode / "two-studies" / "mr.dcm")
    add_faults(directory_mode / "faults")
    return {"study": study_mode, "directory": directory_mode}


@pytest.fixture(scope="module")
def portable_service(tmp_path_factory):
    with job_service_and_worker_pool(str(tmp_path_factory.mktemp("portable-logs"))) as options:
        yield options


def convert(input_dir, out, options, *extra) -> dict:
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(input_dir), "--output", str(out),
                           *extra, *options], capture_output=True, text=True, timeout=600, env=venv_env())
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "_report", "summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    del summary["seconds"], summary["instances_per_second"]
    return summary


def manifest_totals(out) -> dict:
    """Lines per type as the manifest states them (shard files may differ between runners), after
    checking each stated count against the file."""
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    totals = {}
    for entry in manifest["output"] + manifest["error"] + manifest.get("extension", {}).get("transactionBundles", []):
        with open(os.path.join(out, entry["url"]), encoding="utf-8") as handle:
            assert entry["count"] == sum(1 for _ in handle), entry["url"]
        totals[entry["type"]] = totals.get(entry["type"], 0) + entry["count"]
    return totals


def results(out, summary) -> dict:
    return {"summary": summary, "manifest": manifest_totals(out), **{name: raw_lines(out, name) for name in OUTPUTS}}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["study", "directory"])
def test_every_runner_writes_the_same_lines_and_summary(archives, portable_service, tmp_path, mode):
    cases = {**RUNNERS, "portable_job_service": portable_service}
    seen = {}
    for name, options in cases.items():
        out = tmp_path / name
        seen[name] = results(out, convert(archives[mode], out, options, "--group-by", mode, *LOADABLE))
    baseline = seen.pop("in_memory_1")
    summary = baseline["summary"]
    assert sum(summary["outcomes"].values()) == summary["files_matched"] > 60
    assert summary["resources"]["ImagingStudy"] >= 6 and summary["resources"]["Device"] >= 3
    assert summary["resources"]["Bundle"] == summary["studies"]["written"] and summary["resources"]["Patient"] >= 1
    assert baseline["manifest"]["OperationOutcome"] == len(baseline["errors"]) > 0
    assert {"invalid-uid", "dangling-symlink", "empty-file", "truncated"} <= set(summary["errors_by_reason"])
    if mode == "directory":
        assert summary["errors_by_reason"]["multiple-studies-in-directory"] == 1  # two-studies/
    for name, got in seen.items():
        for key in ("summary", "manifest", *OUTPUTS):
            assert got[key] == baseline[key], f"{name} differs from in_memory_1 in {key}"
