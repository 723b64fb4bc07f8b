"""Install and start the Beam engines this converter runs on, without Docker and on loopback only.

    python scripts/engines.py install prism          # go install, into the engine cache
    python scripts/engines.py install flink          # Flink home from PyPI + Beam's Flink job server
    python scripts/engines.py install spark          # pyspark in its own venv + Beam's Spark job server
    python scripts/engines.py flink-cluster [--taskmanagers 2 --slots 2]   # runs until Ctrl-C
    python scripts/engines.py spark-cluster          # a master and a worker, until Ctrl-C
    python scripts/engines.py worker-pool            # Python SDK workers for --environment_type EXTERNAL
    python scripts/engines.py dask-cluster [--workers 2 --memory-limit 2GiB]   # for --runner dask

Every install is idempotent and lands in the engine cache (``$DICOM_FHIR_ENGINES``, default
``~/.cache/dicom-fhir-engines``); jars come through Maven (``~/.m2``), Prism through the Go module
cache. The tests (tests/test_runners.py, tests/test_engines.py) use these same functions.

Versions are pinned here and named in docs/engines.md: Prism and the job servers match the installed
apache-beam, so SDK and engine speak the same protocol version. Flink and Spark are never installed
into the project's venv: their PyPI packages pin an old apache-beam.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from importlib.metadata import version
from pathlib import Path

BEAM_VERSION = version("apache-beam")
FLINK_VERSION = "1.20.5"  # Beam 2.77 supports Flink 1.19-2.2; 1.20 runs batch on the DataSet path
SPARK_VERSION = "3.5.8"   # Beam's Spark 3 runner; pyspark ships the jars and spark-class
PRISM_MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"
LOOPBACK = "127.0.0.1"


class EngineUnavailable(RuntimeError):
    """An engine cannot be installed here; the message names what is missing and why, in one line."""


def cache_dir() -> Path:
    path = Path(os.environ.get("DICOM_FHIR_ENGINES", Path.home() / ".cache" / "dicom-fhir-engines"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(ready, what: str, processes=(), timeout: float = 120) -> None:
    """Polls ``ready()`` until it holds; a started process that exits first fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{what}: {process.args[0]} exited with {process.returncode} (see its log)")
        with contextlib.suppress(OSError, ValueError):
            if ready():
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def port_open(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1):
        return True


