"""The CLI end to end on gs:// (through a loopback GCS emulator): same lines as a local run, and
misconfiguration fails in seconds with one line."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gcs_emulator import closed_loopback_address, upload_tree
from helpers import TEST_FILES

from scripts import engines

BUCKET = "test-bucket"
REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "beam_pipeline", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=REPO)


def _gs_files(client, prefix: str) -> dict[str, str]:
    """Every object under gs://BUCKET/prefix: relative name -> text."""
    return {blob.name[len(prefix):]: blob.download_as_bytes().decode("utf-8")
            for blob in client.list_blobs(BUCKET, prefix=prefix)}


def _local_files(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): path.read_text(encoding="utf-8")
            for path in folder.rglob("*") if path.is_file()}


def _lines_by_kind(files: dict[str, str], *replacements: tuple[str, str]) -> dict[str, list[str]]:
    """Lines of the line-per-record files by kind (name without the shard suffix), sorted; JSON
    escapes paths, so the local root is replaced (in turn, each (old, new) pair) in its escaped form
    too. OperationOutcome ids (hashes of the error, its path included) are left out."""
    lines: dict[str, list[str]] = {}
    for name, text in files.items():
        if name.endswith((".ndjson", ".jsonl")) and not name.startswith("_state/"):  # stamps: storage's own
            kind = re.sub(r"-\d+-of-\d+", "", name)
            for old, new in replacements:
                text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
            if "OperationOutcome" in kind:  # its id hashes the error, path included
                text = re.sub(r'"id":"[0-9a-f]{64}",', "", text)
            lines.setdefault(kind, []).extend(line for line in text.splitlines() if line)
    return {kind: sorted(found) for kind, found in lines.items()}


def _manifest_counts(text: str) -> dict:
    """Lines per type the manifest states (an engine may split a type into more shards)."""
    totals: dict = {}
    for entry in (entry for key in ("output", "error") for entry in json.loads(text).get(key, [])):
        totals[entry["type"]] = totals.get(entry["type"], 0) + entry["count"]
    return totals


def _problem_lines(stderr: str) -> list[str]:
    """What the CLI said about the problem (Beam's import-time warnings about optional GCP
    libraries are not ours); a traceback would show up here too."""
    assert "Traceback" not in stderr
    return [line for line in stderr.strip().splitlines() if not line.startswith("WARNING:root:")]


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "instances_per_second")}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """pydicom's test files (studies, DICOMDIRs, non-DICOM and broken files) as a local archive."""
    root = tmp_path_factory.mktemp("archive") / "in"
    shutil.copytree(TEST_FILES, root, ignore=lambda folder, names: [
        n for n in names if os.path.isfile(os.path.join(folder, n)) and os.path.getsize(os.path.join(folder, n)) > 4 << 20])
    return root


def engine_options(engine: str) -> list[str]:
    """The in-process runner, Prism (Beam's Go runner) with its SDK workers in the launcher, or a
    local Dask cluster of two worker processes (which inherit the emulator's environment)."""
    if engine == "in_process":
        return []
    if engine == "dask":
        return engines.dask_options(workers=2)
    try:
        return engines.prism_options()
    except engines.EngineUnavailable as missing:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(missing))


@pytest.mark.parametrize("engine", ["in_process", "prism", "dask"])
def test_gs_to_gs_writes_the_same_lines_as_a_local_run(archive, gcs_client, tmp_path, engine):
    uploaded = upload_tree(gcs_client, archive, BUCKET, f"e2e-{engine}/in")
    local_out = tmp_path / "local-out"
    local = _cli("--input", str(archive), "--output", str(local_out))
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _cli("--input", f"gs://{BUCKET}/e2e-{engine}/in/", "--output", f"gs://{BUCKET}/e2e-{engine}/out/",
                  "--read-concurrency", "8", *engine_options(engine))
    assert remote.returncode == 0, remote.stderr[-3000:]

    local_files, remote_files = _local_files(local_out), _gs_files(gcs_client, f"e2e-{engine}/out/")
    # meta.source is the input's root: file:///... locally, gs://bucket/prefix on the bucket
    local_lines = _lines_by_kind(local_files, (archive.as_uri(), f"gs://{BUCKET}/e2e-{engine}/in"),
                                 (str(archive), f"gs://{BUCKET}/e2e-{engine}/in"))
    remote_lines = _lines_by_kind(remote_files)
    assert f'"source":"gs://{BUCKET}/e2e-{engine}/in"' in remote_files[next(n for n in remote_files if "ImagingStudy" in n)]
    assert set(remote_lines) == set(local_lines)
    assert {"ImagingStudy.ndjson", "Device.ndjson", "_report/errors.jsonl"} <= set(local_lines)
    for kind in local_lines:  # line by line, error paths included (local root -> gs:// prefix)
        assert remote_lines[kind] == local_lines[kind], kind
    assert _manifest_counts(remote_files["manifest.json"]) == _manifest_counts(local_files["manifest.json"])

    local_summary = json.loads(local_files["_report/summary.json"])
    remote_summary = json.loads(remote_files["_report/summary.json"])
    assert _without_timing(remote_summary) == _without_timing(local_summary)
    assert remote_summary["files_matched"] == len(uploaded)
    assert sum(remote_summary["outcomes"].values()) == len(uploaded)
    assert remote_summary["outcomes"]["converted"] > 50
    written = {b.name[len(f"e2e-{engine}/out/"):] for b in gcs_client.list_blobs(BUCKET, prefix=f"e2e-{engine}/out/")}
    assert {re.sub(r"-\d+-of-\d+", "", name) for name in written} == \
        {re.sub(r"-\d+-of-\d+", "", name) for name in local_files}  # no temp folders, checks or beacons left


