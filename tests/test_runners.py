"""Same input, same results on every runner and engine: the in-process runner (1 and 2 workers),
the BundleBasedDirectRunner, Beam's portable path (embedded job server with subprocess workers; a
job service with an external worker pool), Prism (Beam's Go runner, in-process workers and an
external pool of SDK workers), and a standalone Flink cluster, Flink's embedded ``[local]`` mode
and a Spark standalone cluster where Beam's job server jars can be had (scripts/engines.py).

Each case runs the CLI as a user would; resource, error, Bundle and OperationOutcome lines and
summary.json counts must be identical. The inputs are pydicom's real files plus a generated
archive with faults. Line order inside a shard is not compared: it follows the engine's bundles.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import TEST_FILES, copy_dicom, engine_or_skip, pydicom_file, raw_lines
from make_archive import make_archive
from runners import RUNNERS, job_service_and_worker_pool, venv_env

from scripts import engines

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


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    with engines.worker_pool(tmp_path_factory.mktemp("pool-logs")) as (address, _):
        yield address


@pytest.fixture(scope="module")
def baselines(archives, tmp_path_factory):
    """The in-process runner's results per mode, computed once for every engine's comparison."""
    cache = {}

    def baseline(mode):
        if mode not in cache:
            out = tmp_path_factory.mktemp(f"baseline-{mode}")
            cache[mode] = results(out, convert(archives[mode], out, RUNNERS["in_memory_1"], "--group-by", mode,
                                               *LOADABLE))
        return cache[mode]
    return baseline


def assert_same_as_baseline(got, baseline, name):
    for key in ("summary", "manifest", *OUTPUTS):
        assert got[key] == baseline[key], f"{name} differs from in_memory_1 in {key}"


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
def test_every_runner_writes_the_same_lines_and_summary(archives, baselines, portable_service, worker_pool,
                                                        tmp_path, mode):
    prism = engine_or_skip(engines.install_prism, required_in_ci=True)
    cases = {**RUNNERS, "portable_job_service": portable_service,
             "prism": ["--runner", "PrismRunner", "--prism_location", str(prism)],
             "prism_worker_pool": engines.prism_options(worker_pool)}
    cases.pop("in_memory_1")
    seen = {}
    for name, options in cases.items():
        out = tmp_path / name
        seen[name] = results(out, convert(archives[mode], out, options, "--group-by", mode, *LOADABLE))
    baseline = baselines(mode)
    summary = baseline["summary"]
    assert sum(summary["outcomes"].values()) == summary["files_matched"] > 60
    assert summary["resources"]["ImagingStudy"] >= 6 and summary["resources"]["Device"] >= 3
    assert summary["resources"]["Bundle"] == summary["studies"]["written"] and summary["resources"]["Patient"] >= 1
    assert baseline["manifest"]["OperationOutcome"] == len(baseline["errors"]) > 0
    assert {"invalid-uid", "dangling-symlink", "empty-file", "truncated"} <= set(summary["errors_by_reason"])
    if mode == "directory":
        assert summary["errors_by_reason"]["multiple-studies-in-directory"] == 1  # two-studies/
    for name, got in seen.items():
        assert_same_as_baseline(got, baseline, name)


# --- a failing engine ----------------------------------------------------------------------------

def beacons(out) -> list[str]:
    """Progress beacon files of the run writing to ``out`` (each worker's counts, every second)."""
    return glob.glob(os.path.join(out, ".progress-*", "*.json"))


def run_and_kill(input_dir, out, options, kill, timeout=600) -> subprocess.CompletedProcess:
    """Runs the CLI and calls ``kill()`` once its workers have reported reading files."""
    cli = subprocess.Popen([sys.executable, "-m", "beam_pipeline", "--input", str(input_dir), "--output", str(out),
                            "--progress-interval", "1", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=venv_env())
    deadline = time.monotonic() + 300
    while not beacons(out) and cli.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli.poll() is None, "the run ended before the workers could be killed: make the archive bigger"
    kill()
    stdout, stderr = cli.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cli.args, cli.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory):
    """24,000 instances: a run long enough to be killed in the middle of reading."""
    root = tmp_path_factory.mktemp("big-archive")
    make_archive(root, studies=40, series=4, instances=150)
    return root


def test_a_portable_job_is_waited_for_past_beams_job_server_timeout_unless_one_is_given():
    """Beam puts --job_server_timeout (300 s) on the job's state and message streams: a Prism job
    running longer failed with DEADLINE_EXCEEDED (shown with --job_server_timeout 3 on 64k
    instances). The CLI waits ``JOB_SERVER_TIMEOUT`` unless the option is given."""
    from apache_beam.options.pipeline_options import PortableOptions

    from beam_pipeline.run import cli
    from beam_pipeline.run.settings import JOB_SERVER_TIMEOUT

    def timeout(*args):
        return cli.new_pipeline(["--runner", "PrismRunner", *args]).options.view_as(PortableOptions).job_server_timeout

    assert timeout() == JOB_SERVER_TIMEOUT > 24 * 3600
    assert timeout("--job_server_timeout", "42") == 42
    assert timeout("--job_server_timeout=43") == 43


@pytest.mark.parametrize("message, expected", [
    ("job failed:\nSDK worker disconnected: worker_1, 2 active instructions, error: EOF", "SDK worker disconnected: worker_1"),
    ("panic in stage.Execute bundle processing goroutine: send on closed channel, stage: {ID:stage-3},stackTrace:\n"
     "goroutine 77 [running]:\nruntime/debug.Stack()\n\t/usr/local/go/src/runtime/debug/stack.go:26 +0x5e\n"
     "golang.org/x/sync/errgroup.(*Group).Go.func1()\n\t/root/go/pkg/mod/golang.org/x/sync@v0.24.0/errgroup/errgroup.go:78 +0x95",
     "panic in stage.Execute bundle processing goroutine: send on closed channel, stage: {ID:stage-3}"),
    ("pipeline panicked: boom\nStacktrace: goroutine 1 [running]:\nmain.main()\n\t/x.go:1 +0x1", "pipeline panicked: boom"),
])
def test_the_one_error_line_of_a_failed_run_is_the_problem_not_a_go_stack_frame(message, expected):
    from beam_pipeline.run.cli import first_line

    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("wrapped by the runner") from inner
    except ValueError as outer:
        said = first_line(outer)
    assert said.startswith("RuntimeError: " + expected) and ".go:" not in said, said


def test_a_broken_job_stream_is_named_by_the_job_error_logged_before_it_else_by_its_status():
    """When the job server stops before it reports the job's end, Beam raises its broken state stream,
    a gRPC error whose last line is ">" (CI once printed "_MultiThreadedRendezvous: >"): the one error
    line then names the job error the runner logged, or the stream's status. A real stream to a
    closed loopback port."""
    import socket

    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

    from beam_pipeline.run.cli import JobErrors, first_line

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
            for _ in stub.GetStateStream(beam_job_api_pb2.GetJobStateRequest(job_id="job"), timeout=30):
                pass
    finally:
        channel.close()
    said = first_line(caught.value)
    assert said.startswith(f"{type(caught.value).__name__}: UNAVAILABLE: ") and not said.endswith(">"), said
    errors = JobErrors()
    logged = logging.LogRecord("root", logging.ERROR, "/beam/runners/portability/portable_runner.py", 1, "%s",
                               ("job failed:\nSDK worker disconnected: worker_1, 2 active instructions",), None)
    assert errors.filter(logged) is False  # off the console: the one error line says it
    assert first_line(caught.value, errors.after_last_messages()) == \
        "the job failed: SDK worker disconnected: worker_1, 2 active instructions"
    assert first_line(RuntimeError("boom"), errors.last) == "RuntimeError: boom"  # only a broken stream defers


def test_the_failure_of_beams_message_reader_thread_stays_off_the_console_and_others_do_not(capsys):
    """When Prism stops first, Beam's job message reader thread raises while the main thread raises
    the job's failure (CI once showed that thread's traceback beside the one error line)."""
    import threading

    from beam_pipeline.run.cli import quiet_message_reader

    hook = quiet_message_reader(threading.__excepthook__)

    def fail():
        raise ConnectionError("Socket closed")

    for name in ("wait_until_finish_read", "some-other-thread"):
        thread = threading.Thread(target=fail, name=name)
        try:
            fail()
        except ConnectionError as exc:
            hook(threading.ExceptHookArgs((type(exc), exc, exc.__traceback__, thread)))
    printed = capsys.readouterr().err
    assert "wait_until_finish_read" not in printed
    assert "some-other-thread" in printed and "ConnectionError: Socket closed" in printed


@pytest.mark.slow
def test_killed_sdk_workers_fail_the_prism_run_with_one_line_and_no_summary(big_archive, tmp_path):
    prism = engine_or_skip(engines.install_prism, required_in_ci=True)
    with engines.worker_pool(tmp_path / "logs") as (address, pool):
        done = run_and_kill(big_archive, tmp_path / "out", ["--runner", "PrismRunner", "--prism_location", str(prism),
                                                            "--environment_type", "EXTERNAL",
                                                            "--environment_config", address,
                                                            "--job_server_timeout", "240"],
                            kill=lambda: os.killpg(pool.pid, signal.SIGKILL))
    assert done.returncode == 3, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if not line.startswith("progress")]
    assert len(said) == 1 and said[0].startswith("error: the run failed: "), said
    # Prism reports the lost worker, or panics in the stage that ran on it (its Go stack cut off);
    # on a loaded machine it once reported nothing, and the job service's deadline ended the wait
    assert any(text in said[0] for text in ("SDK worker disconnected", "control connection",
                                           "panic in stage.Execute", "within --job_server_timeout")), said[0]
    assert ".go:" not in said[0], said[0]
    assert not os.path.exists(tmp_path / "out" / "_report" / "summary.json")  # its absence marks the run incomplete


