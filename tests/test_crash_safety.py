"""A run killed (SIGKILL) at any moment leaves either a complete output with its summary.json or no
summary.json, never a summary beside partial files; the next run into the same folder, and the
next ``--since`` from the last complete output, work.

The kill points are deterministic: the CLI runs in a wrapper (below, test-only) that kills its own
process at the n-th file opened for writing, renamed or removed under the output folder; a first
run counts them, and the points are the first, the last and seeded picks between.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import small_disk
from make_archive import make_archive

WRAPPER = r'''
import atexit, builtins, io, json, os, signal, sys
out = os.path.realpath(os.environ["CRASH_OUT"])
kind, _, nth = os.environ["CRASH_AT"].partition(":")
nth = int(nth or 0)
calls = {"write": 0, "rename": 0, "remove": 0}

def under_out(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(out + os.sep)
    except TypeError:
        return False

def hit(what):
    calls[what] += 1
    if what == kind and calls[what] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

real_open, real_rename, real_remove = io.open, os.rename, os.remove

def open_(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    if any(flag in mode for flag in "wax") and under_out(file):
        hit("write")  # the file exists, empty: as partial as it gets
    return handle

def rename(source, target, *args, **kwargs):
    if under_out(target):
        hit("rename")
    return real_rename(source, target, *args, **kwargs)

def remove(path, *args, **kwargs):
    if under_out(path):
        hit("remove")
    return real_remove(path, *args, **kwargs)

io.open = builtins.open = open_
os.rename, os.remove = rename, remove
if kind == "count":
    atexit.register(lambda: real_open(os.environ["CRASH_COUNTS"], "w").write(json.dumps(calls)))
from beam_pipeline.run.cli import main
sys.exit(main(sys.argv[1:]))
'''


def cli(*args, env=None, wrapper=False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WRAPPER] if wrapper else [sys.executable, "-m", "beam_pipeline"]
    return subprocess.run([*command, "--quiet", *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def tree(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder but the hidden temp/progress ones, what varies between runs
    (timings, the request line, the transaction time) left out."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_dir() or relative.startswith("."):
            continue
        data = path.read_bytes()
        if relative in ("_report/summary.json", "manifest.json", "_delta/manifest.json"):
            document = json.loads(data)
            for varying in ("seconds", "instances_per_second", "transactionTime", "request"):
                document.pop(varying, None)
            data = json.dumps(document, sort_keys=True).encode()
        files[relative] = data
    return files


def snapshot(folder: Path) -> dict[str, bytes]:
    """What a loader takes and the report, without the state and the delta."""
    return {name: data for name, data in tree(folder).items()
            if not name.startswith(("_state/", "_delta/", "_report/summary.json", "manifest.json"))}


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """An archive (4 studies, one file not DICOM), a complete output of it, and how many files a run
    into a folder holding that output writes, renames and removes there."""
    root = tmp_path_factory.mktemp("crash")
    make_archive(root / "archive", studies=4, series=2, instances=3)
    (root / "archive" / "notes.txt").write_text("not DICOM\n")
    done = cli("--input", root / "archive", "--output", root / "complete")
    assert done.returncode == 0, done.stderr
    counting = root / "counting"
    shutil.copytree(root / "complete", counting)
    done = cli("--input", root / "archive", "--output", counting, wrapper=True,
               env={"CRASH_OUT": str(counting), "CRASH_AT": "count", "CRASH_COUNTS": str(root / "counts.json")})
    assert done.returncode == 0, done.stderr
    assert tree(counting) == tree(root / "complete")
    counts = json.loads((root / "counts.json").read_text())
    assert counts["write"] > 3 and counts["rename"] > 3 and counts["remove"] > 3, counts
    return {"root": root, "archive": root / "archive", "output": root / "complete", "counts": counts}


def kill_points() -> list[tuple[str, str]]:
    """(kind, which): the first, the last, and two seeded picks between, of each kind."""
    return [(kind, which) for kind in ("remove", "write", "rename") for which in ("first", "pick-1", "pick-2", "last")]


def nth(counts: dict, kind: str, which: str) -> int:
    total = counts[kind]
    if which == "first":
        return 1
    if which == "last":
        return total
    return random.Random(f"{kind}-{which}").randint(2, max(2, total - 1))


@pytest.mark.parametrize("kind, which", kill_points())
def test_a_run_killed_at_any_moment_leaves_a_complete_output_or_no_summary(complete, tmp_path, kind, which):
    out = tmp_path / "out"
    shutil.copytree(complete["output"], out)  # a previous complete run in the same folder
    point = nth(complete["counts"], kind, which)
    killed = cli("--input", complete["archive"], "--output", out, wrapper=True,
                 env={"CRASH_OUT": str(out), "CRASH_AT": f"{kind}:{point}"})
    assert killed.returncode == -signal.SIGKILL, (kind, point, killed.stderr[-2000:])

    if (out / "_report" / "summary.json").exists():
        assert tree(out) == tree(complete["output"]), f"a summary.json beside other files ({kind} {point})"
    else:  # incomplete: a --since from it is refused in one line, naming why
        refused = cli("--input", complete["archive"], "--output", tmp_path / "next", "--since", out)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "summary.json is missing" in refused.stderr or "state.json is missing" in refused.stderr

    # The next run into the same folder works: a full run, or a --since from the last complete output.
    since = ["--since", complete["output"]] if which.startswith("pick") else []
    again = cli("--input", complete["archive"], "--output", out, *since)
    assert again.returncode == 0, again.stderr
    if since:
        assert snapshot(out) == snapshot(complete["output"])
        assert json.loads((out / "_report" / "summary.json").read_text())["incremental"]["studies_reused"] == 4
    else:
        assert tree(out) == tree(complete["output"])
    assert not [name for name in os.listdir(out) if name.startswith(".")], "temp folders left behind"


def test_a_disk_that_fills_up_over_a_complete_output_leaves_no_summary(tmp_path):
    """A complete output on a small disk; the next run into it fills the disk: exit 3, one line
    naming the output folder, no summary.json (the old one went first), no temp folder left."""
    make_archive(tmp_path / "small", studies=1, series=1, instances=2)
    make_archive(tmp_path / "big", studies=6, series=2, instances=50)
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        assert cli("--input", tmp_path / "small", "--output", out).returncode == 0
        assert (out / "_report" / "summary.json").exists()
        full = cli("--input", tmp_path / "big", "--output", out)
        assert full.returncode == 3, full.stderr[-2000:]
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: the run failed: no space left on the device of --output {out} ")
        assert not (out / "_report" / "summary.json").exists()
        assert not [name for name in os.listdir(out) if name.startswith(".")]