def python_env() -> dict:
    """The environment SDK workers need: this interpreter's bin first on PATH (the worker pool and
    job servers start a bare ``python``), nothing pointing at a cloud."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def java_env() -> dict:
    """Java 17 for Flink and Spark (Flink 1.20 does not run on Java 25)."""
    env = python_env()
    for candidate in ("/usr/lib/jvm/java-17-openjdk-amd64", "/usr/lib/jvm/openjdk-17"):
        if os.path.isdir(candidate) and "JAVA_HOME" not in os.environ:
            env["JAVA_HOME"] = candidate
            env["PATH"] = os.path.join(candidate, "bin") + os.pathsep + env["PATH"]
            break
    return env


def require_java() -> None:
    """Flink and Spark run on Java 17: ``EngineUnavailable`` (one line naming the package) without it."""
    if shutil.which("java", path=java_env()["PATH"]) is None:
        raise EngineUnavailable("Flink and Spark need Java 17: `java` is not on PATH "
                                "(apt-get install openjdk-17-jdk-headless)")


# --- installs ----------------------------------------------------------------------------------

def install_prism() -> Path:
    """Prism, Beam's portable runner in Go, at the SDK's version (``--prism_location``)."""
    target = cache_dir() / "bin" / f"prism-{BEAM_VERSION}"
    if target.is_file():
        return target
    go = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")
    if go is None:
        raise EngineUnavailable("Prism needs Go (go install); `go` is not on PATH")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as gobin:
        done = subprocess.run([go, "install", f"{PRISM_MODULE}@v{BEAM_VERSION}"], capture_output=True,
                              text=True, env={**os.environ, "GOBIN": gobin})
        if done.returncode != 0:
            raise EngineUnavailable(f"go install {PRISM_MODULE}@v{BEAM_VERSION} failed: "
                                    f"{done.stderr.strip().splitlines()[-1:]}")
        target.parent.mkdir(exist_ok=True)
        shutil.move(os.path.join(gobin, "prism"), target)
    return target


def job_server_coordinates(engine: str) -> str:
    artifact = {"flink": f"beam-runners-flink-{FLINK_VERSION.rsplit('.', 1)[0]}-job-server",
                "spark": "beam-runners-spark-3-job-server"}[engine]
    return f"org.apache.beam:{artifact}:{BEAM_VERSION}"


def install_job_server(engine: str) -> Path:
    """Beam's job server jar for ``engine`` through Maven (``--flink_job_server_jar`` /
    ``--spark_job_server_jar``), so Beam never downloads it itself. ``$BEAM_<ENGINE>_JOB_SERVER_JAR``
    names a jar brought in by hand (an air-gapped site's copy)."""
    given = os.environ.get(f"BEAM_{engine.upper()}_JOB_SERVER_JAR")
    if given:
        if not os.path.isfile(given):
            raise EngineUnavailable(f"BEAM_{engine.upper()}_JOB_SERVER_JAR={given}: no such file")
        return Path(given)
    coordinates = job_server_coordinates(engine)
    group, artifact, release = coordinates.split(":")
    jar = (Path.home() / ".m2" / "repository" / group.replace(".", "/") / artifact / release
           / f"{artifact}-{release}.jar")
    if jar.is_file():
        return jar
    if shutil.which("mvn") is None:
        raise EngineUnavailable(f"{coordinates} is fetched with Maven; `mvn` is not on PATH")
    done = subprocess.run(["mvn", "-B", "-q", "-U", "dependency:get", f"-Dartifact={coordinates}", "-Dtransitive=false"],
                          capture_output=True, text=True)
    if done.returncode != 0 or not jar.is_file():
        said = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
        reason = re.search(r"(Could not find artifact|Couldn't download artifact|Could not transfer)[^\n]*", said)
        raise EngineUnavailable(f"the Maven registry does not serve {coordinates} "
                                f"(mvn dependency:get: {reason.group(0)[:240] if reason else 'no jar'})")
    return jar


def pip_download(requirement: str, target: Path, *extra: str) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(target),
                    requirement, *extra], check=True)
    name = requirement.split("==")[0].replace("-", "_")
    return next(path for path in target.iterdir() if path.name.startswith(name + "-"))


def install_flink() -> Path:
    """A Flink home built from PyPI's ``apache-flink`` (bin/, conf/) and ``apache-flink-libraries``
    (lib/, opt/, plugins/), unpacked into the cache, never installed into a venv."""
    home = cache_dir() / f"flink-{FLINK_VERSION}"
    if (home / "lib" / f"flink-dist-{FLINK_VERSION}.jar").is_file():
        return home
    downloads = cache_dir() / "downloads"
    wheel = pip_download(f"apache-flink=={FLINK_VERSION}", downloads, "--only-binary", ":all:",
                         "--python-version", "3.11", "--platform", "manylinux2014_x86_64")
    libraries = pip_download(f"apache-flink-libraries=={FLINK_VERSION}", downloads, "--no-binary", ":all:")
    staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix="flink-unpack-"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(("pyflink/bin/", "pyflink/conf/")) and not member.endswith("/"):
                    dest = staging / member.removeprefix("pyflink/")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(archive.read(member))
        with tarfile.open(libraries) as archive:
            prefix = f"apache_flink_libraries-{FLINK_VERSION}/deps/"
            for member in archive.getmembers():  # deps/{bin,lib,opt,plugins,...} -> the home
                if member.isfile() and member.name.startswith(prefix):
                    dest = staging / member.name[len(prefix):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with archive.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        for script in (staging / "bin").iterdir():
            script.chmod(0o755)
        (staging / "log").mkdir(exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        staging.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def install_spark() -> Path:
    """pyspark (Spark's jars and spark-class) in a venv of its own in the cache; returns SPARK_HOME."""
    venv = cache_dir() / f"spark-{SPARK_VERSION}-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = [str(python), "-c", "import os, pyspark; print(os.path.dirname(pyspark.__file__))"]
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"pyspark=={SPARK_VERSION}"], check=True)
        found = subprocess.run(probe, capture_output=True, text=True, check=True)
    return Path(found.stdout.strip())


