"""Beam's portable path, started for real on free loopback ports: a job service and a worker pool.

Flink and Dataflow take this path (a job service, SDK workers in separate processes); the worker
pool starts a bare ``python``, so the venv's ``bin`` goes first on its PATH.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[2]} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def venv_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@contextlib.contextmanager
def job_service_and_worker_pool(log_dir):
    """Yields the Beam options that submit to a local job service whose workers come from a pool."""
    job_port, pool_port = free_port(), free_port()
    processes = []
    try:
        for module, flag, port, log in (
                ("apache_beam.runners.portability.local_job_service_main", "--port", job_port, "job-service.log"),
                ("apache_beam.runners.worker.worker_pool_main", "--service_port", pool_port, "worker-pool.log")):
            handle = open(os.path.join(log_dir, log), "wb")
            processes.append(subprocess.Popen([sys.executable, "-m", module, flag, str(port)], env=venv_env(),
                                              stdout=handle, stderr=subprocess.STDOUT))
            wait_for_port(port, processes[-1])
        yield ["--runner", "PortableRunner", "--job_endpoint", f"127.0.0.1:{job_port}",
               "--environment_type", "EXTERNAL", "--environment_config", f"127.0.0.1:{pool_port}"]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


RUNNERS = {
    "in_memory_1": ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"],
    "multi_processing_2": ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
    "bundle_based": ["--runner", "BundleBasedDirectRunner"],
    "portable_embed": ["--runner", "PortableRunner", "--job_endpoint", "embed",
                       "--environment_type", "beam:env:harness_subprocess_python:v1",
                       "--environment_config", f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"],
}
