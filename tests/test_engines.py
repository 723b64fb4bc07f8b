"""scripts/engines.py, the installs and local clusters the engine tests and users start: real
Flink and Spark JVMs on loopback ports, built from the package registries, and stopped cleanly."""
from __future__ import annotations

import ipaddress
import os
import signal

import psutil
import pytest

from scripts import engines


def listening_addresses(process: psutil.Process) -> set[str]:
    found = set()
    for member in [process, *process.children(recursive=True)]:
        for connection in member.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                address = ipaddress.ip_address(connection.laddr.ip)
                found.add(str(getattr(address, "ipv4_mapped", None) or address))  # ::ffff:127.0.0.1 is 127.0.0.1
    return found


def assert_all_gone(processes) -> None:
    for process in processes:
        assert process.poll() is not None, process.args


@pytest.mark.slow
def java_or_skip() -> None:
    """Flink and Spark need Java: skipped without it (named in the suite's last line), failed under CI."""
    try:
        engines.require_java()
    except engines.EngineUnavailable as missing:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(missing))


def test_a_flink_cluster_from_the_pypi_wheels_runs_on_loopback_and_sees_a_lost_taskmanager(tmp_path):
    java_or_skip()
    home = engines.install_flink()
    assert engines.install_flink() == home and (home / "lib" / f"flink-dist-{engines.FLINK_VERSION}.jar").is_file()
    with engines.FlinkCluster(home, tmp_path, taskmanagers=2, slots=2) as cluster:
        overview = cluster.overview()
        assert (overview["flink-version"], overview["taskmanagers"], overview["slots-total"]) == \
            (engines.FLINK_VERSION, 2, 4)
        assert listening_addresses(psutil.Process(cluster.jobmanager.pid)) == {"127.0.0.1"}
        os.killpg(cluster.taskmanagers[0].pid, signal.SIGKILL)
        cluster.wait_for_taskmanagers(1, timeout=60)  # heartbeat timeout 8 s
        cluster.add_taskmanager()
        cluster.wait_for_taskmanagers(2)
        started = [cluster.jobmanager, *cluster.taskmanagers]
    assert_all_gone(started)


@pytest.mark.slow
def test_a_spark_master_and_worker_from_pyspark_run_on_loopback(tmp_path):
    java_or_skip()
    with engines.SparkCluster(engines.install_spark(), tmp_path, cores=2) as cluster:
        status = cluster.status()
        assert (status["status"], status["aliveworkers"], status["cores"]) == ("ALIVE", 1, 2)
        assert listening_addresses(psutil.Process(cluster.processes[0].pid)) == {"127.0.0.1"}
        started = list(cluster.processes)
    assert_all_gone(started)


def test_prism_is_installed_once_at_the_sdk_version():
    try:
        prism = engines.install_prism()
    except engines.EngineUnavailable:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Go here")
    assert prism.name == f"prism-{engines.BEAM_VERSION}" and os.access(prism, os.X_OK)
    assert engines.install_prism() == prism


@pytest.mark.parametrize("engine", ["flink", "spark"])
def test_a_job_server_is_a_jar_at_the_sdk_version_or_one_line_with_its_coordinates(engine, monkeypatch):
    monkeypatch.delenv(f"BEAM_{engine.upper()}_JOB_SERVER_JAR", raising=False)
    coordinates = engines.job_server_coordinates(engine)
    assert coordinates.endswith(":" + engines.BEAM_VERSION)
    try:
        jar = engines.install_job_server(engine)
    except engines.EngineUnavailable as missing:
        assert coordinates in str(missing) and "\n" not in str(missing)
    else:
        assert jar.is_file() and jar.name.endswith(f"-{engines.BEAM_VERSION}.jar")


def test_a_named_job_server_jar_that_is_not_there_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("BEAM_FLINK_JOB_SERVER_JAR", str(tmp_path / "missing.jar"))
    with pytest.raises(engines.EngineUnavailable, match="missing.jar: no such file"):
        engines.install_job_server("flink")
