"""gs:// header reading and access checks against a real GCS emulator on loopback."""
from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gcs_emulator import closed_loopback_address, patched_environ
from helpers import TEST_FILES

from beam_pipeline.dicom import header
from beam_pipeline.dicom.records import ERROR, HeaderResult
from beam_pipeline.fhir.keywords import header_spec
from beam_pipeline.run import core
from beam_pipeline.sources import files as inputs
from beam_pipeline.sources import gcs

BUCKET = "test-bucket"
SPEC = header_spec()


def _pydicom_files() -> list[Path]:
    return sorted(p for p in Path(TEST_FILES).rglob("*") if p.is_file() and p.stat().st_size < 4 << 20)


@pytest.fixture(scope="module")
def uploaded(gcs_client):
    """pydicom's test files (DICOM, not DICOM, odd ones) plus an empty object, as gs:// paths."""
    bucket = gcs_client.bucket(BUCKET)
    files = {}
    for path in _pydicom_files():
        name = f"headers/{path.relative_to(TEST_FILES).as_posix()}"
        bucket.blob(name).upload_from_filename(str(path))
        files[f"gs://{BUCKET}/{name}"] = path
    bucket.blob("headers/empty.dcm").upload_from_string(b"")
    files[f"gs://{BUCKET}/headers/empty.dcm"] = None
    return files


@pytest.fixture
def fetcher(gcs_emulator):
    return gcs.RangeFetcher()


def _read_local(path) -> HeaderResult:
    if path is None:
        return HeaderResult(ERROR, reason="empty-file", detail="file has 0 bytes")
    with open(path, "rb") as fp:
        return header.read_header(fp, SPEC)


def test_headers_from_gs_equal_local_headers(uploaded, fetcher):
    assert len(uploaded) > 50
    kinds = set()
    for gs_path, local in uploaded.items():
        remote = header.read_header(gcs.open_ranged(fetcher, gs_path), SPEC)
        assert remote == _read_local(local), gs_path
        kinds.add(remote.kind)
    assert kinds == {"instance", "not_dicom", "dicomdir", "error"}


def test_one_request_per_file_with_a_short_header_and_bytes_as_on_local_disk(uploaded, fetcher):
    gs_path = f"gs://{BUCKET}/headers/CT_small.dcm"
    local = uploaded[gs_path]
    assert local.stat().st_size > header.FIRST_READ  # pixel data follows the header
    fp = gcs.open_ranged(fetcher, gs_path)
    result = header.read_header(fp, SPEC)
    assert result.kind == "instance"
    assert fetcher.requests == 1
    assert fp.start == 0 and len(fp.cache) == header.FIRST_READ  # what the local reader reads first


def test_a_long_header_costs_a_second_range(gcs_client, fetcher, tmp_path):
    import pydicom

    ds = pydicom.dcmread(os.path.join(TEST_FILES, "CT_small.dcm"))
    ds.ImageComments = "x" * (3 * header.FIRST_READ)  # (0020,4000) lies before the needed tags' end
    local = tmp_path / "long.dcm"
    ds.save_as(local, enforce_file_format=True)
    gcs_client.bucket(BUCKET).blob("long/long.dcm").upload_from_filename(str(local))
    result = header.read_header(gcs.open_ranged(fetcher, f"gs://{BUCKET}/long/long.dcm"), SPEC)
    assert result == _read_local(local)
    assert 2 <= fetcher.requests <= 3


@pytest.mark.parametrize("implicit", [False, True], ids=["fast", "pydicom"])
def test_a_large_private_element_is_skipped_not_fetched(gcs_client, fetcher, tmp_path, implicit):
    """Both readers seek over a value they do not need; the object is fetched around it, not whole."""
    from odd_files import MiB, private_element_before_needed

    local = tmp_path / "private.dcm"
    private_element_before_needed(local, 24 * MiB, implicit=implicit)
    gcs_client.bucket(BUCKET).blob(f"private/{local.name}-{implicit}").upload_from_filename(str(local))
    fp = gcs.open_ranged(fetcher, f"gs://{BUCKET}/private/{local.name}-{implicit}")
    result = header.read_header(fp, SPEC)
    assert result == _read_local(local) and result.kind == "instance"
    assert fetcher.requests <= 4
    assert len(fp.cache) < 1 * MiB  # the window after the jump, not the 24 MiB before it


def test_missing_object_is_a_file_not_found(fetcher, gcs_emulator):
    with pytest.raises(FileNotFoundError):
        gcs.open_ranged(fetcher, f"gs://{BUCKET}/no/such/object.dcm").read(10)


def test_concurrent_reads_keep_order_and_account_for_every_file(uploaded, gcs_emulator):
    items = [(path, None) for path in sorted(uploaded)] + [(f"gs://{BUCKET}/missing-{i}.dcm", None) for i in range(3)]
    reader = core.FileReader(open_file=inputs.InputOpener())
    serial = core.process_files(items, reader, pool=None)
    with ThreadPoolExecutor(8) as pool:
        concurrent = core.process_files(items, reader, pool=pool)
    assert [(o.result, o.error, o.counts) for o in concurrent] == [(o.result, o.error, o.counts) for o in serial]
    assert len(concurrent) == len(items)
    assert [o.error["reason"] for o in concurrent[-3:]] == ["unreadable"] * 3
    assert concurrent[-1].error["path"] == f"gs://{BUCKET}/missing-2.dcm"
    assert "object does not exist" in concurrent[-1].error["detail"]


