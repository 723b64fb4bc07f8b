"""Nightly runs (``--since``): a run started from the previous run's output reads only new and changed
files, rebuilds only changed studies, writes the same snapshot a full run writes (byte for byte) and
what changed to ``_delta/``; a state it cannot trust is refused in one line.

Each scenario: run A over an archive, change the archive, run B ``--since A``, and a full run C of
the changed archive: B's files must equal C's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from helpers import pydicom_file, read_ndjson, run_pipeline
from make_archive import make_archive
from nightly_changes import (add_series, assert_same_snapshot, changed_file, deleted_file, deletions, delta_keys,
                             new_study, study_key)


@pytest.fixture
def archive(tmp_path) -> dict:
    """6 studies x 2 series x 4 instances, a study of its own scanner, a file that is not DICOM."""
    root = tmp_path / "archive"
    made = make_archive(root / "main", studies=6, series=2, instances=4)
    lonely = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    lonely.DeviceSerialNumber = "ONLY-IN-THIS-STUDY"
    lonely.StudyInstanceUID, lonely.SeriesInstanceUID = "1.2.826.0.1.99.1", "1.2.826.0.1.99.1.1"
    (root / "lonely").mkdir()
    lonely.save_as(root / "lonely" / "ct.dcm", enforce_file_format=False)
    (root / "notes.txt").write_text("not DICOM\n")
    return {"root": root, "made": made, "lonely_uid": "1.2.826.0.1.99.1"}


def run(archive_root: Path, out: Path, *options: str) -> dict:
    return run_pipeline(archive_root, out, "--quiet", *options)


SCENARIOS = {"new-study": new_study, "added-series": add_series, "changed-file": changed_file,
             "deleted-file": deleted_file}


def test_nothing_changed_reads_no_file_rebuilds_no_study_and_writes_the_same_snapshot(archive, tmp_path):
    first = run(archive["root"], tmp_path / "a")
    again = run(archive["root"], tmp_path / "b", "--since", str(tmp_path / "a"))
    assert again["incremental"] == {"files_reused": first["files_matched"], "studies_reused": 7}
    assert_same_snapshot(tmp_path / "b", tmp_path / "a")
    assert deletions(tmp_path / "b") == []
    assert not list((tmp_path / "b" / "_delta").glob("*.ndjson"))


@pytest.mark.parametrize("change", sorted(SCENARIOS))
def test_a_change_is_read_alone_and_gives_the_full_runs_snapshot(change, archive, tmp_path):
    first = run(archive["root"], tmp_path / "a")
    touched = SCENARIOS[change](archive)
    incremental = run(archive["root"], tmp_path / "b", "--since", str(tmp_path / "a"))
    full = run(archive["root"], tmp_path / "c")
    assert_same_snapshot(tmp_path / "b", tmp_path / "c")
    done = incremental["incremental"]
    read = full["files_matched"] - done.get("files_reused", 0)
    expected_read = {"new-study": 3, "added-series": 2, "changed-file": 1, "deleted-file": 0}[change]
    assert read == done.get("files_read", 0) == expected_read
    assert done.get("files_gone", 0) == (1 if change == "deleted-file" else 0)
    assert done.get("studies_rebuilt") == 1 and done["studies_reused"] == (7 if change == "new-study" else 6)
    assert delta_keys(tmp_path / "b", "ImagingStudy") == [study_key(uid) for uid in touched]
    assert deletions(tmp_path / "b") == []
    assert not read_ndjson(tmp_path / "b", "_delta/Device")  # the same scanners
    assert first["studies"]["written"] + (change == "new-study") == incremental["studies"]["written"]
    manifest = json.loads((tmp_path / "b" / "_delta" / "manifest.json").read_text())  # for a bulk import
    listed = {entry["url"]: (entry["type"], entry["count"]) for entry in manifest["output"]}
    written = {path.relative_to(tmp_path / "b").as_posix(): path for path in (tmp_path / "b" / "_delta").glob("*.ndjson")}
    assert sorted(listed) == sorted(written) and listed
    for url, (resource_type, count) in listed.items():
        assert url.startswith(f"_delta/{resource_type}-")
        assert count == len(written[url].read_text().splitlines())
    assert manifest["extension"]["deletions"] == [{"type": "Bundle", "url": "_delta/deletions.json", "count": 0}]
    assert not (tmp_path / "c" / "_delta" / "manifest.json").exists()  # a full run has no delta


def test_a_deleted_study_and_its_lonely_device_are_deleted(archive, tmp_path):
    run(archive["root"], tmp_path / "a")
    lonely = read_ndjson(tmp_path / "a", "ImagingStudy")
    device_refs = {ref["reference"] for study in lonely if study["id"] == study_key(archive["lonely_uid"]).split("/")[1]
                   for series in study["series"] for ref in [p["actor"] for p in series.get("performer", [])]}
    assert len(device_refs) == 1
    shutil.rmtree(archive["root"] / "lonely")
    incremental = run(archive["root"], tmp_path / "b", "--since", str(tmp_path / "a"))
    run(archive["root"], tmp_path / "c")
    assert_same_snapshot(tmp_path / "b", tmp_path / "c")
    assert incremental["incremental"]["studies_deleted"] == 1
    assert incremental["incremental"]["files_gone"] == 1
    assert "studies_rebuilt" not in incremental["incremental"]
    assert deletions(tmp_path / "b") == sorted([study_key(archive["lonely_uid"]), *device_refs])
    assert not list((tmp_path / "b" / "_delta").glob("*.ndjson"))


def test_a_chain_of_nightly_runs_stays_equal_to_full_runs(archive, tmp_path):
    """Each night starts from the night before: A, then B --since A, then C --since B."""
    run(archive["root"], tmp_path / "night1")
    new_study(archive)
    run(archive["root"], tmp_path / "night2", "--since", str(tmp_path / "night1"))
    deleted_file(archive)
    changed_file(archive)
    third = run(archive["root"], tmp_path / "night3", "--since", str(tmp_path / "night2"))
    run(archive["root"], tmp_path / "full")
    assert_same_snapshot(tmp_path / "night3", tmp_path / "full")
    assert third["incremental"]["files_read"] == 1 and third["incremental"]["files_gone"] == 1


def test_other_conversion_options_rebuild_every_study_from_the_kept_records(archive, tmp_path):
    run(archive["root"], tmp_path / "a")
    changed = run(archive["root"], tmp_path / "b", "--since", str(tmp_path / "a"), "--no-instances")
    run(archive["root"], tmp_path / "c", "--no-instances")
    assert_same_snapshot(tmp_path / "b", tmp_path / "c")
    assert changed["incremental"].get("files_read", 0) == 0
    assert changed["incremental"]["studies_rebuilt"] == 7 and "studies_reused" not in changed["incremental"]
    assert len(delta_keys(tmp_path / "b", "ImagingStudy")) == 7


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beam_pipeline", "--quiet", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def one_error_line(done: subprocess.CompletedProcess, code: int) -> str:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_reading_options_input_and_folders_that_do_not_match_are_refused_in_one_line(archive, tmp_path):
    run(archive["root"], tmp_path / "a")
    root, previous = archive["root"], tmp_path / "a"
    assert "--max-header-mib" not in one_error_line(
        cli("--input", root, "--output", tmp_path / "b", "--since", previous, "--max-header-mib", "8"), 2)
    refused = one_error_line(cli("--input", root, "--output", tmp_path / "b", "--since", previous, "--pydicom-only"), 2)
    assert "other options (fast_reader differ)" in refused
    other_input = one_error_line(cli("--input", root / "main", "--output", tmp_path / "b", "--since", previous), 2)
    assert "another input" in other_input
    same = one_error_line(cli("--input", root, "--output", previous, "--since", previous), 2)
    assert "not --output" in same
    nothing = one_error_line(cli("--input", root, "--output", tmp_path / "b", "--since", tmp_path / "nowhere"), 2)
    assert "state.json is missing" in nothing
    assert not (tmp_path / "b" / "_report" / "summary.json").exists()


def test_a_truncated_or_damaged_state_is_refused_in_one_line(archive, tmp_path):
    run(archive["root"], tmp_path / "a")
    shard = next((tmp_path / "a" / "_state").glob("sources-*.jsonl"))
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "a", damaged)
    text = (damaged / "_state" / shard.name).read_bytes()
    at = text.index(b'.dcm","') + len(b'.dcm","')  # a file's stamp in its folder unit's line
    flipped = text[:at] + (b"9" if text[at:at + 1] != b"9" else b"8") + text[at + 1:]  # same size, other stamp
    (damaged / "_state" / shard.name).write_bytes(flipped)
    line = one_error_line(cli("--input", archive["root"], "--output", tmp_path / "b", "--since", damaged), 2)
    assert "damaged (checksum)" in line and "run once without --since" in line
    assert not (tmp_path / "b" / "_report" / "summary.json").exists()

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "a", truncated)
    (truncated / "_state" / shard.name).write_bytes(text[: len(text) // 2])
    line = one_error_line(cli("--input", archive["root"], "--output", tmp_path / "c", "--since", truncated), 2)
    assert "truncated or damaged" in line and shard.name in line

    (truncated / "_state" / "state.json").write_text("{not json")
    line = one_error_line(cli("--input", archive["root"], "--output", tmp_path / "c", "--since", truncated), 2)
    assert "state.json is not valid JSON" in line


def test_a_state_written_by_other_code_is_refused(archive, tmp_path):
    run(archive["root"], tmp_path / "a")
    header = tmp_path / "a" / "_state" / "state.json"
    document = json.loads(header.read_text())
    document["converter"] = "0.0.1+000000000000"
    header.write_text(json.dumps(document))
    line = one_error_line(cli("--input", archive["root"], "--output", tmp_path / "b", "--since", tmp_path / "a"), 2)
    assert "another version of the converter (0.0.1+000000000000" in line


def test_an_unreachable_since_bucket_stops_the_run_at_once_in_one_line(archive, tmp_path):
    """--since is checked like --input before the run (Beam's own client would retry for minutes)."""
    from gcs_emulator import closed_loopback_address

    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--quiet", "--input", str(archive["root"]),
                           "--output", str(tmp_path / "b"), "--since", "gs://nightly-bucket/night1"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "STORAGE_EMULATOR_HOST": "http://" + closed_loopback_address()})
    line = one_error_line(done, 2)
    assert line.startswith("error: --since gs://nightly-bucket/night1: cannot connect to")
