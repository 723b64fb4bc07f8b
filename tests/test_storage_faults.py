"""Storage faults cost time, never a file: gs:// reads and access checks through a fault-injecting
proxy (benchmarks.latency_proxy with a ``fault`` hook) in front of the real GCS emulator, on loopback.

Short retry deadlines are given through the policy (the CLI's --retry-deadline) to keep the tests fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from faults import Faults, ObjectFaults
from gcs_emulator import patched_environ
from helpers import TEST_FILES

from benchmarks.latency_proxy import LatencyProxy
from beam_pipeline.codes import Reason
from beam_pipeline.run import core
from beam_pipeline.sources import gcs

BUCKET = "test-bucket"


def _dicom_files() -> list[Path]:
    return sorted(p for p in Path(TEST_FILES).rglob("*") if p.is_file() and p.stat().st_size < 1 << 20)[:150]


@pytest.fixture(scope="module")
def uploaded(gcs_client):
    bucket = gcs_client.bucket(BUCKET)
    paths = []
    for path in _dicom_files():
        name = f"faults/{path.relative_to(TEST_FILES).as_posix()}"
        bucket.blob(name).upload_from_filename(str(path))
        paths.append(f"gs://{BUCKET}/{name}")
    return paths


def _read_all(paths, proxy_url, deadline=30.0, in_flight=8, limit=None):
    reader = core.FileReader(open_file=None)
    fetcher = gcs.RangeFetcher(base_url=proxy_url, policy=gcs.RetryPolicy(deadline=deadline, initial=0.05,
                                                                          maximum=1.0), limit=limit)
    reader.open_file = lambda path, size=None: gcs.open_ranged(fetcher, path, size=size)
    with ThreadPoolExecutor(in_flight) as pool:
        outcomes = core.process_files([(p, None) for p in paths], reader, pool)
    return {path: (o.result.kind, o.result.reason, o.result.record) for path, o in zip(paths, outcomes)}


@pytest.fixture(scope="module")
def fault_free(uploaded, gcs_emulator):
    with LatencyProxy(gcs_emulator.url, delay_ms=0) as proxy:
        return _read_all(uploaded, proxy.url)


@pytest.mark.parametrize("faults", [
    Faults(p503=0.05, pdrop=0.02),
    Faults(p429=0.10),
    Faults(outage=(0.0, 3.0, 8.0)),  # a 3-second outage from the first read on
], ids=["random-503-and-drops", "random-429", "3s-outage"])
def test_transient_faults_cost_time_not_a_file(faults, uploaded, fault_free, gcs_emulator):
    with LatencyProxy(gcs_emulator.url, delay_ms=5, fault=faults) as proxy:
        read = _read_all(uploaded, proxy.url)
        requests = proxy.counts.snapshot()["requests"]
    assert faults.injected > 0, requests
    assert read == fault_free
    assert not any(reason == Reason.UNAVAILABLE for _, reason, _ in read.values())


def test_a_permanent_403_is_one_error_per_object_and_not_retried(uploaded, fault_free, gcs_emulator):
    forbidden = uploaded[0].rsplit("/", 1)[1]
    faults = Faults(forbidden=[forbidden], p503=0.05)
    with LatencyProxy(gcs_emulator.url, delay_ms=0, fault=faults) as proxy:
        read = _read_all(uploaded, proxy.url)
    denied = {path for path, (_, reason, _) in read.items() if reason == Reason.UNREADABLE
              and fault_free[path][1] != Reason.UNREADABLE}
    assert denied == {p for p in uploaded if p.endswith("/" + forbidden)}
    assert faults.denied == len(denied)  # one request each: a 403 is not retried
    assert {p: v for p, v in read.items() if p not in denied} == {p: v for p, v in fault_free.items() if p not in denied}


def test_an_outage_past_the_deadline_is_unavailable_not_unreadable(uploaded, gcs_emulator):
    faults = Faults(outage=(0.0, 60.0, 120.0))
    started = time.monotonic()
    with LatencyProxy(gcs_emulator.url, delay_ms=0, fault=faults) as proxy:
        read = _read_all(uploaded[:4], proxy.url, deadline=1.0)
    assert time.monotonic() - started < 10
    assert {reason for _, reason, _ in read.values()} == {Reason.UNAVAILABLE}


class RecordingLimit(gcs.AdaptiveLimit):
    """The readers' limit, keeping what it decided: every throttle signal it got, every decrease."""

    def __init__(self, cap: int):
        super().__init__(cap)
        self.signals = 0
        self.decreases: list[tuple[int, int]] = []  # (limit before, limit after)

    def on_throttle(self, epoch: int) -> None:
        self.signals += 1
        epoch_before, limit_before = self.epoch, self.limit
        super().on_throttle(epoch)
        if self.epoch != epoch_before:
            self.decreases.append((limit_before, self.limit))


