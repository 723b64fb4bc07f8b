"""The same archive on each engine: wall time, CPU and peak RSS of all processes (not part of the tests).

    .venv/bin/python -m benchmarks.engines_benchmark [--instances 16000] [--repeat 1] [--only dask,in_process]

Every case runs the CLI as a user would, on one generated archive (warm page cache), in one
invocation, so the ratios against the in-process runner (the baseline) are comparable. Each engine
also converts a 10-instance archive: its wall time there is the fixed cost (interpreter and JVM
start, job submission, worker start-up); what the big archive adds, divided by its instances, is
the cost per instance. CPU and RSS cover the CLI, the engine it starts (Prism, a job server) and
the separate processes of a cluster or worker pool (Flink's JobManager and TaskManagers, Spark's
master and worker, the SDK worker pool and the workers it forks). Engines that cannot be installed
here (Beam's job server jars not served) are listed with the reason, not measured.

Dask runs as a local cluster the CLI starts (its start-up is part of every run) and as a cluster
of separate scheduler and worker processes (scripts/engines.py), each with 1 and 2 workers; the
largest process's peak RSS (CLI or one worker) is printed beside the sum. With ``--repeat N`` the
cases run N rounds, in turn (ABAB), and each case's best round is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from scripts import engines
from tests.make_archive import make_archive


class ProcessSampler:
    """Polls a set of process trees: peak of the summed RSS, and CPU seconds of every process seen."""

    def __init__(self, roots, interval: float = 0.1):
        self.roots = [psutil.Process(pid) for pid in roots]
        self.interval, self.peak_rss, self.cpu, self.peaks = interval, 0, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self):
        for root in self.roots:
            with contextlib.suppress(psutil.Error):
                yield root
                yield from root.children(recursive=True)

    def _run(self):
        while not self._stop.is_set():
            rss = 0
            for process in self._tree():
                with contextlib.suppress(psutil.Error):
                    own = process.memory_info().rss
                    rss += own
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), own)
                    times = process.cpu_times()
                    # own times only: a reaped child's are in its parent's children_* too
                    self.cpu[(process.pid, process.create_time())] = times.user + times.system
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        # CPU the service processes (a cluster started before this run) spent before it is not its
        self.before = {}
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                self.before[(process.pid, process.create_time())] = times.user + times.system
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> float:
        return sum(cpu - self.before.get(key, 0.0) for key, cpu in self.cpu.items())


def run_cli(archive: Path, out: Path, options: list[str], services: list[int]) -> dict:
    command = [sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out), "--quiet",
               *options]
    started = time.perf_counter()
    cli = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=engines.python_env())
    with ProcessSampler([cli.pid, *services]) as sampler:
        _, stderr = cli.communicate()
    wall = time.perf_counter() - started
    if cli.returncode != 0:
        raise RuntimeError(f"{options}: exit {cli.returncode}: {stderr.strip()[-500:]}")
    return {"wall": wall, "cpu": sampler.cpu_seconds(), "rss_mib": sampler.peak_rss / (1 << 20),
            "largest_mib": max(sampler.peaks.values(), default=0) / (1 << 20)}


def dask_cases(work: Path, stack: contextlib.ExitStack):
    for workers in (1, 2):
        yield f"dask local {workers} worker{'s' * (workers > 1)}", engines.dask_options(workers=workers), []
    for workers in (1, 2):
        cluster = stack.enter_context(engines.DaskCluster(work / f"dask-{workers}", workers=workers,
                                                          memory_limit="4GiB"))
        yield (f"dask cluster {workers} worker{'s' * (workers > 1)}", engines.dask_options(cluster.address),
               [cluster.scheduler.pid, *(worker.pid for worker in cluster.workers)])


def engine_cases(work: Path, stack: contextlib.ExitStack, only=None):
    """(name, options, pids of separate service processes) per engine, or (name, None, why not)."""
    yield "in_process_1 (baseline)", ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"], []
    if only is not None and "dask" in only:
        yield from dask_cases(work, stack)
    if only is not None:
        return
    yield "multi_processing_2", ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"], []
    try:
        prism = str(engines.install_prism())
    except engines.EngineUnavailable as missing:
        yield "prism", None, str(missing)
    else:
        yield "prism (loopback)", ["--runner", "PrismRunner", "--prism_location", prism], []
        address, pool = stack.enter_context(engines.worker_pool(work / "pool"))
        yield "prism + worker pool", engines.prism_options(address), [pool.pid]
    try:
        engines.install_job_server("flink")
    except engines.EngineUnavailable as missing:
        yield "flink cluster p1/p2, flink [local]", None, str(missing)
        started = time.perf_counter()
        with engines.FlinkCluster(engines.install_flink(), work / "flink-start", taskmanagers=1, slots=2):
            print(f"flink cluster start-up alone (JobManager + 1 TaskManager with 2 slots registered, "
                  f"two JVMs): {time.perf_counter() - started:.1f} s")
    else:
        home = engines.install_flink()
        address, pool = stack.enter_context(engines.worker_pool(work / "flink-pool"))
        cluster = stack.enter_context(engines.FlinkCluster(home, work / "flink", taskmanagers=1, slots=2))
        services = [cluster.jobmanager.pid, *(tm.pid for tm in cluster.taskmanagers), pool.pid]
        for parallelism in (1, 2):
            yield f"flink cluster p{parallelism}", engines.flink_options(cluster.master, address, parallelism), services
        yield "flink [local] p2", engines.flink_options("[local]", address, 2), [pool.pid]
    try:
        engines.install_job_server("spark")
    except engines.EngineUnavailable as missing:
        yield "spark cluster", None, str(missing)
        started = time.perf_counter()
        with engines.SparkCluster(engines.install_spark(), work / "spark-start"):
            print(f"spark cluster start-up alone (master + worker, two JVMs): {time.perf_counter() - started:.1f} s")
    else:
        cluster = stack.enter_context(engines.SparkCluster(engines.install_spark(), work / "spark"))
        address, pool = stack.enter_context(engines.worker_pool(work / "spark-pool"))
        yield "spark cluster", engines.spark_options(cluster.master, address), [p.pid for p in cluster.processes] + [pool.pid]
    yield from dask_cases(work, stack)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=16000, help="instances in the big archive (default 16,000)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all cases, in turn (default 1)")
    parser.add_argument("--only", default=None,
                        help="comma-separated: 'dask' runs the in-process baseline and Dask only (default: every engine)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="engines-benchmark-"))
    studies = max(1, args.instances // 400)
    big, tiny = work / "big", work / "tiny"
    make_archive(big, studies=studies, series=4, instances=args.instances // (studies * 4))
    make_archive(tiny, studies=1, series=1, instances=10)
    count = sum(1 for _ in big.rglob("*.dcm"))
    for path in big.rglob("*.dcm"):  # warm page cache for every case alike
        path.read_bytes()
    print(f"archive: {count} instances in {studies} studies; {os.cpu_count()} cores; "
          f"Beam {engines.BEAM_VERSION}, Prism {engines.BEAM_VERSION}, Flink {engines.FLINK_VERSION}")
    only = None if args.only is None else set(args.only.split(","))
    best: dict = {}
    with contextlib.ExitStack() as stack:
        cases = []
        for name, options, services in engine_cases(work, stack, only):
            if options is None:
                print(f"{name}: not run: {services}")
            else:
                cases.append((name, options, services))
        for round_number in range(args.repeat):
            for number, (name, options, services) in enumerate(cases):
                fixed = run_cli(tiny, work / f"tiny-{number}", options, services)
                full = run_cli(big, work / f"out-{number}", options, services)
                full["fixed"] = fixed["wall"]
                print(f"round {round_number + 1}: {name}: wall {full['wall']:.1f} s, fixed {fixed['wall']:.1f} s",
                      flush=True)
                if name not in best or full["wall"] < best[name]["wall"]:
                    best[name] = full
    baseline = best[cases[0][0]]
    for name, _, _ in cases:
        full = best[name]
        per_instance_ms = 1000 * (full["wall"] - full["fixed"]) / count
        print(f"{name:26s} wall {full['wall']:6.1f} s ({full['wall'] / baseline['wall']:4.2f}x)  "
              f"cpu {full['cpu']:6.1f} s ({full['cpu'] / baseline['cpu']:4.2f}x)  "
              f"peak rss {full['rss_mib']:6.0f} MiB ({full['rss_mib'] / baseline['rss_mib']:4.2f}x), "
              f"largest process {full['largest_mib']:5.0f} MiB  "
              f"fixed {full['fixed']:5.1f} s  per instance {per_instance_ms:5.2f} ms  "
              f"{count / full['wall']:6.0f} instances/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
