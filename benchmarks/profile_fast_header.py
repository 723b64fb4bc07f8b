"""Files/s of header.read_header (fast scanner, pydicom fallback) vs pydicom.dcmread, warm cache.

    python -m benchmarks.profile_fast_header [--seconds 2] [--profile]

Each file is opened and read from disk every time (page cache warm), as the pipeline does.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
import warnings

import pydicom
from pydicom.data import get_testdata_file

from beam_pipeline.dicom import fast_header, header
from beam_pipeline.fhir import keywords

FILES = ("CT_small.dcm", "MR_small.dcm", "dicomdirtests/77654033/CT2/17106", "JPEG2000.dcm")


def _rate(fn, path: str, seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn(path)
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--profile", action="store_true", help="cProfile the fast path on CT_small")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    spec = keywords.header_spec()

    def fast(path):
        with open(path, "rb") as fp:
            return header.read_header(fp, spec)

    def slow(path):
        with open(path, "rb") as fp:
            return header.read_header(fp, spec, use_fast=False)

    def dcmread(path):
        return pydicom.dcmread(path, stop_before_pixels=True)

    print(f"spec: header_spec(), {len(spec.attributes)} attributes, last tag {spec.last_tag:08X}")
    print(f"{'file':36s} {'fast read_header':>17s} {'pydicom read_header':>20s} {'dcmread':>9s}  speed-up")
    for name in FILES:
        path = get_testdata_file(name)
        with open(path, "rb") as fp:
            accepted = fast_header.parse(fp.read(header.FIRST_READ), fp, spec) is not None
        rates = [_rate(fn, path, args.seconds) for fn in (fast, slow, dcmread)]
        label = f"{name} ({os.path.getsize(path) // 1024} KiB{'' if accepted else ', declined'})"
        print(f"{label:36s} {rates[0]:15,.0f}/s {rates[1]:18,.0f}/s {rates[2]:7,.0f}/s  "
              f"x{rates[0] / rates[2]:.1f}")

    if args.profile:
        path = get_testdata_file("CT_small.dcm")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(5000):
            fast(path)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