def test_a_throttling_store_gets_fewer_reads_in_flight_and_every_file_is_read(uploaded, fault_free, gcs_emulator):
    """The store answers 429 to any request arriving while more than 4 are in flight; the readers
    start with up to 16 in flight. Asserted is what the code decided, not how fast: every 429 the
    proxy sent reached the limit, the first halved it (16 to 8), every further decrease halved it
    again, the store never saw more requests in flight than the limit's cap, and every file was read."""
    limit = RecordingLimit(16)
    with LatencyProxy(gcs_emulator.url, delay_ms=20, throttle_above=4, upstream_slots=4) as proxy:
        read = _read_all(uploaded, proxy.url, in_flight=16, limit=limit)
        arrivals, throttled = list(proxy.arrivals), proxy.throttled
    assert read == fault_free
    assert throttled > 0 and max(arrivals) > 4  # the store did throttle
    assert limit.signals == throttled  # every 429 reached the limit
    assert limit.decreases[0] == (16, 8)
    assert all(after == max(1, before // 2) for before, after in limit.decreases)
    assert len(limit.decreases) <= limit.signals
    assert max(arrivals) <= 16 and limit.max_in_flight <= 16 and limit.in_flight == 0


def test_an_outage_during_the_start_up_check_is_waited_out(gcs_emulator):
    faults = Faults(outage=(0.0, 2.0, 1000.0))
    with LatencyProxy(gcs_emulator.url, delay_ms=0, fault=faults) as proxy, \
            patched_environ({"STORAGE_EMULATOR_HOST": proxy.url}):
        gcs.check_access(f"gs://{BUCKET}/faults/", f"gs://{BUCKET}/faults-out/",
                         policy=gcs.RetryPolicy(deadline=20.0, initial=0.1, maximum=1.0))
    assert faults.injected > 0


def test_an_outage_past_the_check_deadline_refuses_the_run(gcs_emulator):
    faults = Faults(outage=(0.0, 60.0, 120.0))
    with LatencyProxy(gcs_emulator.url, delay_ms=0, fault=faults) as proxy, \
            patched_environ({"STORAGE_EMULATOR_HOST": proxy.url}):
        with pytest.raises(gcs.GcsAccessError, match="HTTP 503"):
            gcs.check_access(f"gs://{BUCKET}/faults/", None, policy=gcs.RetryPolicy(deadline=1.0, initial=0.1))


# --- Through the real command line ----------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "beam_pipeline", *args], capture_output=True, text=True,
                          env=environment, timeout=300, cwd=REPO)


def _names(paths):
    return [gcs.split_path(p)[1] for p in paths]


def test_the_cli_exits_4_and_counts_unavailable_files_when_an_outage_outlasts_the_deadline(
        uploaded, gcs_emulator, tmp_path):
    names = _names(uploaded)
    faults = ObjectFaults(unavailable=names[1:4], forbidden=names[5:6])
    with LatencyProxy(gcs_emulator.url, delay_ms=0, fault=faults) as proxy:
        done = _cli("--input", f"gs://{BUCKET}/faults/", "--output", str(tmp_path / "out"), "--quiet",
                    "--retry-deadline", "1", "--read-concurrency", "8", env={"STORAGE_EMULATOR_HOST": proxy.url})
    assert done.returncode == 4, done.stderr[-3000:]
    assert faults.injected >= 3  # each unavailable object was retried before giving up
    summary = json.loads((tmp_path / "out/_report/summary.json").read_text())
    assert summary["files_matched"] == len(uploaded) == sum(summary["outcomes"].values())
    assert summary["errors_by_reason"]["unavailable"] == 3
    errors = [json.loads(line) for path in (tmp_path / "out/_report").glob("errors*.jsonl")
              for line in path.read_text().splitlines()]
    unavailable = sorted(e["path"] for e in errors if e["reason"] == "unavailable")
    assert unavailable == sorted(uploaded[1:4])
    assert uploaded[5] in {e["path"] for e in errors if e["reason"] == "unreadable"}  # the 403: permanent


def test_the_cli_exits_0_when_only_permanent_faults_remain(uploaded, gcs_emulator, tmp_path):
    names = _names(uploaded)
    faults = ObjectFaults(forbidden=names[5:6])
    with LatencyProxy(gcs_emulator.url, delay_ms=0, fault=faults) as proxy:
        done = _cli("--input", f"gs://{BUCKET}/faults/", "--output", str(tmp_path / "out"), "--quiet",
                    "--retry-deadline", "1", env={"STORAGE_EMULATOR_HOST": proxy.url})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out/_report/summary.json").read_text())
    assert "unavailable" not in summary["errors_by_reason"]
    assert summary["errors_by_reason"]["unreadable"] >= 1


def test_a_nightly_run_reads_again_only_the_files_that_were_unavailable(uploaded, gcs_emulator, tmp_path):
    """--since a run that exited 4: the objects still unread then are read now (and only they: the
    others are unchanged, by gs:// generation), and the snapshot is that of a run without faults."""
    names = _names(uploaded)
    faults = ObjectFaults(unavailable=names[1:4])
    with LatencyProxy(gcs_emulator.url, delay_ms=0, fault=faults) as proxy:
        failed = _cli("--input", f"gs://{BUCKET}/faults/", "--output", str(tmp_path / "night1"), "--quiet",
                      "--retry-deadline", "1", env={"STORAGE_EMULATOR_HOST": proxy.url})
    assert failed.returncode == 4, failed.stderr[-3000:]
    env = {"STORAGE_EMULATOR_HOST": gcs_emulator.url}
    again = _cli("--input", f"gs://{BUCKET}/faults/", "--output", str(tmp_path / "night2"), "--quiet",
                 "--since", str(tmp_path / "night1"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    full = _cli("--input", f"gs://{BUCKET}/faults/", "--output", str(tmp_path / "full"), "--quiet", env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    summary = json.loads((tmp_path / "night2/_report/summary.json").read_text())
    assert summary["incremental"]["files_read"] == 3
    assert summary["incremental"]["files_reused"] == len(uploaded) - 3
    assert "unavailable" not in summary["errors_by_reason"]
    for name in ("ImagingStudy-00000-of-00001.ndjson", "Device-00000-of-00001.ndjson",
                 "_report/errors-00000-of-00001.jsonl"):
        assert (tmp_path / "night2" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