# --- running engines ---------------------------------------------------------------------------

def _log(log_dir: Path, name: str):
    log_dir.mkdir(parents=True, exist_ok=True)
    return open(log_dir / name, "wb")


def stop(processes) -> None:
    """TERM each process group, then KILL what is left after 15 s (JVMs and their children)."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(command, log, env) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextlib.contextmanager
def worker_pool(log_dir: Path):
    """Python SDK workers started on demand by Beam's worker pool (``--environment_type EXTERNAL``).
    Yields (address, process): the process is there to be killed by a failure test."""
    port = free_port()
    process = start([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port",
                     str(port)], _log(log_dir, f"worker-pool-{port}.log"), python_env())
    try:
        wait_until(lambda: port_open(port), "SDK worker pool", [process], timeout=60)
        yield f"{LOOPBACK}:{port}", process
    finally:
        stop([process])


class FlinkCluster:
    """A standalone Flink session cluster on loopback: one JobManager and N TaskManagers, each its
    own JVM; ``master`` is what ``--flink_master`` takes."""

    def __init__(self, home: Path, work: Path, taskmanagers: int = 2, slots: int = 2,
                 restart_attempts: int = 0):
        self.home, self.work, self.slots = home, work, slots
        self.rest_port, self.rpc_port = free_port(), free_port()
        self.master = f"{LOOPBACK}:{self.rest_port}"
        self.conf = work / "conf"
        self.conf.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(home / "conf"):
            if name.startswith("log4j"):
                shutil.copy(home / "conf" / name, self.conf / name)
        restart = ({"restart-strategy": {"type": "fixed-delay", "fixed-delay": {"attempts": restart_attempts,
                                                                                  "delay": "2 s"}}}
                   if restart_attempts else {"restart-strategy": {"type": "none"}})
        config = {
            "jobmanager": {"bind-host": LOOPBACK, "rpc": {"address": LOOPBACK, "port": self.rpc_port},
                           "memory": {"process": {"size": "1024m"}}},
            "taskmanager": {"bind-host": LOOPBACK, "host": LOOPBACK, "numberOfTaskSlots": slots,
                            "memory": {"process": {"size": "1280m"}}},
            "rest": {"address": LOOPBACK, "bind-address": LOOPBACK, "port": self.rest_port},
            "heartbeat": {"interval": 1000, "timeout": 8000},
            "parallelism": {"default": slots},
            **restart,
        }
        # JSON is YAML: Flink 1.20 reads conf/config.yaml
        (self.conf / "config.yaml").write_text(json.dumps(config, indent=1))
        self.env = {**java_env(), "FLINK_CONF_DIR": str(self.conf), "FLINK_LOG_DIR": str(work / "log")}
        self.jobmanager = None
        self.taskmanagers: list[subprocess.Popen] = []
        self._wanted = taskmanagers

    def _daemon(self, script: str, name: str) -> subprocess.Popen:
        return start([str(self.home / "bin" / script), "start-foreground"], _log(self.work / "log", name), self.env)

    def overview(self) -> dict:
        with urllib.request.urlopen(f"http://{self.master}/overview", timeout=5) as answer:
            return json.load(answer)

    def add_taskmanager(self) -> subprocess.Popen:
        process = self._daemon("taskmanager.sh", f"taskmanager-{len(self.taskmanagers)}.out")
        self.taskmanagers.append(process)
        return process

    def wait_for_taskmanagers(self, count: int, timeout: float = 120) -> None:
        """Until exactly ``count`` TaskManagers have registered with all their slots (a TaskManager
        registers before its slots do; a lost one is noticed after the 8 s heartbeat timeout)."""
        def ready():
            overview = self.overview()
            return (overview["taskmanagers"], overview["slots-total"]) == (count, count * self.slots)
        wait_until(ready, f"Flink with {count} TaskManagers", [self.jobmanager], timeout)

    def __enter__(self):
        require_java()
        self.jobmanager = self._daemon("jobmanager.sh", "jobmanager.out")
        for _ in range(self._wanted):
            self.add_taskmanager()
        try:
            self.wait_for_taskmanagers(self._wanted)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        stop([*self.taskmanagers, self.jobmanager])


class SparkCluster:
    """A Spark standalone master and one worker on loopback; ``master`` is ``spark://127.0.0.1:PORT``."""

    def __init__(self, spark_home: Path, work: Path, cores: int = 2):
        self.spark_home, self.work, self.cores = spark_home, work, cores
        self.port, self.ui_port = free_port(), free_port()
        self.master = f"spark://{LOOPBACK}:{self.port}"
        self.env = {**java_env(), "SPARK_HOME": str(spark_home), "SPARK_LOCAL_IP": LOOPBACK,
                    "SPARK_WORKER_DIR": str(work / "worker")}
        self.processes: list[subprocess.Popen] = []

    def __enter__(self):
        require_java()
        spark_class = str(self.spark_home / "bin" / "spark-class")
        self.processes.append(start([spark_class, "org.apache.spark.deploy.master.Master", "--host", LOOPBACK,
                                     "--port", str(self.port), "--webui-port", str(self.ui_port)],
                                    _log(self.work, "master.log"), self.env))
        wait_until(lambda: port_open(self.port), "Spark master", self.processes)
        self.processes.append(start([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", LOOPBACK,
                                     "--cores", str(self.cores), "--webui-port", str(free_port()), self.master],
                                    _log(self.work, "worker.log"), self.env))
        wait_until(lambda: self.status()["aliveworkers"] == 1, "Spark worker", self.processes)
        return self

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ui_port}/json/", timeout=5) as answer:
            return json.load(answer)

    def __exit__(self, *exc):
        stop(list(reversed(self.processes)))


