"""Nightly run against a full run: wall time and files read, on the same archive in the same run.

1. A generated archive (``--instances``, default 16,000: 40 studies x 4 series x 100 instances) is
   converted in full (night 1).
2. The night adds ``--new-percent`` (default 1%) instances: half as a new study, half added to an
   existing series (new files, new SOPInstanceUIDs).
3. Night 2 runs ``--since`` night 1; a full run of the changed archive is the baseline. Both are
   timed as a user runs them (the CLI in a subprocess, in-process runner), and their snapshots must
   be identical, file by file.
4. Listing alone (``files.list_files``), timed in this process: what an incremental run cannot skip.

With ``--gcs`` the archive is read from gs:// instead: a GCS emulator on loopback behind the
latency proxy (``--delay-ms`` per request, default 20, as a cloud store; requests counted), the
night's new files uploaded as the night adds them; the output stays on local disk.

Figures: files read by each run (from summary.json, as data), requests (with --gcs), wall time,
and the ratios.

    python -m benchmarks.nightly_benchmark --instances 16000
    python -m benchmarks.nightly_benchmark --instances 16000 --gcs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


CPU_SECONDS: dict[Path, float] = {}  # output folder -> CPU seconds (user + system) of its run


def run_cli(archive, out: Path, *options: str, env: dict | None = None) -> tuple[float, dict]:
    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out),
                           "--quiet", *options], capture_output=True, text=True, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[out] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
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


class LocalArchive:
    """The archive as the runs see it: the local folder itself."""

    def __init__(self, root: Path):
        self.root, self.uri, self.env = root, str(root), None

    def sync(self) -> None:
        pass

    def requests(self, reset: bool = False) -> int | None:
        return None


class GcsArchive:
    """The archive uploaded to an emulator behind the latency proxy; ``sync`` uploads new files."""

    BUCKET = "bench"

    def __init__(self, root: Path, stack: contextlib.ExitStack, delay_ms: float):
        from gcs_emulator import anonymous_client, offline_environment, patched_environ

        from benchmarks.gcs_case import _emulator, _start

        self.root = root
        emulator = stack.enter_context(_emulator())
        stack.enter_context(patched_environ(offline_environment(emulator.url)))
        emulator.create_bucket(self.BUCKET)
        self.bucket = anonymous_client().bucket(self.BUCKET)
        self.uploaded: set[Path] = set()
        proxy, self.proxy_url = _start([sys.executable, "-m", "benchmarks.latency_proxy", "--upstream", emulator.url,
                                        "--delay-ms", str(delay_ms), "--upstream-slots", str(emulator.upstream_slots)])
        stack.callback(lambda: (proxy.terminate(), proxy.wait()))
        self.uri = f"gs://{self.BUCKET}/archive/"
        self.env = {**offline_environment(emulator.url), "STORAGE_EMULATOR_HOST": self.proxy_url}
        self.emulator_name = emulator.name

    def sync(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        new = sorted(p for p in self.root.rglob("*") if p.is_file() and p not in self.uploaded)
        with ThreadPoolExecutor(4) as uploads:  # straight to the emulator, not through the proxy
            list(uploads.map(lambda p: self.bucket.blob("archive/" + p.relative_to(self.root).as_posix())
                             .upload_from_filename(str(p)), new))
        self.uploaded.update(new)

    def requests(self, reset: bool = False) -> int | None:
        from benchmarks.gcs_case import _proxy_counts

        return _proxy_counts(self.proxy_url, reset=reset)["requests"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=16_000)
    parser.add_argument("--new-percent", type=float, default=1.0)
    parser.add_argument("--gcs", action="store_true", help="read the archive from gs:// (emulator + latency proxy)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="with --gcs: latency added to every request")
    args = parser.parse_args(argv)
    from make_archive import make_archive

    from beam_pipeline.sources import files

    series_instances = 100
    studies = max(1, args.instances // (4 * series_instances))
    new = max(2, round(args.instances * args.new_percent / 100))
    requests = {}
    with tempfile.TemporaryDirectory(prefix="nightly-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        root = work / "archive"
        made = make_archive(root / "main", studies=studies, series=4, instances=series_instances)
        archive = GcsArchive(root, stack, args.delay_ms) if args.gcs else LocalArchive(root)
        archive.sync()

        def timed(name: str, out: Path, *options: str) -> tuple[float, dict]:
            archive.requests(reset=True)
            result = run_cli(archive.uri, out, *options, env=archive.env)
            requests[name] = archive.requests()
            return result

        night1_seconds, night1 = timed("night1", work / "night1")
        add_instances(root, new)
        archive.sync()
        night2_seconds, night2 = timed("night2", work / "night2", "--since", str(work / "night1"))
        full_seconds, full = timed("full", work / "full")
        started = time.monotonic()
        if args.gcs:
            from gcs_emulator import patched_environ

            with patched_environ({"STORAGE_EMULATOR_HOST": archive.proxy_url}):
                listed = sum(1 for _ in files.list_files(files.resolve_pattern(archive.uri)))
        else:
            listed = sum(1 for _ in files.list_files(files.resolve_pattern(archive.uri)))
        listing_seconds = time.monotonic() - started
        same = snapshot(work / "night2") == snapshot(work / "full")
        delta_lines = sum(len(p.read_text().splitlines()) for p in (work / "night2" / "_delta").glob("*.ndjson"))
        state_bytes = {kind: sum(p.stat().st_size for p in (work / "night2" / "_state").glob(f"{kind}-*.jsonl"))
                       for kind in ("sources", "studies")}
        output_bytes = sum(p.stat().st_size for p in (work / "night2").glob("*.ndjson"))

    done = night2["incremental"]
    read_full = full["files_matched"]
    read_night = done.get("files_read", 0)
    where = (f"gs:// ({archive.emulator_name} behind a +{args.delay_ms:.0f} ms proxy)" if args.gcs
             else "local disk")
    print(f"archive on {where}: {made['files']} instances in {studies} studies; the night adds {new} "
          f"({new // 2} in a new study, {new - new // 2} in an existing series)")
    extra = f"{'requests':>10}" if args.gcs else ""
    print(f"{'run':<34}{'files read':>12}{'wall s':>10}{'x full':>9}{extra}")

    def row(label, files_read, seconds, ratio, name):
        counted = f"{requests[name]:>10}" if args.gcs else ""
        print(f"{label:<34}{files_read:>12}{seconds:>10.2f}{ratio:>9}{counted}")

    row("night 1 (full)", night1["files_matched"], night1_seconds, "", "night1")
    row("night 2, full run (baseline)", read_full, full_seconds, "1.00", "full")
    row("night 2, --since night 1", read_night, night2_seconds, f"{night2_seconds / full_seconds:.2f}", "night2")
    cpu_full, cpu_night = CPU_SECONDS[work / "full"], CPU_SECONDS[work / "night2"]
    print(f"CPU seconds (user + system, robust on a shared machine): full {cpu_full:.2f}, --since "
          f"{cpu_night:.2f} = {cpu_night / cpu_full:.2f}x")
    print(f"files read: {read_night} of {read_full} = {100 * read_night / read_full:.2f}% (target <= 2%); "
          f"reused {done.get('files_reused', 0)}, studies rebuilt {done.get('studies_rebuilt', 0)}, "
          f"reused {done.get('studies_reused', 0)}; delta lines {delta_lines}")
    print(f"listing alone: {listed} files in {listing_seconds:.2f} s "
          f"({100 * listing_seconds / night2_seconds:.0f}% of the nightly run's wall time)")
    print(f"state: sources {state_bytes['sources'] / 1e6:.1f} MB, studies {state_bytes['studies'] / 1e6:.2f} MB "
          f"(resource files {output_bytes / 1e6:.1f} MB)")
    print(f"snapshot identical to the full run's: {same}")
    ok = same and read_night <= 0.02 * read_full
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