# --- Flink and Spark (Beam's job server jars through Maven; skipped, with the coordinates, where
# the registry does not serve them) --------------------------------------------------------------

@pytest.fixture(scope="module")
def flink_home():
    engine_or_skip(engines.require_java)
    jar = engine_or_skip(lambda: engines.install_job_server("flink"))
    return engines.install_flink(), jar


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["study", "directory"])
def test_a_flink_cluster_writes_the_same_lines_and_summary(archives, baselines, flink_home, tmp_path, mode):
    home, _ = flink_home
    with engines.FlinkCluster(home, tmp_path / "flink", taskmanagers=2, slots=1) as cluster, \
            engines.worker_pool(tmp_path / "pool") as (address, _):
        out = tmp_path / "out"
        got = results(out, convert(archives[mode], out, engines.flink_options(cluster.master, address, 2),
                                   "--group-by", mode, *LOADABLE))
        assert cluster.overview()["jobs-finished"] == 1
    assert_same_as_baseline(got, baselines(mode), "flink_cluster")


@pytest.mark.slow
def test_flink_embedded_in_the_job_server_writes_the_same_lines(archives, baselines, flink_home, tmp_path):
    with engines.worker_pool(tmp_path / "pool") as (address, _):
        out = tmp_path / "out"
        got = results(out, convert(archives["study"], out, engines.flink_options("[local]", address, 2),
                                   "--group-by", "study", *LOADABLE))
    assert_same_as_baseline(got, baselines("study"), "flink_local")


