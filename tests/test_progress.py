"""Progress lines on long runs: counts only, increasing, plain lines when stderr is not a terminal."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from make_archive import make_archive

LINE = re.compile(r"progress \((\d+) (s|min)[^)]*\): ([\d,]+) of ([\d,]+)\+? files read, ([\d,]+) instances, "
                  r"([\d,]+) studies written, [\d,]+ files/s(, about .+ left)?")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress-archive")
    manifest = make_archive(root, studies=12, series=2, instances=60)
    return root, manifest


def run(archive_root, out, *options):
    return subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(archive_root), "--output", str(out),
                           *options], capture_output=True, text=True, timeout=600, check=True)


def numbers(match) -> tuple[int, ...]:
    return tuple(int(match[i].replace(",", "")) for i in (3, 4, 5, 6))


def test_progress_lines_carry_increasing_counts_and_no_identifiers(archive, tmp_path):
    root, manifest = archive
    done = run(root, tmp_path / "out", "--progress-interval", "0.1")
    lines = [line for line in done.stderr.splitlines() if line.startswith("progress")]
    assert len(lines) >= 3, done.stderr
    assert "\r" not in done.stderr  # not a terminal: plain lines, no redrawn bar
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    counts = [numbers(m) for m in parsed]
    for before, after in zip(counts, counts[1:]):
        assert all(b <= a for b, a in zip(before, after)), (before, after)
    assert counts[-1][0] > counts[0][0] or counts[0][0] == counts[0][1] == 1440
    assert max(c[1] for c in counts) == 12 * 2 * 60
    assert str(root) not in done.stderr and str(tmp_path) not in done.stderr
    assert "PAT0" not in done.stderr and "Synthetic^" not in done.stderr  # make_archive's patient ids/names
    assert "apitools" not in done.stderr  # the known-harmless Beam warning is silenced
    assert not list((tmp_path / "out").glob(".progress-*"))  # removed at the end


def test_quiet_prints_no_progress(archive, tmp_path):
    done = run(archive[0], tmp_path / "out", "--progress-interval", "0.1", "--quiet")
    assert "progress" not in done.stderr


@pytest.mark.slow
def test_progress_on_the_portable_path(archive, tmp_path):
    """Workers in other processes (job service + worker pool) report through the same beacons."""
    from runners import job_service_and_worker_pool

    with job_service_and_worker_pool(str(tmp_path)) as options:
        done = run(archive[0], tmp_path / "out", "--progress-interval", "0.1", *options)
    parsed = [LINE.fullmatch(line) for line in done.stderr.splitlines() if line.startswith("progress")]
    assert parsed and all(parsed)
    assert max(numbers(m)[0] for m in parsed) > 0  # files read, as counted by the pool's workers


@pytest.mark.slow
def test_progress_on_a_dask_cluster(archive, tmp_path):
    """Dask's workers are processes of their own (a local cluster here): the same beacons."""
    done = run(archive[0], tmp_path / "out", "--progress-interval", "0.1", "--runner", "dask", "--dask_workers", "2")
    lines = [line for line in done.stderr.splitlines() if line.startswith("progress")]
    parsed = [LINE.fullmatch(line) for line in lines]
    assert parsed and all(parsed), lines
    assert max(numbers(m)[0] for m in parsed) > 0  # files read, as counted by the Dask workers
    assert [line for line in done.stderr.splitlines() if not line.startswith("progress")] == []  # no worker noise
    assert not list((tmp_path / "out").glob(".progress-*"))


def test_a_nightly_runs_line_counts_what_it_reads_not_what_it_reuses():
    from collections import Counter

    from beam_pipeline.run.progress import describe

    files = describe(Counter(files_listed=16_160, listing_parts=1, parts_listed=1, unchanged=16_000,
                             files_read=80, instances_read=80), 10.0, None)
    assert files.startswith("progress (10 s): 80 of 160 files read, 16,000 unchanged, 80 instances")
    assert "about 10 s left" in files  # 80 more at 8 files/s, not 16,080 more
    studies = describe(Counter(studies_listed=40, listing_done=1, unchanged=30, studies_fetched=5), 5.0, None)
    assert studies.startswith("progress (5 s): 5 of 10 studies fetched, 30 unchanged")
    assert "about 5 s left" in studies