@pytest.mark.parametrize("args, message", [
    (["--input", "gs://no-such-bucket/in/", "--output", "{tmp}/out"],
     "error: --input gs://no-such-bucket/in/: bucket gs://no-such-bucket does not exist"),
    (["--input", "{tmp}", "--output", "gs://no-such-bucket/out/"],
     "error: --output gs://no-such-bucket/out/: bucket gs://no-such-bucket does not exist"),
])
def test_a_missing_bucket_stops_the_cli_at_once_with_one_line(args, message, gcs_emulator, tmp_path):
    started = time.monotonic()
    result = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert _problem_lines(result.stderr) == [message]
    assert not (tmp_path / "out").exists()


def test_an_unreachable_storage_endpoint_stops_the_cli_within_30_s(gcs_emulator, tmp_path):
    closed = "http://" + closed_loopback_address()
    started = time.monotonic()
    result = _cli("--input", f"gs://{BUCKET}/in/", "--output", str(tmp_path / "out"),
                  env={"STORAGE_EMULATOR_HOST": closed})
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert _problem_lines(result.stderr) == [f"error: --input gs://{BUCKET}/in/: cannot connect to {closed} "
                                                  "(ConnectionError)"]


def test_missing_credentials_stop_the_cli_within_30_s(gcs_emulator, tmp_path):
    """No emulator, no credentials: the API endpoint is a closed loopback port, so nothing could
    leave the machine even if a credential were found."""
    started = time.monotonic()
    result = _cli("--input", str(tmp_path), "--output", f"gs://{BUCKET}/out/",
                  env={"STORAGE_EMULATOR_HOST": "", "API_ENDPOINT_OVERRIDE": "http://" + closed_loopback_address()})
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    lines = _problem_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: no Google Cloud credentials found"), lines


def test_a_nightly_run_on_gs_reads_only_the_new_object_and_writes_the_full_runs_files(archive, gcs_client):
    """State and delta on gs:// too: the state is read by the pipeline from the bucket, stamps are
    generations, and the snapshot equals a full run's, file by file."""
    prefix = "nightly"
    uploaded = upload_tree(gcs_client, archive, BUCKET, f"{prefix}/in")
    first = _cli("--input", f"gs://{BUCKET}/{prefix}/in/", "--output", f"gs://{BUCKET}/{prefix}/night1/", "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    blob = gcs_client.bucket(BUCKET).blob(f"{prefix}/in/added/CT_small.dcm")
    blob.upload_from_filename(os.path.join(TEST_FILES, "CT_small.dcm"))
    since = _cli("--input", f"gs://{BUCKET}/{prefix}/in/", "--output", f"gs://{BUCKET}/{prefix}/night2/", "--quiet",
                 "--since", f"gs://{BUCKET}/{prefix}/night1/")
    assert since.returncode == 0, since.stderr[-3000:]
    full = _cli("--input", f"gs://{BUCKET}/{prefix}/in/", "--output", f"gs://{BUCKET}/{prefix}/full/", "--quiet")
    assert full.returncode == 0, full.stderr[-3000:]
    night2, whole = _gs_files(gcs_client, f"{prefix}/night2/"), _gs_files(gcs_client, f"{prefix}/full/")
    summary = json.loads(night2["_report/summary.json"])
    assert summary["incremental"]["files_read"] == 1
    assert summary["incremental"]["files_reused"] == len(uploaded)
    assert summary["files_matched"] == len(uploaded) + 1
    snapshot = {name for name in night2 if not name.startswith("_delta/")}
    assert snapshot == set(whole)
    for name in sorted(snapshot - {"_report/summary.json", "manifest.json"}):
        assert night2[name] == whole[name], name
    assert json.loads(night2["_delta/deletions.json"]) == {"resourceType": "Bundle", "type": "transaction"}
