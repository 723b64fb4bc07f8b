"""Live conversion against the HAPI FHIR JPA server (fhir-server/, started here on loopback).

1. Latency (``--follow``): studies copied into the watched folder one after another (each copy
   made in a temporary folder beside it and renamed in, as a DICOM receiver does); for each, the
   time from its rename until its ImagingStudy can be read from HAPI. p50 and p95 per
   ``--stable-after`` value and follow mode (``--modes``: the loop of cycles, the baseline, and the
   streaming pipeline on Prism, alternated).
2. Throughput: resources per second written to HAPI, each into an emptied server, alternated
   ``--rounds`` times: the sink (``--fhir-server``: the run's wall time minus that of the same run
   without the sink, measured alternately), Bulk Data ``$import`` of the run's manifest, and the
   run's transaction Bundles posted by hand one after another (as ``tests/test_hapi_server.py``).

    python -m benchmarks.live_benchmark --studies 40 --latency-studies 10 --stable-after 2 5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

LOCAL = ("--quiet", "--direct_running_mode", "in_memory", "--direct_num_workers", "1")
CONTENT = ("--patients", "--encounters", "--observations")


def run_cli(archive, out: Path, *options: str) -> tuple[float, dict]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out),
                           *LOCAL, *CONTENT, *options], capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"the run into {out} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, json.loads((out / "_report" / "summary.json").read_text())


def percentile(values, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def study_id(folder: Path, work: Path) -> str:
    out = work / f"id-{folder.name}"
    run_cli(folder, out)
    (line,) = [l for p in out.glob("ImagingStudy-*.ndjson") for l in p.read_text().splitlines() if l]
    return json.loads(line)["id"]


def follow_options(mode: str) -> list[str]:
    """``cycles``: the loop of bounded runs on the in-process runner (its fastest); ``stream``: the
    streaming pipeline on Prism."""
    if mode == "cycles":
        return [*LOCAL, "--follow-mode", "cycles"]
    from scripts import engines

    return ["--quiet", "--runner", "PrismRunner", "--prism_location", str(engines.install_prism()),
            "--follow-mode", "stream"]


def latency(hapi, archive: Path, work: Path, stable_after: float, count: int, poll_interval: float,
            mode: str = "cycles") -> list[float]:
    """Seconds from each study's rename into the watched folder until HAPI has its ImagingStudy;
    a first study (not measured) warms the pipeline up."""
    from fhir_java import request

    hapi.expunge_everything()
    studies = sorted(p for p in archive.glob("*/*") if p.is_dir())[:count + 1]
    ids = {folder: study_id(folder, work) for folder in studies}
    name = f"{mode}-{stable_after:g}"
    watched, out = work / f"watched-{name}", work / f"follow-{name}"
    watched.mkdir()
    log = open(work / f"follow-{name}.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "beam_pipeline", "--follow", "--input", str(watched),
                                "--output", str(out), *follow_options(mode), *CONTENT, "--fhir-server", hapi.base,
                                "--stable-after", str(stable_after), "--poll-interval", str(poll_interval)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = []
    try:
        for index, folder in enumerate(studies):
            staging = work / "staging" / f"{name}-{folder.name}"
            shutil.copytree(folder, staging)
            os.rename(staging, watched / folder.name)
            arrived = time.monotonic()
            while request("GET", f"{hapi.base}/ImagingStudy/{ids[folder]}")[0] != 200:
                if process.poll() is not None:
                    raise SystemExit(f"--follow ended: {(work / f'follow-{name}.log').read_text()[-2000:]}")
                if time.monotonic() - arrived > 600:
                    raise SystemExit(f"study {folder.name} not on the server after 600 s")
                time.sleep(0.1)
            if index == 0:  # the warm-up study
                continue
            seconds.append(time.monotonic() - arrived)
            print(f"  {mode}, stable-after {stable_after:g} s: {folder.name} readable after {seconds[-1]:.1f} s",
                  flush=True)
    finally:
        process.terminate()
        process.wait(timeout=600)
        log.close()
    return seconds


def throughput(hapi, archive: Path, work: Path, rounds: int) -> dict:
    from fhir_java import file_server, request
    from test_hapi_server import bulk_import, bundles, expected_counts

    rates: dict[str, list[float]] = {"sink (--fhir-server)": [], "$import": [], "Bundles posted by hand": []}
    www = work / "www"
    www.mkdir()
    with file_server(www) as base:
        for number in range(rounds):
            plain, _ = run_cli(archive, www / f"plain{number}", "--bundles", "--manifest-base-url",
                               f"{base}plain{number}/")
            hapi.expunge_everything()
            with_sink, summary = run_cli(archive, work / f"sink{number}", "--fhir-server", hapi.base)
            written = summary["fhir_server"]["resources_written"]
            rates["sink (--fhir-server)"].append(written / max(with_sink - plain, 1e-3))
            print(f"  round {number + 1}: run {plain:.1f} s, with the sink {with_sink:.1f} s, "
                  f"{written} resources sent", flush=True)
            hapi.expunge_everything()
            result = bulk_import(hapi, www / f"plain{number}")
            assert result["status"] == 200, result["body"]
            rates["$import"].append(sum(expected_counts(www / f"plain{number}").values()) / result["seconds"])
            hapi.expunge_everything()
            posted = bundles(www / f"plain{number}")
            started = time.monotonic()
            for bundle in posted:
                status, _, body = request("POST", hapi.base, bundle)
                assert status == 200, body
            rates["Bundles posted by hand"].append(sum(len(b["entry"]) for b in posted) / (time.monotonic() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40, help="studies of the throughput archive (x3 series x3)")
    parser.add_argument("--latency-studies", type=int, default=10)
    parser.add_argument("--stable-after", type=float, nargs="+", default=[2.0, 5.0])
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=["cycles", "stream"], default=["cycles", "stream"],
                        help="follow modes to measure, the first the baseline (cycles: in-process runner; "
                             "stream: Prism)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    from fhir_java import HapiServer
    from make_archive import make_archive

    with tempfile.TemporaryDirectory(prefix="live-bench-") as temp:
        work = Path(temp)
        hapi = HapiServer(work / "hapi.log").start()
        try:
            if not args.skip_latency:
                make_archive(work / "latency-archive", studies=args.latency_studies + 1, series=2, instances=3)
                for stable_after in args.stable_after:
                    p50 = {}
                    for mode in args.modes:  # alternated, the same studies
                        seconds = latency(hapi, work / "latency-archive", work, stable_after, args.latency_studies,
                                          args.poll_interval, mode)
                        p50[mode] = percentile(seconds, 50)
                        print(f"latency, {mode}, --stable-after {stable_after:g} s, --poll-interval "
                              f"{args.poll_interval:g} s: p50 {p50[mode]:.1f} s, p95 {percentile(seconds, 95):.1f} s, "
                              f"p50 - stable-after {p50[mode] - stable_after:.1f} s ({len(seconds)} studies)"
                              + (f", p50 {p50[mode] / p50[args.modes[0]]:.2f}x {args.modes[0]}"
                                 if mode != args.modes[0] else ""), flush=True)
            if not args.skip_throughput:
                make_archive(work / "archive", studies=args.studies, series=3, instances=3)
                rates = throughput(hapi, work / "archive", work, args.rounds)
                reference = rates["Bundles posted by hand"]
                for name, rate in rates.items():
                    print(f"throughput, {name}: {rate:.1f} resources/s ({rate / reference:.2f}x Bundles by hand)")
        finally:
            hapi.stop()


if __name__ == "__main__":
    main()
