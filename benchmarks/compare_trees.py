"""This checkout's CLI against a baseline checkout's, alternated, on given archives, with the floor.

For each archive and round: the bare pydicom header parse (the floor, in this process), then the
CLI of each checkout (``python -m beam_pipeline``, the in-process runner, a subprocess), all pinned
to one CPU; the order of the two checkouts alternates from round to round. Each CLI run gives its
CPU seconds (user + system, from ``wait4``: other processes on a shared machine do not count), its
wall seconds and its peak RSS; the CLI runs byte-compiled, as an installed package does
(``ci_guard.cli_env``). Printed per archive: the best of the rounds, the ratio floor / CLI (end to
end, start-up included), and the memory per instance between archives of one mix.

    python -m benchmarks.compare_trees --baseline ../base [--baseline ../prev] ARCHIVE [ARCHIVE ...]

Generate archives with ``python -m tests.make_archive OUT --studies 40 --series 4 --instances 100``
(16,000 instances in 40 large studies) or ``--studies 4000 --series 1 --instances 4`` (studies of 4).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ci_guard import cli_env, floor_run
from benchmarks.run_benchmark import list_dicoms, warm


def cli_run(tree: Path, archive: Path, out: Path, cpu: int) -> dict:
    """CPU and wall seconds and peak RSS (MiB) of one checkout's CLI on one CPU."""
    shutil.rmtree(out, ignore_errors=True)
    python = tree / ".venv" / "bin" / "python"
    cmd = [str(python), "-m", "beam_pipeline", "--input", str(archive), "--output", str(out), "--quiet"]
    env = cli_env(out.parent / tree.name)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) or not (out / "_report" / "summary.json").exists():
        raise RuntimeError(f"{tree}: {' '.join(cmd)}: {stderr.decode(errors='replace')[-800:]}")
    return {"cpu": usage.ru_utime + usage.ru_stime, "wall": wall, "rss": usage.ru_maxrss / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archives", nargs="+", type=Path)
    p.add_argument("--baseline", type=Path, action="append", required=True,
                   help="another checkout (with its .venv); may be given more than once")
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="this checkout")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, help="outputs and byte-compiled modules (default: a temp dir)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="compare-trees-"))
    cpu = min(os.sched_getaffinity(0))
    trees = {"this": args.tree.resolve(), **{f"{tree.name}": tree.resolve() for tree in args.baseline}}
    start_up = work / "one"
    shutil.rmtree(start_up, ignore_errors=True)
    start_up.mkdir(parents=True)
    first = list_dicoms(args.archives[0])[0]
    shutil.copy(first, start_up / Path(first).name)
    archives = [start_up] + list(args.archives)
    figures = {str(a): {"floor": [], **{name: [] for name in trees}} for a in archives}
    for tree in trees.values():  # byte-compile once, warm the page cache
        cli_run(tree, start_up, work / "out", cpu)
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))  # alternated
        for archive in archives:
            fig = figures[str(archive)]
            paths = list_dicoms(archive)
            fig["files"] = len(paths)
            if archive != start_up:
                warm(paths)
                fig["floor"].append(floor_run(paths))
            for name in order:
                fig[name].append(cli_run(trees[name], archive, work / "out", cpu))
                print(f"round {round_ + 1} {archive.name} {name}: {fig[name][-1]}", file=sys.stderr, flush=True)
    print(f"one CPU, {args.rounds} alternated rounds, best of each (ratios: floor / CLI, end to end); "
          + ", ".join(f"{name} = {tree}" for name, tree in trees.items()))
    for archive in archives:
        fig = figures[str(archive)]
        line = [f"{archive.name:>12} {fig['files']:>7} files:"]
        if fig["floor"]:
            floor_cpu = min(cpu_s for cpu_s, _ in fig["floor"])
            line.append(f"floor {floor_cpu:6.2f} s |")
        for name in trees:
            best_cpu = min(run["cpu"] for run in fig[name])
            best_wall = min(run["wall"] for run in fig[name])
            rss = max(run["rss"] for run in fig[name])
            ratio = ""
            if fig["floor"]:  # and the median of the rounds' ratios: each CLI run against its round's floor
                cpu_pairs = [floor[0] / run["cpu"] for floor, run in zip(fig["floor"], fig[name])]
                wall_pairs = [floor[1] / run["wall"] for floor, run in zip(fig["floor"], fig[name])]
                ratio = (f" ratio {floor_cpu / best_cpu:4.2f} (median of pairs: CPU {statistics.median(cpu_pairs):4.2f},"
                         f" wall {statistics.median(wall_pairs):4.2f})")
            line.append(f"{name} {best_cpu:6.2f} s CPU ({best_wall:6.2f} wall){ratio}, {rss:5.0f} MiB |")
        print(" ".join(line))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
