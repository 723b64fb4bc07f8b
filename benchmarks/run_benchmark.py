"""Throughput / memory / I/O benchmark of the DICOM -> FHIR converter (not part of the test suite).

All cases run in one invocation on the same warm archive so their ratios are comparable:
  (a) bare pydicom header parse, 1 core - the baseline every other figure is divided by
  (b) beam_pipeline.run.convert.convert_files in-process, 1 core (no Beam)
  (c) full pipeline, DirectRunner in_memory, 1 worker       (subprocess)
  (d) full pipeline, DirectRunner multi_processing, 2 workers (subprocess)
  (e) with --gcs-files N: N of the archive's files from gs:// (a loopback GCS emulator behind a
      proxy adding --gcs-delay-ms per request) vs local disk: headers, convert_files and the CLI
      (``benchmarks/gcs_case.py``, also runnable alone)
  (f) the CLI end to end (``python -m beam_pipeline``, interpreter start-up included) on one core,
      in-process runner (``benchmarks/cli_case.py``), measured right after (a) on the same CPU
plus bytes read per file by (b) with and without 4 MiB pixel data, and (d) on one huge study.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pydicom

from beam_pipeline.run.settings import DEFAULT_READ_CONCURRENCY
from tests.make_archive import make_archive

MIB = 1 << 20
PIXEL_BYTES = 4 * MIB


def list_dicoms(root) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*.dcm"))


def warm(paths) -> None:
    """Read every file once so all cases start from the same (hot) page cache."""
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(MIB):
                pass


def rchar() -> int:
    """Bytes this process asked read() for (counts page-cache hits, unlike read_bytes)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


@contextlib.contextmanager
def one_core():
    """Pin this process to one CPU so in-process cases cannot borrow a second core."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def parse_pydicom(paths) -> None:
    for p in paths:
        pydicom.dcmread(p, stop_before_pixels=True)


def convert(paths, **kw):
    from beam_pipeline.run.convert import convert_files  # imported late: may not exist yet
    return convert_files(paths, **kw)


def convert_unvalidated(paths):
    """Informational: how much of (b) is fhir.resources validation."""
    return convert(paths, validate=False)


def timed(fn, paths, repeat=1):
    """Best wall time of `repeat` runs (and the last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(paths)
        best = min(best, time.perf_counter() - t0)
    return best, result


def rss_tree(proc: psutil.Process) -> int:
    """RSS summed over a process and all its descendants (Beam workers are children)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _system_busy() -> float:
    """Non-idle CPU seconds of the whole machine (others may share it)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0)


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _foreign_load(busy0: float, own_cpu: float, wall: float) -> float:
    """Average cores used by processes other than ours during `wall` seconds."""
    return max(0.0, _system_busy() - busy0 - own_cpu) / wall


def _children_cpu() -> float:
    """user+sys of all reaped descendants: shows whether a run kept both cores busy."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_pipeline(archive, out, mode, workers, log_path) -> dict:
    """Run the pipeline CLI as a subprocess, polling the tree's RSS every 50 ms."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out),
           "--direct_running_mode", mode, "--direct_num_workers", str(workers)]
    peak, cpu0, busy0, self0 = 0, _children_cpu(), _system_busy(), _self_cpu()
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, rss_tree(ps))
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
    fig = {"cmd": " ".join(cmd), "seconds": seconds, "peak_rss_mib": peak / MIB, "rc": proc.returncode,
           "cpu_seconds": _children_cpu() - cpu0}
    fig["foreign_cores"] = _foreign_load(busy0, fig["cpu_seconds"] + _self_cpu() - self0, seconds)
    summary = Path(out) / "_report" / "summary.json"
    if proc.returncode or not summary.exists():
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        fig["error"] = f"rc={proc.returncode}, summary.json {'present' if summary.exists() else 'missing'}"
        print(f"  ! {fig['error']}; log {log_path}:\n{tail}", file=sys.stderr)
        return fig
    summary = json.loads(summary.read_text())
    outcomes = summary.get("outcomes", {})
    fig["outcomes"] = outcomes
    fig["self_reported_seconds"] = summary.get("seconds")  # the pipeline's own clock, no interpreter start
    fig["instances"] = outcomes.get("converted", 0)
    fig["rate"] = fig["instances"] / seconds
    return fig


