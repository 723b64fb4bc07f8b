"""Nightly run against a full run: wall time and files read, on the same archive in the same run.

1. A generated archive (``--instances``, default 16,000: 40 studies x 4 series x 100 instances) is
   converted in full (night 1).
2. The night adds ``--new-percent`` (default 1%) instances: half as a new study, half added to an
   existing series (new files, new SOPInstanceUIDs).
3. Night 2 runs ``--since`` night 1; a full run of the changed archive is the baseline. Both are
   timed as a user runs them (the CLI in a subprocess, in-process runner), and their snapshots must
   be identical, file by file.
4. Listing alone (``files.list_files``), timed in this process: what an incremental run cannot skip.

Figures: files read by each run (from summary.json, as data), wall time, and the ratios.

    python -m benchmarks.nightly_benchmark --instances 16000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def run_cli(archive: Path, out: Path, *options: str) -> tuple[float, dict]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out),
                           "--quiet", *options], capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"the run into {out} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, json.loads((out / "_report" / "summary.json").read_text())


def add_instances(archive: Path, count: int) -> None:
    """``count`` new instances: half in a new study, half appended to the first series."""
    import pydicom
    from make_archive import make_archive

    in_new_study = count // 2
    make_archive(archive / "new-study", studies=1, series=1, instances=in_new_study, seed=99)
    first = sorted((archive / "main").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    for number in range(count - in_new_study):
        ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.9{number}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 1000 + number
        ds.save_as(first.parent / f"late-{number:05d}.dcm", enforce_file_format=False)


def snapshot(out: Path) -> dict[str, bytes]:
    skip = {"_report/summary.json", "manifest.json"}
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).as_posix() not in skip and not p.relative_to(out).as_posix().startswith("_delta/")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=16_000)
    parser.add_argument("--new-percent", type=float, default=1.0)
    args = parser.parse_args(argv)
    from make_archive import make_archive

    from beam_pipeline.sources import files

    series_instances = 100
    studies = max(1, args.instances // (4 * series_instances))
    new = max(2, round(args.instances * args.new_percent / 100))
    with tempfile.TemporaryDirectory(prefix="nightly-bench-") as tmp:
        work = Path(tmp)
        archive = work / "archive"
        made = make_archive(archive / "main", studies=studies, series=4, instances=series_instances)
        night1_seconds, night1 = run_cli(archive, work / "night1")
        add_instances(archive, new)
        night2_seconds, night2 = run_cli(archive, work / "night2", "--since", str(work / "night1"))
        full_seconds, full = run_cli(archive, work / "full")
        started = time.monotonic()
        listed = sum(1 for _ in files.list_files(files.resolve_pattern(str(archive))))
        listing_seconds = time.monotonic() - started
        same = snapshot(work / "night2") == snapshot(work / "full")
        delta_lines = sum(len(p.read_text().splitlines()) for p in (work / "night2" / "_delta").glob("*.ndjson"))

    done = night2["incremental"]
    read_full = full["files_matched"]
    read_night = done.get("files_read", 0)
    print(f"archive: {made['files']} instances in {studies} studies; the night adds {new} "
          f"({new // 2} in a new study, {new - new // 2} in an existing series)")
    print(f"{'run':<34}{'files read':>12}{'wall s':>10}{'x full':>9}")
    print(f"{'night 1 (full)':<34}{night1['files_matched']:>12}{night1_seconds:>10.2f}{'':>9}")
    print(f"{'night 2, full run (baseline)':<34}{read_full:>12}{full_seconds:>10.2f}{1:>9.2f}")
    print(f"{'night 2, --since night 1':<34}{read_night:>12}{night2_seconds:>10.2f}{night2_seconds / full_seconds:>9.2f}")
    print(f"files read: {read_night} of {read_full} = {100 * read_night / read_full:.2f}% (target <= 2%); "
          f"reused {done.get('files_reused', 0)}, studies rebuilt {done.get('studies_rebuilt', 0)}, "
          f"reused {done.get('studies_reused', 0)}; delta lines {delta_lines}")
    print(f"listing alone: {listed} files in {listing_seconds:.2f} s "
          f"({100 * listing_seconds / night2_seconds:.0f}% of the nightly run's wall time)")
    print(f"snapshot identical to the full run's: {same}")
    ok = same and read_night <= 0.02 * read_full
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
