"""``--follow --follow-mode stream`` on Prism without a FHIR server: NDJSON per closed window.

A study renamed into the watched folder is one window with the batch run's ImagingStudy; a partial
file is an error line once it has been unchanged for ``--stable-after``, never a study; a late
instance makes a new window with the study's next state; SIGTERM drains (exit 0, nothing
half-written); a restart writes only what is new (the completed file), never a study again; the
ledger's counts add up to every file once.

Nothing here waits a fixed time: it polls the pipeline's ledger for what it decided.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from helpers import engine_or_skip, follow_ledger, poll
from make_archive import make_archive

from scripts import engines

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONTENT = ("--patients", "--encounters", "--observations")


def start(watched, out: Path, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "beam_pipeline", "--follow", "--follow-mode", "stream", "--input", str(watched),
               "--output", str(out), *CONTENT, "--quiet", "--stable-after", "1", "--poll-interval", "0.3",
               "--runner", "PrismRunner", "--prism_location", str(engine_or_skip(engines.install_prism, required_in_ci=True))]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def heartbeat(out: Path) -> dict:
    try:
        return json.loads((out / "watch.json").read_text())
    except (OSError, ValueError):
        return {}


def studies_in(out: Path) -> list[dict]:
    """Every ImagingStudy of the closed windows, oldest window first."""
    found = []
    for folder in sorted((out / "windows").iterdir()) if (out / "windows").is_dir() else ():
        path = folder / "ImagingStudy.ndjson"
        if path.is_file():
            found += [json.loads(line) for line in path.read_text().splitlines() if line]
    return found


def batch_study(folder: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(folder), "--output", str(out),
                           *CONTENT, "--quiet", "--direct_running_mode", "in_memory"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [line for path in out.glob("ImagingStudy-*.ndjson") for line in path.read_text().splitlines() if line]
    return json.loads(line)


def add_late_instance(study_folder: Path, target: Path) -> None:
    """A new instance of a study (a copy of its first file with another SOPInstanceUID) at ``target``."""
    late = pydicom.dcmread(sorted(study_folder.rglob("*.dcm"))[0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID + ".99"
    late.save_as(target)


def arrive(source: Path, watched: Path, staging: Path) -> Path:
    """A study copied beside the watched folder and renamed in, as a DICOM receiver does."""
    shutil.copytree(source, staging / source.name)
    return (staging / source.name).rename(watched / source.name)


def test_windows_late_instance_partial_file_drain_and_restart(tmp_path):
    archive = tmp_path / "archive"
    make_archive(archive, studies=2, series=2, instances=2)
    first, second = sorted(p for p in archive.glob("*/*") if p.is_dir())
    watched, staging, out = tmp_path / "watched", tmp_path / "staging", tmp_path / "follow"
    watched.mkdir()
    staging.mkdir()
    arrive(first, watched, staging)
    log = open(tmp_path / "follow.log", "wb")
    process = start(watched, out, log)
    try:
        poll(lambda: studies_in(out), "the first study's window")
        (written,) = studies_in(out)
        assert written == batch_study(watched, tmp_path / "batch-first")  # the batch mapping, line for line
        # a partial file of the second study: an error line once unchanged, no study
        whole = sorted(second.rglob("*.dcm"))[0].read_bytes()
        partial = watched / second.name / "000001.dcm"
        partial.parent.mkdir()
        partial.write_bytes(whole[:200])
        poll(lambda: any(w["counts"].get("error:truncated") for w in follow_ledger(out)), "the partial file's error")
        assert len(studies_in(out)) == 1
        # a late instance: a new window with the study's next state, the same id
        add_late_instance(first, staging / "late.dcm")
        (staging / "late.dcm").rename(watched / first.name / "late.dcm")
        poll(lambda: len(studies_in(out)) == 2, "the late instance's window")
        again = studies_in(out)[1]
        assert again["id"] == written["id"] and again["numberOfInstances"] == written["numberOfInstances"] + 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0
        assert not [p for p in (out / "windows").iterdir() if p.name.startswith(".")]  # nothing half-written
        before = len(follow_ledger(out))
        # restart: the partial file was completed meanwhile; the first study is not written again
        partial.write_bytes(whole)
        process = start(watched, out, log)
        poll(lambda: len(studies_in(out)) == 3, "the completed study after the restart")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    windows = follow_ledger(out)
    assert [w["counts"].get("studies_written", 0) for w in windows[before:]] == [1]  # only the completed study
    assert sum(1 for w in windows if w["counts"].get("error:truncated", 0) > 0) == 1  # reported once ...
    totals = {key: sum(w["counts"].get(key, 0) for w in windows) for key in ("error:truncated", "outcome:converted")}
    # ... and taken back when the file became an instance: the ledger adds up to every file once
    assert totals == {"error:truncated": 0, "outcome:converted": len(list(watched.rglob("*.dcm")))}
    completed = studies_in(out)[2]
    assert completed["numberOfInstances"] == 1 and completed["id"] != written["id"]


def test_a_gs_prefix_watched_through_the_emulator(gcs_client, tmp_path):
    """gs://: objects uploaded under the watched prefix become a window once stable; an object
    uploaded later (a late instance) makes the study's next window; a restart writes nothing again."""
    from gcs_emulator import upload_tree

    archive = tmp_path / "archive"
    make_archive(archive, studies=1, series=2, instances=2)
    (study,) = [p for p in archive.glob("*/*") if p.is_dir()]
    prefix = f"follow-{tmp_path.name}"
    upload_tree(gcs_client, study, "test-bucket", f"{prefix}/{study.name}")
    watched, out = f"gs://test-bucket/{prefix}/", tmp_path / "follow"
    log = open(tmp_path / "follow.log", "wb")
    process = start(watched, out, log)
    try:
        poll(lambda: studies_in(out), "the study's window")
        (written,) = studies_in(out)
        assert written["numberOfInstances"] == 4
        add_late_instance(study, tmp_path / "late.dcm")
        gcs_client.bucket("test-bucket").blob(f"{prefix}/{study.name}/late.dcm").upload_from_filename(
            str(tmp_path / "late.dcm"))
        poll(lambda: len(studies_in(out)) == 2, "the late object's window")
        assert studies_in(out)[1]["numberOfInstances"] == 5 and studies_in(out)[1]["id"] == written["id"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0
        before, restarted = len(follow_ledger(out)), time.time()
        process = start(watched, out, log)  # nothing changed: nothing is written again, even by the drain
        poll(lambda: heartbeat(out).get("at", 0) > restarted, "a listing after the restart")
        assert heartbeat(out)["listed"] == 5 and heartbeat(out)["new"] == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert len(follow_ledger(out)) == before


def test_follow_mode_auto_streams_only_on_a_streaming_runner_grouped_by_study():
    from types import SimpleNamespace

    from beam_pipeline.run.follow import mode_of

    refusals = []
    by_study, by_folder = SimpleNamespace(group_by="study"), SimpleNamespace(group_by="directory")
    prism, in_process = ["--runner", "PrismRunner"], []
    assert mode_of("auto", by_study, prism, refusals.append) == "stream"
    assert mode_of("auto", by_study, in_process, refusals.append) == "cycles"
    assert mode_of("auto", by_folder, prism, refusals.append) == "cycles"
    assert mode_of("cycles", by_study, prism, refusals.append) == "cycles"
    assert not refusals
    mode_of("stream", by_study, in_process, refusals.append)
    mode_of("stream", by_folder, prism, refusals.append)
    assert [r.split(":")[0] for r in refusals] == [
        "--follow-mode stream needs a streaming runner whose workers share the local --output",
        "--follow-mode stream groups by study"]
