"""CI guard: the CLI against the pydicom header floor on both study mixes, and its memory, in one run.

Two generated archives of the same number of instances: a few large studies, and many studies of
four instances (radiograph archives). On one CPU, alternated, each round measures the bare pydicom
header parse of the archive (in this process) and the CLI end to end on it (a subprocess, the
in-process runner, its CPU time and peak RSS from ``wait4``), plus the CLI on a one-file archive:
its start-up (interpreter, imports, pipeline construction), which a small archive cannot amortize.
Times are CPU seconds (user + system) on the one CPU: what other processes of a shared machine
take does not count; on an idle machine they are the wall times (printed too). So

    ratio = pydicom seconds / (CLI seconds - CLI start-up seconds)     (each the best of the rounds)

is the throughput ratio a large archive approaches (at 16,000 instances the start-up is about a
third of the run). The CLI runs byte-compiled, as an installed package does (``cli_env``). The
memory check is the peak RSS of any run against ``--rss-budget-mib``, and its growth per instance
over the start-up run's against ``--growth-budget-kib``.

Exit status 1 when a ratio is below ``--min-ratio`` or memory is over budget; the figures are
printed either way. ``python -m benchmarks.ci_guard`` (about three minutes on a quiet machine).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run_benchmark import list_dicoms, one_core, parse_pydicom, warm
from tests.make_archive import make_archive

MIXES = {  # name -> (studies, series, instances per series) for `instances` files in all
    "large studies": lambda n: (2, 2, max(1, n // 4)),
    "studies of 4": lambda n: (max(1, n // 4), 1, 4),
}


def cli_env(work: Path) -> dict:
    """The CLI's environment: modules byte-compiled once and reused, as an installed package's are
    (pip compiles them), into ``work`` (not the checkout), even where PYTHONDONTWRITEBYTECODE is set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def cli_run(archive: Path, out: Path, cpu: int) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, peak RSS MiB) of ``python -m beam_pipeline`` on one CPU, start-up
    included."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(out.parent),
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode or not (out / "_report" / "summary.json").exists():
        raise RuntimeError(f"{' '.join(cmd)}: rc={proc.returncode}: {stderr.decode(errors='replace')[-800:]}")
    return usage.ru_utime + usage.ru_stime, seconds, usage.ru_maxrss / 1024  # KiB on Linux


def floor_run(paths) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the bare pydicom header parse on one CPU."""
    with one_core():
        t0, c0 = time.perf_counter(), time.process_time()
        parse_pydicom(paths)
        return time.process_time() - c0, time.perf_counter() - t0


def measure(work: Path, instances: int, rounds: int) -> dict:
    cpu = min(os.sched_getaffinity(0))
    archives = {"start-up": work / "one"}
    make_archive(archives["start-up"], studies=1, series=1, instances=1)
    for name, shape in MIXES.items():
        studies, series, per_series = shape(instances)
        archives[name] = work / name.replace(" ", "-")
        make_archive(archives[name], studies=studies, series=series, instances=per_series)
    paths = {name: list_dicoms(folder) for name, folder in archives.items()}
    for name in MIXES:
        warm(paths[name])
    figures = {name: {"floor": [], "floor_wall": [], "cli": [], "cli_wall": [], "rss": []} for name in archives}
    cli_run(archives["start-up"], work / "out", cpu)  # page cache and byte-compiled modules warm for every round
    for _ in range(rounds):
        for name in archives:
            if name in MIXES:
                floor, floor_wall = floor_run(paths[name])
                figures[name]["floor"].append(floor)
                figures[name]["floor_wall"].append(floor_wall)
            seconds, wall, rss = cli_run(archives[name], work / "out", cpu)
            figures[name]["cli"].append(seconds)
            figures[name]["cli_wall"].append(wall)
            figures[name]["rss"].append(rss)
    startup = min(figures["start-up"]["cli"])  # the best of each: what noise on a shared machine adds is gone
    for name in MIXES:
        fig = figures[name]
        fig["files"] = len(paths[name])
        fig["ratio"] = min(fig["floor"]) / max(min(fig["cli"]) - startup, 1e-3)
        fig["ratio_end_to_end"] = min(fig["floor"]) / min(fig["cli"])
        fig["ratio_wall"] = min(fig["floor_wall"]) / min(fig["cli_wall"])
        fig["growth_kib"] = (max(fig["rss"]) - min(figures["start-up"]["rss"])) * 1024 / fig["files"]
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=8000,
                   help="files in each mix's archive (at 4,000 the start-up's noise moved the studies-of-4 ratio by 0.2)")
    p.add_argument("--rounds", type=int, default=5,
                   help="alternated rounds; the best CPU time of each counts (more rounds, steadier bests)")
    p.add_argument("--min-ratio", type=float, default=2.0, help="fail below this ratio on either mix")
    p.add_argument("--min-ratio-small-studies", type=float,
                   help="the floor for the studies-of-4 mix alone (default: --min-ratio)")
    p.add_argument("--rss-budget-mib", type=float, default=250.0, help="fail when any run's peak RSS exceeds it")
    p.add_argument("--growth-budget-kib", type=float, default=12.0,
                   help="fail when peak RSS grows by more than this per instance over the start-up run")
    p.add_argument("--workdir", help="where archives and outputs go (default: a temp dir, removed)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ci-guard-"))
    try:
        figures = measure(work, args.instances, args.rounds)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    start = figures["start-up"]
    print(f"benchmark guard: one CPU, {args.rounds} alternated rounds, best CPU times; CLI start-up "
          f"{min(start['cli']):.2f} s, {max(start['rss']):.0f} MiB")
    failures = []
    for name in MIXES:
        fig = figures[name]
        print(f"  {name:<14} {fig['files']:>6} files: pydicom {min(fig['floor']):6.2f} s, "
              f"CLI {min(fig['cli']):6.2f} s -> ratio {fig['ratio']:.2f} without start-up "
              f"({fig['ratio_end_to_end']:.2f} end to end, {fig['ratio_wall']:.2f} in wall time); "
              f"peak RSS {max(fig['rss']):.0f} MiB, {fig['growth_kib']:.1f} KiB per instance")
        floor = args.min_ratio
        if name == "studies of 4" and args.min_ratio_small_studies is not None:
            floor = args.min_ratio_small_studies
        if fig["ratio"] < floor:
            failures.append(f"{name}: ratio {fig['ratio']:.2f} < {floor}")
        if max(fig["rss"]) > args.rss_budget_mib:
            failures.append(f"{name}: peak RSS {max(fig['rss']):.0f} MiB > {args.rss_budget_mib:.0f} MiB")
        if fig["growth_kib"] > args.growth_budget_kib:
            failures.append(f"{name}: {fig['growth_kib']:.1f} KiB per instance > {args.growth_budget_kib} KiB")
    for failure in failures:
        print(f"FAIL {failure}")
    print("benchmark guard: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