@pytest.mark.slow
def test_a_killed_taskmanager_with_a_spare_and_restarts_changes_nothing(big_archive, flink_home, tmp_path):
    home, _ = flink_home
    reference = tmp_path / "reference"
    baseline = results(reference, convert(big_archive, reference, RUNNERS["in_memory_1"]))
    with engines.FlinkCluster(home, tmp_path / "flink", taskmanagers=2, slots=1, restart_attempts=3) as cluster, \
            engines.worker_pool(tmp_path / "pool") as (address, _):
        cluster.add_taskmanager()  # the spare
        cluster.wait_for_taskmanagers(3)
        out = tmp_path / "out"
        done = run_and_kill(big_archive, out, engines.flink_options(cluster.master, address, 2),
                            kill=lambda: os.killpg(cluster.taskmanagers[0].pid, signal.SIGKILL))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "_report", "summary.json"), encoding="utf-8") as handle:
        summary = {k: v for k, v in json.load(handle).items() if k not in ("seconds", "instances_per_second")}
    assert results(out, summary) == baseline  # nothing duplicated, nothing lost


@pytest.mark.slow
def test_a_killed_taskmanager_without_restarts_fails_with_one_line_and_no_summary(big_archive, flink_home, tmp_path):
    home, _ = flink_home
    with engines.FlinkCluster(home, tmp_path / "flink", taskmanagers=2, slots=1) as cluster, \
            engines.worker_pool(tmp_path / "pool") as (address, _):
        done = run_and_kill(big_archive, tmp_path / "out", engines.flink_options(cluster.master, address, 2),
                            kill=lambda: os.killpg(cluster.taskmanagers[0].pid, signal.SIGKILL))
    assert done.returncode == 3, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if not line.startswith("progress")]
    assert len(said) == 1 and said[0].startswith("error: the run failed: "), said
    assert not os.path.exists(tmp_path / "out" / "_report" / "summary.json")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["study", "directory"])