TRIVIAL_PIPELINE = """
import sys, time
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
t0 = time.perf_counter()
with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(sys.argv[1:])) as p:
    p | beam.Create(range(10)) | beam.Map(lambda x: x)
print(time.perf_counter() - t0)
"""


def runner_floor(mode, workers) -> dict:
    """Seconds a trivial 10-element pipeline takes in a runner mode: start-up no converter can avoid."""
    cmd = [sys.executable, "-c", TRIVIAL_PIPELINE, "--direct_running_mode", mode, "--direct_num_workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {"seconds": float(out.strip().splitlines()[-1])}


def guarded(label, fn, *args):
    """Run one case; a failure (e.g. converter not written yet) is recorded, not fatal."""
    print(f"-- {label}", file=sys.stderr, flush=True)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
        print(f"  ! {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}


def case_in_process(fn, paths, repeat) -> dict:
    fn(paths[:2])  # import + first-call costs are not throughput
    busy0, cpu0, t0 = _system_busy(), _self_cpu(), time.perf_counter()
    with one_core():
        seconds, result = timed(fn, paths, repeat)
    fig = {"instances": len(paths), "seconds": seconds, "rate": len(paths) / seconds,
           "foreign_cores": _foreign_load(busy0, _self_cpu() - cpu0, time.perf_counter() - t0)}
    if result is not None:  # convert_files result
        fig["errors"] = len(result.errors)
        fig["outcomes"] = dict(result.outcomes)
        fig["resources"] = {k: len(v) for k, v in result.resources.items()}
    return fig


def bytes_read(fn, small, large) -> dict:
    """rchar per file on the same archive without and with PIXEL_BYTES of pixel data."""
    fn(small[:2])
    per_file = {}
    for name, paths in (("pixels_0", small), ("pixels_4mib", large)):
        before = rchar()
        fn(paths)
        per_file[name] = (rchar() - before) / len(paths)
    added = PIXEL_BYTES - 2  # the pixel_bytes=0 archive still carries a 1x1 16-bit image
    per_file["pct_of_added"] = 100 * (per_file["pixels_4mib"] - per_file["pixels_0"]) / added
    return per_file


def targets(fig) -> list[tuple[str, float | None, str, bool | None]]:
    """(name, measured, target text, pass) - None where a figure is missing."""
    def get(case, key):  # figures of a failed run do not count
        f = fig.get(case) or {}
        return None if "error" in f else f.get(key)

    a, b, c, d = (get(k, "rate") for k in "abcd")
    ratio = lambda x, y: x / y if x and y else None  # noqa: E731
    rows = [
        ("(b) inst/s", b, ">= 4000", lambda v: v >= 4000),
        ("(b) / (a)", ratio(b, a), ">= 2.0", lambda v: v >= 2.0),
        ("(d) / (a)", ratio(d, a), ">= 1.5", lambda v: v >= 1.5),
        ("(c) / (d) wall time (per instance)", ratio(d, c), ">= 1.5", lambda v: v >= 1.5),
        ("(b) pixel bytes read, % of added", get("b_bytes_read", "pct_of_added"), "< 5 %", lambda v: v < 5),
        ("(f) CLI on one core / (a)", ratio(get("f", "rate"), a), ">= 2.5", lambda v: v >= 2.5),
        ("(c) peak RSS MiB", get("c", "peak_rss_mib"), "<= 2048", lambda v: v <= 2048),
        ("(d) peak RSS MiB", get("d", "peak_rss_mib"), "<= 2048", lambda v: v <= 2048),
        ("(big) peak RSS MiB", get("big", "peak_rss_mib"), "<= 2048", lambda v: v <= 2048),
    ]
    return [(n, v, t, None if v is None else ok(v)) for n, v, t, ok in rows]


def report(fig, n_files) -> None:
    a = fig.get("a", {}).get("rate")
    print(f"\n{'case':<44}{'instances':>10}{'seconds':>10}{'inst/s':>10}{'x (a)':>8}{'peak RSS MiB':>14}")
    names = {"a": "(a) pydicom dcmread, 1 core", "b": "(b) convert_files, 1 core",
             "b_novalidate": "    (b) with validate=False, for information",
             "f": "(f) CLI end to end, 1 core, start-up incl.",
             "c": "(c) pipeline in_memory, 1 worker", "d": "(d) pipeline multi_processing, 2 workers",
             "big": f"(big) (d) on one study of {fig.get('big_files', '?')} instances"}
    for key, name in names.items():
        f = fig.get(key)
        if f is None:
            continue
        if "rate" not in f:
            print(f"{name:<44}  FAILED: {f.get('error')}")
            continue
        x = f"{f['rate'] / a:.2f}" if a else "-"
        rss = f"{f['peak_rss_mib']:.0f}" if "peak_rss_mib" in f else "-"
        print(f"{name:<44}{f['instances']:>10}{f['seconds']:>10.2f}{f['rate']:>10.0f}{x:>8}{rss:>14}")
        if f.get("self_reported_seconds"):
            print(f"{'':<4}(pipeline's own clock {f['self_reported_seconds']} s; CPU {f['cpu_seconds']:.1f} s "
                  f"= {f['cpu_seconds'] / f['seconds']:.2f} cores busy on average)")
        if f.get("foreign_cores", 0) > 0.1:
            print(f"{'':<4}! other processes kept {f['foreign_cores']:.2f} cores busy meanwhile: noisy figure")
        if key != "big" and (f["instances"] != n_files or f.get("errors")):
            print(f"{'':<4}note: {f['instances']} of {n_files} files counted, {f.get('errors', '?')} errors, "
                  f"outcomes {f.get('outcomes')}")
    for key in ("a_bytes_read", "b_bytes_read"):
        br = fig.get(key)
        if br and "pct_of_added" in br:
            print(f"{key[0]} bytes read per file: {br['pixels_0']:.0f} without pixels, {br['pixels_4mib']:.0f} "
                  f"with 4 MiB pixels -> {br['pct_of_added']:.2f} % of the added pixel bytes")
    c, d = fig.get("c") or {}, fig.get("d") or {}
    fc, fd = (fig.get("floor_c") or {}).get("seconds"), (fig.get("floor_d") or {}).get("seconds")
    if fc is not None and fd is not None and c.get("self_reported_seconds") and d.get("self_reported_seconds"):
        net_c, net_d = c["self_reported_seconds"] - fc, d["self_reported_seconds"] - fd
        print(f"runner start-up (trivial 10-element pipeline): in_memory {fc:.2f} s, multi_processing {fd:.2f} s; "
              f"(c)/(d) without it: {net_c:.2f} s / {net_d:.2f} s = {net_c / net_d:.2f} (information)")
    print(f"\n{'target':<44}{'measured':>12}  {'target':<10}result")
    for name, value, goal, ok in fig["targets"]:
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"{name:<44}{shown:>12}  {goal:<10}{'-' if ok is None else ('PASS' if ok else 'FAIL')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--series", type=int, default=4)
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--big-study", type=int, default=0, metavar="N", help="also run (d) on one study of N instances")
    p.add_argument("--pixel-files", type=int, default=200, help="files in each bytes-read archive")
    p.add_argument("--repeat", type=int, default=1, help="runs of (a)/(b); the best is kept")
    p.add_argument("--workdir", help="where archives and outputs go (default: a temp dir, removed)")
    p.add_argument("--skip-pipeline", action="store_true", help="only (a), (b) and bytes read")
    p.add_argument("--gcs-files", type=int, default=0, metavar="N",
                   help="(e): read N of the archive's files from gs:// through the emulator (e.g. 2000)")
    p.add_argument("--gcs-delay-ms", type=float, default=20.0, help="(e): latency added per request")
    p.add_argument("--read-concurrency", type=int, default=DEFAULT_READ_CONCURRENCY, help="(e): header reads in flight (default: the CLI's)")
    p.add_argument("--json", help="write all figures here")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="beam-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fig = {"args": vars(args), "cpus": os.cpu_count(), "python": platform.python_version(),
           "pydicom": pydicom.__version__}
    try:
        def archive(name, **kw):
            shutil.rmtree(work / name, ignore_errors=True)
            m = make_archive(work / name, **kw)
            print(f"-- generated {name}: {m['files']} files, {m['bytes'] / MIB:.0f} MiB, "
                  f"{m['seconds']:.1f} s", file=sys.stderr)
            paths = list_dicoms(work / name)
            warm(paths)
            return m, paths

        m, paths = archive("archive", studies=args.studies, series=args.series, instances=args.instances)
        fig["archive"] = {k: v for k, v in m.items() if k != "study_uids"}
        fig["a"] = guarded("(a) pydicom", case_in_process, parse_pydicom, paths, args.repeat)
        fig["b"] = guarded("(b) convert_files", case_in_process, convert, paths, args.repeat)
        if not args.skip_pipeline:
            from benchmarks.cli_case import cli_one_core

            fig["f"] = guarded("(f) CLI on one core", cli_one_core, work / "archive", work / "out_f",
                               min(os.sched_getaffinity(0)), work / "f.log")
        fig["b_novalidate"] = guarded("(b) without validation", case_in_process, convert_unvalidated, paths, 1)

        per_study = max(1, args.pixel_files // 2)
        _, small = archive("pixels_0", studies=2, series=1, instances=per_study)
        _, large = archive("pixels_4mib", studies=2, series=1, instances=per_study, pixel_bytes=PIXEL_BYTES)
        fig["a_bytes_read"] = guarded("(a) bytes read", bytes_read, parse_pydicom, small, large)
        fig["b_bytes_read"] = guarded("(b) bytes read", bytes_read, convert, small, large)
        shutil.rmtree(work / "pixels_4mib", ignore_errors=True)  # 800 MiB we no longer need

        if not args.skip_pipeline:
            fig["c"] = guarded("(c) pipeline in_memory", run_pipeline, work / "archive", work / "out_c",
                               "in_memory", 1, work / "c.log")
            fig["d"] = guarded("(d) pipeline multi_processing", run_pipeline, work / "archive", work / "out_d",
                               "multi_processing", 2, work / "d.log")
            fig["floor_c"] = guarded("trivial pipeline in_memory", runner_floor, "in_memory", 1)
            fig["floor_d"] = guarded("trivial pipeline multi_processing", runner_floor, "multi_processing", 2)
            if args.big_study:
                bm, _ = archive("big", studies=1, series=1, instances=args.big_study)
                fig["big_files"] = bm["files"]
                fig["big"] = guarded("(big) pipeline multi_processing", run_pipeline, work / "big",
                                     work / "out_big", "multi_processing", 2, work / "big.log")
        if args.gcs_files:
            from benchmarks import gcs_case

            fig["e"] = guarded("(e) gs:// at cloud latency", gcs_case.run_case, paths[:args.gcs_files],
                               str(work / "archive"), args.gcs_delay_ms, args.read_concurrency)
        fig["targets"] = targets(fig)
        if fig.get("e") and "error" not in fig["e"]:
            from benchmarks import gcs_case

            gcs_case.report(fig["e"])
            fig["targets"] += gcs_case.targets(fig["e"])
        report(fig, m["files"])
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=1, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