class DaskCluster:
    """A Dask scheduler and N workers on loopback, each worker its own process group (a nanny and
    its worker process) with a memory limit; ``address`` is what ``--dask_client_address`` takes.
    Workers spill to their local directory as they near the limit."""

    def __init__(self, work: Path, workers: int = 2, memory_limit: str = "2GiB", threads: int = 1,
                 spill_at: float | None = None):
        """``spill_at``: the fraction of ``memory_limit`` the worker's data may fill before it moves
        data to disk (Dask's default 0.6; further limits on the whole process: 0.7 spill, 0.8
        pause, 0.95 restart)."""
        self.work, self.memory_limit, self.threads = Path(work), memory_limit, threads
        self.env = python_env()
        if spill_at is not None:
            self.env["DASK_DISTRIBUTED__WORKER__MEMORY__TARGET"] = str(spill_at)
        self.port = free_port()
        self.address = f"tcp://{LOOPBACK}:{self.port}"
        self.scheduler = None
        self.workers: list[subprocess.Popen] = []
        self._wanted = workers

    def add_worker(self) -> subprocess.Popen:
        number = len(self.workers)
        process = start([sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--host", LOOPBACK,
                         "--nthreads", str(self.threads), "--memory-limit", self.memory_limit, "--no-dashboard",
                         "--name", f"worker-{number}", "--local-directory", str(self.work / f"worker-{number}")],
                        _log(self.work, f"worker-{number}.log"), self.env)
        self.workers.append(process)
        return process

    def wait_for_workers(self, count: int, timeout: float = 120) -> None:
        """Until exactly ``count`` workers are registered with the scheduler."""
        from distributed import Client

        with Client(self.address, timeout=timeout, set_as_default=False) as client:
            wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == count,
                       f"Dask with {count} workers", [self.scheduler], timeout)

    def __enter__(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self.scheduler = start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", LOOPBACK,
                                "--port", str(self.port), "--no-dashboard"],
                               _log(self.work, "scheduler.log"), python_env())
        try:
            wait_until(lambda: port_open(self.port), "Dask scheduler", [self.scheduler], timeout=60)
            for _ in range(self._wanted):
                self.add_worker()
            self.wait_for_workers(self._wanted)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        stop([*self.workers, self.scheduler])