def test_a_spark_cluster_writes_the_same_lines_and_summary(archives, baselines, tmp_path, mode):
    engine_or_skip(engines.require_java)
    engine_or_skip(lambda: engines.install_job_server("spark"))
    with engines.SparkCluster(engines.install_spark(), tmp_path / "spark") as cluster, \
            engines.worker_pool(tmp_path / "pool") as (address, _):
        out = tmp_path / "out"
        got = results(out, convert(archives[mode], out, engines.spark_options(cluster.master, address),
                                   "--group-by", mode, *LOADABLE))
    assert_same_as_baseline(got, baselines(mode), "spark_cluster")


# --- Dask (this project's runner, run/dask_runner.py): a local cluster the run starts, and a
# cluster of separate scheduler and worker processes (scripts/engines.py) -----------------------

@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    with engines.DaskCluster(tmp_path_factory.mktemp("dask-cluster"), workers=2, memory_limit="2GiB") as cluster:
        yield cluster


def dask_runs(cluster, request) -> list[str]:
    if cluster == "local":
        return engines.dask_options(workers=2)
    return engines.dask_options(request.getfixturevalue("dask_cluster").address)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["study", "directory"])
@pytest.mark.parametrize("cluster", ["local", "external"])
def test_dask_writes_the_same_lines_and_summary(archives, baselines, request, tmp_path, mode, cluster):
    out = tmp_path / "out"
    got = results(out, convert(archives[mode], out, dask_runs(cluster, request), "--group-by", mode, *LOADABLE))
    assert_same_as_baseline(got, baselines(mode), f"dask_{cluster}")


@pytest.mark.slow
def test_a_nightly_run_on_dask_writes_the_in_process_runs_snapshot_and_delta(dask_cluster, tmp_path):
    from nightly_changes import assert_same_snapshot, changed_file, deleted_file, new_study

    archive = {"root": tmp_path / "archive"}
    make_archive(archive["root"] / "main", studies=6, series=2, instances=4)
    convert(archive["root"], tmp_path / "a", RUNNERS["in_memory_1"], *LOADABLE)
    for change in (new_study, changed_file, deleted_file):
        change(archive)
    since = ("--since", str(tmp_path / "a"), *LOADABLE)
    on_dask = convert(archive["root"], tmp_path / "dask", engines.dask_options(dask_cluster.address), *since)
    in_process = convert(archive["root"], tmp_path / "in-process", RUNNERS["in_memory_1"], *since)
    assert on_dask == in_process and on_dask["incremental"]["files_read"] >= 4
    assert_same_snapshot(tmp_path / "dask", tmp_path / "in-process")
    delta = [sorted(p.relative_to(root).as_posix() for p in (root / "_delta").rglob("*") if p.is_file())
             for root in (tmp_path / "dask", tmp_path / "in-process")]
    assert delta[0] == delta[1] and "_delta/deletions.json" in delta[0]
    for name in delta[0]:
        if name != "_delta/manifest.json":  # the run's time
            assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "in-process" / name).read_bytes(), name


@pytest.mark.slow
def test_dask_reads_a_pacs_over_dicomweb_as_the_in_process_runner_does(archives, tmp_path, monkeypatch):
    import orthanc as orthanc_harness

    binary, plugin = orthanc_harness.find_binary(), orthanc_harness.find_plugin()
    if binary is None or plugin is None:
        if os.environ.get("CI"):
            pytest.fail("Orthanc with its DICOMweb plugin is not installed")
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian orthanc, orthanc-dicomweb)")
    from beam_pipeline.sources import dicomweb
    monkeypatch.setenv(dicomweb.USER_ENV, orthanc_harness.USER)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, orthanc_harness.PASSWORD)
    monkeypatch.delenv(dicomweb.TOKEN_ENV, raising=False)
    server = orthanc_harness.Orthanc(str(tmp_path / "orthanc"), binary, plugin).start()
    try:
        generated = archives["study"] / "generated"
        assert server.upload_all(sorted(str(p) for p in generated.rglob("*.dcm") if "faults" not in p.parts))
        seen = {}
        for name, options in (("in_process", RUNNERS["in_memory_1"]), ("dask", engines.dask_options(workers=2))):
            out = tmp_path / name
            seen[name] = results(out, convert_dicomweb(server.dicomweb_url, out, options, *LOADABLE))
            again = tmp_path / f"{name}-since"  # nothing changed: every study reused
            seen[name + "-since"] = results(again, convert_dicomweb(server.dicomweb_url, again, options,
                                                                    "--since", str(out), *LOADABLE))
    finally:
        server.stop()
    assert seen["in_process"]["summary"]["studies"]["written"] >= 4
    assert seen["in_process-since"]["summary"]["incremental"]["studies_reused"] >= 4
    for name in ("dask", "dask-since"):
        assert_same_as_baseline(seen[name], seen[name.replace("dask", "in_process")], name)


