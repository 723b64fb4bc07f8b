"""The CLI end to end on gs:// (through a loopback GCS emulator): same lines as a local run, and
misconfiguration fails in seconds with one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcs_emulator import closed_loopback_address, upload_tree
from helpers import TEST_FILES

BUCKET = "test-bucket"
REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "beam_pipeline", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=REPO)


def _gs_lines(client, prefix: str) -> dict[str, list[str]]:
    """Lines of the NDJSON shards under gs://BUCKET/prefix, by resource name, sorted."""
    lines: dict[str, list[str]] = {}
    for blob in client.list_blobs(BUCKET, prefix=prefix):
        name = blob.name[len(prefix):]
        if name.endswith(".ndjson"):
            text = blob.download_as_bytes().decode("utf-8")
            lines.setdefault(name.split("-")[0], []).extend(line for line in text.splitlines() if line)
    return {name: sorted(found) for name, found in lines.items()}


def _local_lines(folder: Path) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for path in folder.glob("*.ndjson"):
        lines.setdefault(path.name.split("-")[0], []).extend(
            line for line in path.read_text(encoding="utf-8").splitlines() if line)
    return {name: sorted(found) for name, found in lines.items()}


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


def test_gs_to_gs_writes_the_same_lines_as_a_local_run(archive, gcs_client, tmp_path):
    uploaded = upload_tree(gcs_client, archive, BUCKET, "e2e/in")
    local_out = tmp_path / "local-out"
    local = _cli("--input", str(archive), "--output", str(local_out))
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _cli("--input", f"gs://{BUCKET}/e2e/in/", "--output", f"gs://{BUCKET}/e2e/out/",
                  "--read-concurrency", "8")
    assert remote.returncode == 0, remote.stderr[-3000:]

    local_lines, remote_lines = _local_lines(local_out), _gs_lines(gcs_client, "e2e/out/")
    assert set(remote_lines) == set(local_lines) >= {"ImagingStudy", "Device", "errors"}
    for name in ("ImagingStudy", "Device"):
        assert remote_lines[name] == local_lines[name]
    local_errors = sorted(line.replace(str(archive), f"gs://{BUCKET}/e2e/in") for line in local_lines["errors"])
    assert remote_lines["errors"] == local_errors

    local_summary = json.loads((local_out / "summary.json").read_text())
    remote_summary = json.loads(gcs_client.bucket(BUCKET).blob("e2e/out/summary.json").download_as_bytes())
    assert _without_timing(remote_summary) == _without_timing(local_summary)
    assert remote_summary["files_matched"] == len(uploaded)
    assert sum(remote_summary["outcomes"].values()) == len(uploaded)
    assert remote_summary["outcomes"]["converted"] > 50
    written = {b.name[len("e2e/out/"):] for b in gcs_client.list_blobs(BUCKET, prefix="e2e/out/")}
    leftovers = {name for name in written if name != "summary.json" and not name.endswith(".ndjson")}
    assert leftovers == set()  # no temp folders, write checks or progress beacons left behind


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
