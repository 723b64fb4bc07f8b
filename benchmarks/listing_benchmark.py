"""Listing rate (objects/s): serial against fanned out, on local disk and on gs:// at cloud latency.

The listing is the pipeline's two steps (``files.list_top``, then ``files.list_part`` per part):

* serial: ``files.list_files``, the two steps one after the other (what one worker did before);
* fanned out: the parts listed by ``--workers`` threads at once (each standing for a worker that
  took one part from the Reshuffle), the same functions;
* Beam: the pipeline's ``ListInputFiles`` step alone on the in-process runner with
  ``--workers`` threads (its own overhead included).

gs:// goes to the Python GCS emulator through the loopback proxy (``latency_proxy``), which adds
``--delay-ms`` per request and pages listings as GCS does (``--page-size`` objects a page; the
emulator itself does not page). Every listing is checked to give the same objects as the serial
one. Nothing leaves 127.0.0.1.

    python -m benchmarks.listing_benchmark --local-files 20000 --gs-files 5000 --delay-ms 20
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench"


def make_tree(root: Path, files: int, folders: int, tops: int) -> None:
    """``files`` one-byte files spread over ``folders`` leaf folders under ``tops`` top-level folders."""
    per_folder = max(1, files // folders)
    for index in range(folders):
        folder = root / f"t{index % tops:03d}" / f"s{index:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_folder):
            (folder / f"f{number:03d}.txt").write_bytes(b"x")


def serial(pattern: str) -> list:
    from beam_pipeline.sources import files

    return list(files.list_files(pattern))


def fanned_out(pattern: str, workers: int) -> list:
    from beam_pipeline.sources import files

    top, parts = files.list_top(pattern)
    with ThreadPoolExecutor(workers) as pool:
        listed = pool.map(lambda part: list(files.list_part(pattern, part)), parts)
        return top + [item for part in listed for item in part]


def beam_step(pattern: str, workers: int, expected: int) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from beam_pipeline.run import transforms

    options = PipelineOptions(["--direct_running_mode", "multi_threading", "--direct_num_workers", str(workers)])
    with beam.Pipeline(runner=FnApiRunner(), options=options) as pipeline:
        _, counts, _ = pipeline | transforms.ListInputFiles(pattern)
        total = counts | beam.CombineGlobally(transforms.SumCounts()) | beam.Map(lambda c: c["files_matched"])
        assert_that(total, equal_to([expected]))


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def measure(name: str, pattern: str, workers: int, with_beam: bool) -> None:
    seconds_serial, reference = timed(serial, pattern)
    seconds_fanned, fanned = timed(fanned_out, pattern, workers)
    assert sorted(fanned) == sorted(reference), "the fanned-out listing differs from the serial one"
    count = len(reference)
    rows = [("serial (one worker)", seconds_serial), (f"fanned out ({workers} at once)", seconds_fanned)]
    if with_beam:
        seconds_beam, _ = timed(beam_step, pattern, workers, count)
        rows.append((f"Beam ListInputFiles ({workers} threads)", seconds_beam))
    print(f"\n{name}: {count:,} objects")
    for label, seconds in rows:
        print(f"  {label:38s} {seconds:7.2f} s  {count / seconds:10,.0f} objects/s  "
              f"x{seconds_serial / seconds:5.2f} vs serial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-files", type=int, default=20000)
    parser.add_argument("--local-folders", type=int, default=1000)
    parser.add_argument("--gs-files", type=int, default=5000)
    parser.add_argument("--gs-folders", type=int, default=250)
    parser.add_argument("--tops", type=int, default=50, help="top-level folders / prefixes: the parts")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added to every gs:// request (list page)")
    parser.add_argument("--page-size", type=int, default=100, help="objects per gs:// list page")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--no-beam", action="store_true", help="leave out the Beam step")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from gcs_emulator import GcsEmulator, anonymous_client, offline_environment, patched_environ

    from benchmarks.latency_proxy import LatencyProxy
    from beam_pipeline.sources import files

    print(f"listing benchmark: {args.workers} workers, {args.tops} parts, gs:// +{args.delay_ms:g} ms a request, "
          f"{args.page_size} objects a page")
    with tempfile.TemporaryDirectory(prefix="listing-bench-") as temp:
        local = Path(temp) / "archive"
        make_tree(local, args.local_files, args.local_folders, args.tops)
        serial(files.resolve_pattern(str(local)))  # warm the dentry cache: every run reads the same
        measure("local disk", files.resolve_pattern(str(local)), args.workers, not args.no_beam)

        gs_tree = Path(temp) / "gs"
        make_tree(gs_tree, args.gs_files, args.gs_folders, args.tops)
        with GcsEmulator() as emulator, patched_environ(offline_environment(emulator.url)):
            emulator.create_bucket(BUCKET)
            bucket = anonymous_client().bucket(BUCKET)
            started = time.perf_counter()
            for path in sorted(p for p in gs_tree.rglob("*") if p.is_file()):
                bucket.blob(f"in/{path.relative_to(gs_tree).as_posix()}").upload_from_string(b"x")
            print(f"\n(uploaded {args.gs_files:,} objects in {time.perf_counter() - started:.0f} s)")
            with LatencyProxy(emulator.url, delay_ms=args.delay_ms, list_page_size=args.page_size) as proxy, \
                    patched_environ({"STORAGE_EMULATOR_HOST": proxy.url}):
                serial(f"gs://{BUCKET}/in/**")  # warm: the proxy keeps each upstream listing
                measure(f"gs:// (emulator, +{args.delay_ms:g} ms a page of {args.page_size})",
                        f"gs://{BUCKET}/in/**", args.workers, not args.no_beam)


if __name__ == "__main__":
    main()