# --- Beam options per engine -------------------------------------------------------------------

def prism_options(worker_pool_address: str | None = None) -> list[str]:
    options = ["--runner", "PrismRunner", "--prism_location", str(install_prism())]
    if worker_pool_address:
        options += ["--environment_type", "EXTERNAL", "--environment_config", worker_pool_address]
    return options


def flink_options(master: str, worker_pool_address: str, parallelism: int = 2) -> list[str]:
    """``master`` is host:port of a cluster's REST endpoint, or ``[local]`` for Flink inside the job server."""
    return ["--runner", "FlinkRunner", "--flink_master", master, "--flink_version", FLINK_VERSION.rsplit(".", 1)[0],
            "--flink_job_server_jar", str(install_job_server("flink")), "--parallelism", str(parallelism),
            "--environment_type", "EXTERNAL", "--environment_config", worker_pool_address]


def spark_options(master: str, worker_pool_address: str) -> list[str]:
    return ["--runner", "SparkRunner", "--spark_master_url", master,
            "--spark_job_server_jar", str(install_job_server("spark")),
            "--environment_type", "EXTERNAL", "--environment_config", worker_pool_address]


def dask_options(address: str | None = None, workers: int | None = None) -> list[str]:
    """This project's Dask runner: on the cluster at ``address``, else on a local cluster of
    ``workers`` processes (default: one per core) started for the run."""
    options = ["--runner", "dask"]
    if address:
        options += ["--dask_client_address", address]
    if workers:
        options += ["--dask_workers", str(workers)]
    return options


def _serve(context) -> None:
    with context as running:
        said = running if isinstance(running, dict) else (
            {"dask_client_address": running.address} if isinstance(running, DaskCluster) else {"master": running.master})
        print(json.dumps(said), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install an engine into the cache (idempotent)")
    install.add_argument("engine", choices=["prism", "flink", "spark"])
    flink = commands.add_parser("flink-cluster", help="start a standalone Flink cluster until Ctrl-C")
    flink.add_argument("--taskmanagers", type=int, default=2)
    flink.add_argument("--slots", type=int, default=2)
    flink.add_argument("--restart-attempts", type=int, default=0)
    commands.add_parser("spark-cluster", help="start a Spark master and worker until Ctrl-C")
    commands.add_parser("worker-pool", help="start a Python SDK worker pool until Ctrl-C")
    dask = commands.add_parser("dask-cluster", help="start a Dask scheduler and workers until Ctrl-C")
    dask.add_argument("--workers", type=int, default=2)
    dask.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    dask.add_argument("--memory-limit", default="2GiB", help="per worker, e.g. 2GiB (default %(default)s)")
    args = parser.parse_args(argv)
    work = None if args.command == "install" else Path(tempfile.mkdtemp(prefix=f"{args.command}-", dir=cache_dir()))
    try:
        if args.command == "install":
            installs = {"prism": lambda: [install_prism()],
                        "flink": lambda: [install_flink(), install_job_server("flink")],
                        "spark": lambda: [install_spark(), install_job_server("spark")]}
            for path in installs[args.engine]():
                print(path)
        elif args.command == "flink-cluster":
            _serve(FlinkCluster(install_flink(), work, args.taskmanagers, args.slots, args.restart_attempts))
        elif args.command == "dask-cluster":
            _serve(DaskCluster(work, args.workers, args.memory_limit, args.threads))
        elif args.command == "spark-cluster":
            _serve(SparkCluster(install_spark(), work))
        else:
            with worker_pool(work) as (address, _):
                print(json.dumps({"environment_config": address}), flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    signal.pause()
    except EngineUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
