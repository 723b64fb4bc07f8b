"""The build step alone, per study: this checkout against baselines, alternated, on real groups.

The headers of an archive are read and grouped per study once (this checkout's reader, pickled);
then each checkout, in a subprocess of its own venv pinned to one CPU, times over every group with
a fresh worker (validator and ``MappedParts``) per round: ``build_study``, ``core.process_study``
(build and validate) and ``BuildStudyDoFn.process`` (with the study's state line and counts). It
prints the best round in microseconds per study, and a digest of the outcomes, which must be the
same for every checkout (identical lines, counts and verdicts).

    python -m benchmarks.build_benchmark --baseline ../prev /tmp/small16k [--rounds 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

CASES = ("build", "process_study", "dofn")


def group_archive(archive: str, out: str) -> int:
    from beam_pipeline.dicom.records import INSTANCE
    from beam_pipeline.fhir import keywords, study
    from beam_pipeline.run import core

    reader, keys, groups = core.FileReader(), keywords.instance_keys(), {}
    for folder, _, names in os.walk(archive):
        for name in sorted(names):
            outcome = core.process_file(os.path.join(folder, name), reader)
            if outcome.result.kind == INSTANCE:
                study.add_to_directory(groups, outcome.result.record, keys)
    with open(out, "wb") as fp:
        pickle.dump(sorted(groups.values(), key=lambda g: g.study_uid), fp, protocol=pickle.HIGHEST_PROTOCOL)
    return len(groups)


def time_groups(groups_path: str, archive: str, rounds: int) -> None:
    """In the checkout under test: print 'case best-us digest' per case."""
    from terminologies import Terminologies

    from beam_pipeline.fhir import build as fhir_build
    from beam_pipeline.run import cli, core
    from beam_pipeline.run.building import BuildStudyDoFn

    with open(groups_path, "rb") as fp:
        groups = pickle.load(fp)
    config = cli.parse_args(["--input", archive, "--output", tempfile.mkdtemp(), "--quiet"])[0].conversion
    terms = Terminologies.load()
    best = {case: float("inf") for case in CASES}
    digest = ""
    for _ in range(rounds):
        for case in CASES:
            validator, parts = fhir_build.Validator(), fhir_build.MappedParts()
            started = time.process_time()
            if case == "build":
                for group in groups:
                    fhir_build.build_study(group, config, terms, parts)
            elif case == "process_study":
                outcomes = [core.process_study(group, config, terms, validator, parts) for group in groups]
            else:
                dofn = BuildStudyDoFn(config, "sampled")
                dofn.setup()
                dofn.start_bundle()
                for group in groups:
                    for _ in dofn.process(group):
                        pass
                list(dofn.finish_bundle())
            best[case] = min(best[case], (time.process_time() - started) / len(groups) * 1e6)
            if case == "process_study":
                text = repr([(sorted(o.lines.items()), o.shared, o.error, sorted(o.counts.items())) for o in outcomes])
                digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(" ".join(f"{case}={best[case]:.1f}" for case in CASES), f"digest={digest}")


def main(argv=None) -> int:
    from benchmarks import checkouts  # here: the module itself also runs in baseline checkouts without it

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkouts.add_arguments(p, rounds=3)
    args = p.parse_args(argv)
    trees = checkouts.trees_of(args)
    work = Path(tempfile.mkdtemp(prefix="build-benchmark-"))
    for archive in args.archives:
        groups = work / "groups.pkl"
        print(f"{archive}: {group_archive(archive, str(groups))} studies; us per study, best of {args.rounds} rounds")
        call = f"m.time_groups({str(groups)!r}, {archive!r}, {args.rounds})"
        if checkouts.alternated(trees, args.pairs, __file__, call):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
