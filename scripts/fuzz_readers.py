"""Differential fuzz campaign: the fast header reader against pydicom on mutants of real files.

    python scripts/fuzz_readers.py --mutants 100000 [--seed 7] [--save DIR] [--element-loop python]

Each mutant (see tests/mutants.py) is read with ``header.read_header`` fast and pydicom-only, with
the default spec and two test specs. Prints counts of mutants, agreements, disagreements by kind,
how pydicom classified the mutants and why the scanner fell back; exits 1 on any disagreement.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mutants  # noqa: E402
import specs  # noqa: E402

from beam_pipeline.dicom import fast_header  # noqa: E402
from beam_pipeline.fhir import keywords


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--save", help="folder to write disagreeing mutants to")
    parser.add_argument("--show", type=int, default=20, help="disagreements to print")
    parser.add_argument("--element-loop", choices=("compiled", "python"), default="compiled",
                        help="the fast scanner's element loop to test (default: compiled, as built)")
    args = parser.parse_args(argv)
    if args.element_loop == "python":
        fast_header._compiled_walk = None
    elif fast_header._compiled_walk is None:
        parser.error("the compiled element loop is not built (pip install -e . with a C compiler)")
    shown = [0]

    def on_finding(index, name, kinds, spec_name, data, found, facts):
        if shown[0] < args.show:
            print(f"#{index} {name} {'+'.join(kinds)} spec={spec_name}: {', '.join(found)} {facts}")
            shown[0] += 1
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            with open(os.path.join(args.save, f"{index:07d}-{os.path.basename(name)}"), "wb") as handle:
                handle.write(data)

    spec_table = {"default": keywords.header_spec(), "core": specs.CORE_SPEC, "wide": specs.WIDE_SPEC}
    start = time.perf_counter()
    counts = mutants.campaign(args.seed, args.mutants, spec_table, on_finding)
    seconds = time.perf_counter() - start
    print(f"seed {args.seed}, {args.element_loop} element loop: {counts['mutants']} mutants in {seconds:.0f} s, "
          f"{counts['agreements']} agreements, {counts['disagreements']} disagreements")
    for key in sorted(counts):
        if ":" in key:
            print(f"  {key}: {counts[key]}")
    return 1 if counts["disagreements"] or counts["mutants"] != args.mutants else 0


if __name__ == "__main__":
    sys.exit(main())
