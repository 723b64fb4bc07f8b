"""Benchmark case (e): header reads from gs:// at cloud latency vs the same files on local disk.

A GCS emulator (gcp-storage-emulator) and a latency proxy (``latency_proxy``, +20 ms per request,
counting requests and bytes) run as subprocesses on loopback; the archive's files are uploaded,
then ``header.read_header`` runs over every file: from local disk (one core), from gs:// one after
the other, and from gs:// with ``--read-concurrency`` reads in flight (the reading process pinned
to one core in every case). Prints requests and bytes per file, instances/s and the ratios, with
PASS/FAIL against issue 9's targets. Nothing leaves 127.0.0.1.

    python -m benchmarks.gcs_case --files 2000 --delay-ms 20 --read-concurrency 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BUCKET = "bench"


def _start(cmd: list[str], ready_url: str | None = None, timeout: float = 20.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = ready_url or proc.stdout.readline().strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/", timeout=1):
                return proc, url
        except urllib.error.HTTPError:
            return proc, url  # answers: up
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not come up")


def _proxy_counts(proxy_url: str, reset: bool = False) -> dict:
    from benchmarks.latency_proxy import CONTROL_PATH

    with urllib.request.urlopen(proxy_url + CONTROL_PATH + ("?reset=1" if reset else ""), timeout=5) as r:
        return json.loads(r.read())


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def _pinned(fn):
    """Run fn on one CPU (the proxy and emulator get the other), return (seconds, result)."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result
    finally:
        os.sched_setaffinity(0, saved)


def run_case(paths: list[str], root: str, delay_ms: float = 20.0, concurrency: int = 32) -> dict:
    """Upload ``paths`` (under ``root``) to an emulator and time the three header-reading modes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gcs_emulator import GcsEmulator, anonymous_client, offline_environment, patched_environ

    from beam_pipeline import gcs, header
    from beam_pipeline.fields import default_spec

    spec = default_spec()
    fig: dict = {"files": len(paths), "delay_ms": delay_ms, "concurrency": concurrency}
    with GcsEmulator() as emulator, patched_environ(offline_environment(emulator.url)):
        emulator.create_bucket(BUCKET)
        client = anonymous_client()
        bucket = client.bucket(BUCKET)
        started = time.perf_counter()
        gs_paths = []
        for path in paths:
            name = "archive/" + os.path.relpath(path, root)
            bucket.blob(name).upload_from_filename(path)
            gs_paths.append(f"gs://{BUCKET}/{name}")
        fig["upload_seconds"] = time.perf_counter() - started
        proxy, proxy_url = _start([sys.executable, "-m", "benchmarks.latency_proxy", "--upstream", emulator.url,
                                   "--delay-ms", str(delay_ms)])
        try:
            def local():
                results = []
                for path in paths:
                    with open(path, "rb") as fp:
                        results.append(header.read_header(fp, spec))
                return results

            local()  # warm: page cache, imports
            before = _rchar()
            seconds, local_results = _pinned(local)
            fig["local"] = {"seconds": seconds, "rate": len(paths) / seconds,
                            "bytes_per_file": (_rchar() - before) / len(paths)}

            session = gcs.open_session(pool_size=concurrency)
            fetcher = gcs.RangeFetcher(session, base_url=proxy_url)

            def read_one(path):
                return header.read_header(gcs.open_ranged(fetcher, path), spec)

            def on_error(path, exc):
                return None

            for name, workers in (("gs_serial", 0), ("gs_concurrent", concurrency)):
                pool = ThreadPoolExecutor(workers) if workers else None
                gcs.read_all(gs_paths[:4], read_one, on_error, pool)  # open connections
                _proxy_counts(proxy_url, reset=True)
                seconds, results = _pinned(lambda: gcs.read_all(gs_paths, read_one, on_error, pool))
                counts = _proxy_counts(proxy_url)
                if pool:
                    pool.shutdown()
                fig[name] = {"seconds": seconds, "rate": len(paths) / seconds,
                             "requests_per_file": counts["requests"] / len(paths),
                             "bytes_per_file": counts["response_bytes"] / len(paths),
                             "same_results_as_local": results == local_results}
        finally:
            proxy.terminate()
            proxy.wait()
    return fig


def targets(fig: dict) -> list[tuple[str, float | None, str, bool | None]]:
    local, serial, concurrent = fig.get("local", {}), fig.get("gs_serial", {}), fig.get("gs_concurrent", {})
    ratio = concurrent["rate"] / local["rate"] if concurrent.get("rate") and local.get("rate") else None
    rows = [
        (f"(e) gs:// concurrent / local, {fig.get('delay_ms')} ms/request", ratio, ">= 0.5", lambda v: v >= 0.5),
        ("(e) requests per file", concurrent.get("requests_per_file"), "<= 1.2", lambda v: v <= 1.2),
        ("(e) header bytes per file, gs / local",
         concurrent["bytes_per_file"] / local["bytes_per_file"] if concurrent.get("bytes_per_file") else None,
         "<= 1.0", lambda v: v <= 1.0),
        ("(e) gs:// results equal local", float(bool(concurrent.get("same_results_as_local")
                                                     and serial.get("same_results_as_local"))),
         "= 1", lambda v: v == 1.0),
    ]
    return [(n, v, t, None if v is None else ok(v)) for n, v, t, ok in rows]


def report(fig: dict) -> None:
    print(f"\n(e) {fig['files']} files, header reads, reader on one core, +{fig['delay_ms']} ms per request "
          f"(upload took {fig.get('upload_seconds', 0):.1f} s)")
    print(f"{'mode':<34}{'seconds':>9}{'inst/s':>9}{'x local':>9}{'req/file':>10}{'bytes/file':>12}")
    local_rate = fig["local"]["rate"]
    for key, name in (("local", "local disk, serial"), ("gs_serial", "gs://, one at a time"),
                      ("gs_concurrent", f"gs://, {fig['concurrency']} in flight")):
        f = fig[key]
        print(f"{name:<34}{f['seconds']:>9.2f}{f['rate']:>9.0f}{f['rate'] / local_rate:>9.2f}"
              f"{f.get('requests_per_file', float('nan')):>10.2f}{f['bytes_per_file']:>12.0f}")


def print_targets(rows) -> None:
    for name, value, goal, ok in rows:
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"{name:<44}{shown:>12}  {goal:<10}{'-' if ok is None else ('PASS' if ok else 'FAIL')}")


def main(argv=None) -> int:
    from benchmarks.make_archive import make_archive

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="files of the archive uploaded and read")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--read-concurrency", type=int, default=32)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gcs-bench-") as work:
        per_series = 100
        series = max(1, -(-args.files // per_series))
        make_archive(Path(work) / "archive", studies=max(1, series // 4), series=min(series, 4),
                     instances=per_series)
        paths = sorted(str(p) for p in (Path(work) / "archive").rglob("*.dcm"))[:args.files]
        fig = run_case(paths, str(Path(work) / "archive"), args.delay_ms, args.read_concurrency)
    fig["targets"] = targets(fig)
    report(fig)
    print(f"\n{'target':<44}{'measured':>12}  {'target':<10}result")
    print_targets(fig["targets"])
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