def convert_dicomweb(url, out, options, *extra) -> dict:
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--dicomweb", url, "--output", str(out), "--quiet",
                           *extra, *options], capture_output=True, text=True, timeout=600, env=venv_env())
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "_report", "summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    del summary["seconds"], summary["instances_per_second"]
    return summary


# --- Dask faults: a cluster of its own per test (workers are killed) -------------------------------

def busiest_worker(cluster) -> subprocess.Popen:
    """The worker process group running or holding the most of the run's tasks right now."""
    from distributed import Client

    with Client(cluster.address, set_as_default=False) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        processing, held = client.processing(), client.has_what()
        address = max(info, key=lambda a: (len(processing.get(a, ())), len(held.get(a, ()))))
        return cluster.workers[int(info[address]["name"].rsplit("-", 1)[1])]


@pytest.mark.slow
def test_a_killed_dask_worker_with_a_spare_changes_nothing(big_archive, tmp_path):
    reference = tmp_path / "reference"
    baseline = results(reference, convert(big_archive, reference, RUNNERS["in_memory_1"]))
    with engines.DaskCluster(tmp_path / "dask", workers=3, memory_limit="2GiB") as cluster:  # two and a spare
        killed = []
        out = tmp_path / "out"
        done = run_and_kill(big_archive, out, engines.dask_options(cluster.address),
                            kill=lambda: killed.append(os.killpg(busiest_worker(cluster).pid, signal.SIGKILL)))
    assert killed and done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "_report", "summary.json"), encoding="utf-8") as handle:
        summary = {k: v for k, v in json.load(handle).items() if k not in ("seconds", "instances_per_second")}
    assert results(out, summary) == baseline  # nothing duplicated, nothing lost


@pytest.mark.slow
@pytest.mark.parametrize("victims", ["every worker", "the scheduler"])
def test_a_dask_cluster_without_workers_or_scheduler_fails_with_one_line_and_no_summary(big_archive, tmp_path,
                                                                                          victims):
    with engines.DaskCluster(tmp_path / "dask", workers=2, memory_limit="2GiB") as cluster:
        processes = cluster.workers if victims == "every worker" else [cluster.scheduler]
        done = run_and_kill(big_archive, tmp_path / "out", engines.dask_options(cluster.address),
                            kill=lambda: [os.killpg(p.pid, signal.SIGKILL) for p in processes])
    assert done.returncode == 3, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if not line.startswith("progress")]
    assert len(said) == 1 and said[0].startswith("error: the run failed: DaskRunnerError: "), said
    assert ("no Dask worker left" if victims == "every worker" else "lost the Dask scheduler") in said[0]
    assert not os.path.exists(tmp_path / "out" / "_report" / "summary.json")  # its absence marks the run incomplete


@pytest.mark.slow
def test_dask_workers_that_must_spill_to_disk_write_the_same_lines(big_archive, tmp_path):
    """600 MiB per worker, and a worker's data may fill only 0.5% of it (3 MiB) before going to disk:
    the 24,000-instance run's data (partials, study groups, lines) is far more than that, whichever
    worker the scheduler gives it to."""
    from distributed import Client

    reference = tmp_path / "reference"
    baseline = results(reference, convert(big_archive, reference, RUNNERS["in_memory_1"]))
    with engines.DaskCluster(tmp_path / "dask", workers=2, memory_limit="600MiB", spill_at=0.005) as cluster:
        out = tmp_path / "out"
        summary = convert(big_archive, out, engines.dask_options(cluster.address))
        with Client(cluster.address, set_as_default=False) as client:
            spilled = client.run(lambda dask_worker: dask_worker.data.cumulative_metrics.get(("disk-write", "bytes"), 0))
            targets = client.run(lambda dask_worker: dask_worker.memory_manager.memory_target_fraction)
    assert set(targets.values()) == {0.005}, targets  # the workers took the threshold
    # both workers' spills, in bytes: the run went through the disk. How much depends on how the
    # scheduler spread the partitions and when the worker checked its memory (2 MiB to 98 MiB seen at
    # a 30 MiB threshold), so only that it did is asserted; the lines must be the same.
    assert sum(spilled.values()) > 0, spilled
    assert results(out, summary) == baseline