def test_an_exception_inside_a_read_is_one_error_outcome(uploaded, gcs_emulator):
    def broken_open(path, size):
        raise RuntimeError("a reader bug")

    items = [(path, None) for path in sorted(uploaded)[:5]]
    with ThreadPoolExecutor(4) as pool:
        outcomes = core.process_files(items, core.FileReader(open_file=broken_open), pool=pool)
    assert [o.error["reason"] for o in outcomes] == ["unreadable"] * 5
    assert all(o.counts["outcome:error"] == 1 for o in outcomes)


def test_concurrency_overlaps_requests_at_cloud_latency(uploaded, gcs_emulator):
    """Behind a proxy adding 50 ms per request, 8 reads in flight beat 8 one after the other."""
    from benchmarks.latency_proxy import LatencyProxy

    items = [(p, None) for p, local in sorted(uploaded.items()) if local is not None][:16]
    with LatencyProxy(gcs_emulator.url, delay_ms=50) as proxy:
        with patched_environ({"STORAGE_EMULATOR_HOST": proxy.url}):
            reader = core.FileReader(open_file=inputs.InputOpener())
            serial = core.process_files(items, reader, pool=None)
            serial_arrivals = list(proxy.arrivals)
            with ThreadPoolExecutor(8) as pool:
                concurrent = core.process_files(items, reader, pool=pool)
            concurrent_arrivals = proxy.arrivals[len(serial_arrivals):]
        requests = proxy.counts.snapshot()["requests"]
    assert [o.result for o in concurrent] == [o.result for o in serial]
    assert [o.error for o in serial if o.error and o.error["reason"] == "unreadable"] == []
    assert max(serial_arrivals) == 1  # what the store saw: one request at a time, then several in flight
    assert max(concurrent_arrivals) > 1
    assert requests <= 2 * len(items) * 1.2


# --- access checks --------------------------------------------------------------------------


def test_access_checks_pass_on_a_readable_and_writable_bucket(gcs_client, gcs_emulator):
    gcs_client.bucket(BUCKET).blob("in/a.dcm").upload_from_string(b"x")
    gcs.check_access(f"gs://{BUCKET}/in/", f"gs://{BUCKET}/out/")
    gcs.check_access(f"gs://{BUCKET}/in/*.dcm", f"gs://{BUCKET}")
    leftovers = [b.name for b in gcs_client.list_blobs(BUCKET) if "write-check" in b.name]
    assert leftovers == []


@pytest.mark.parametrize("check", [gcs.check_input, gcs.check_output])
def test_missing_bucket_is_one_clear_line(check, gcs_emulator):
    with pytest.raises(gcs.GcsAccessError, match=r"bucket gs://no-such-bucket does not exist"):
        check("gs://no-such-bucket/data/")


@pytest.mark.parametrize("check", [gcs.check_input, gcs.check_output])
def test_unreachable_endpoint_fails_fast(check, gcs_emulator):
    closed = "http://" + closed_loopback_address()
    with patched_environ({"STORAGE_EMULATOR_HOST": closed}):
        started = time.monotonic()
        with pytest.raises(gcs.GcsAccessError, match="cannot connect to http://127.0.0.1"):
            check(f"gs://{BUCKET}/x/")
    assert time.monotonic() - started < 5


def test_an_endpoint_that_never_answers_times_out(gcs_emulator, monkeypatch):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setattr(gcs, "CHECK_TIMEOUT", 1.0)
        with patched_environ({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:%d" % silent.getsockname()[1]}):
            started = time.monotonic()
            with pytest.raises(gcs.GcsAccessError, match="no answer from"):
                gcs.check_input(f"gs://{BUCKET}/x/")
        assert time.monotonic() - started < 5


def test_no_credentials_is_named_before_any_request(gcs_emulator):
    """Without an emulator the real endpoint would be used: point it at a closed loopback port
    (so nothing can leave the machine) and check that the missing credentials are reported."""
    env = {"STORAGE_EMULATOR_HOST": "", "API_ENDPOINT_OVERRIDE": "http://" + closed_loopback_address()}
    with patched_environ(env):
        started = time.monotonic()
        with pytest.raises(gcs.GcsAccessError, match="no Google Cloud credentials found"):
            gcs.check_output(f"gs://{BUCKET}/out/")
    assert time.monotonic() - started < 30


class _Forbidding(BaseHTTPRequestHandler):
    """Answers like GCS does to a principal without the storage role (a real IAM is not here)."""

    def log_message(self, *args):
        pass

    def _deny(self):
        body = b'{"error": {"code": 403, "message": "caller does not have storage.objects.list access"}}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _deny


@pytest.mark.parametrize("check", [gcs.check_input, gcs.check_output])
def test_permission_denied_is_one_clear_line(check, gcs_emulator):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidding)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with patched_environ({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:%d" % server.server_address[1]}):
            with pytest.raises(gcs.GcsAccessError, match=r"permission denied on gs://test-bucket \(HTTP 403\)"):
                check(f"gs://{BUCKET}/x/")
    finally:
        server.shutdown()
        server.server_close()


def test_access_checks_have_an_overall_deadline(gcs_emulator):
    """Whatever hangs (a token refresh, a metadata lookup, a stalled connection), the checks end."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with patched_environ({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:%d" % silent.getsockname()[1]}):
            started = time.monotonic()
            with pytest.raises(gcs.GcsAccessError, match=r"no answer from Google Cloud Storage .* within 1 s"):
                gcs.check_access(f"gs://{BUCKET}/in/", f"gs://{BUCKET}/out/", deadline=1.0)
    assert time.monotonic() - started < 30  # ended by its deadline, not by a 180 s retry deadline
