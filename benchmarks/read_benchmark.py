"""The header parse, and the read and group steps beyond it, per study: this checkout against baselines.

Each checkout, in a subprocess of its own venv pinned to one CPU, lists an archive into unit jobs
as a full run does, and times the header parse of every file (``FileReader.read``, its cache of
decoded values emptied first), then with those headers served from memory
``ReadHeaderDoFn.process`` over batches of about
``PATHS_PER_BATCH`` files (stamps, file entries, partial groups, unit lines, the shuffle's
element), and grouping's ``merge_partials`` over what it emitted, grouped by key. It prints the
best round in microseconds per study, and a digest of the merged groups, which must be the same
for every checkout.

    python -m benchmarks.read_benchmark --baseline ../prev /tmp/small16k [--rounds 5]
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import time

CASES = ("parse", "read", "group")


def time_steps(archive: str, rounds: int) -> None:
    """In the checkout under test: print 'case=best-us ... digest=...'."""
    from beam_pipeline.dicom.fields import decoded_cache
    from beam_pipeline.dicom.records import INSTANCE
    from beam_pipeline.run import core, grouping, reading
    from beam_pipeline.run.steps import PATHS_PER_BATCH

    items = [(os.path.join(folder, name), None, None)
             for folder, _, names in os.walk(archive) for name in sorted(names)]
    units = reading.unit_items(items)
    batches, batch, files = [], [], 0
    for unit, listed in units:
        batch.append((unit, listed, ()))
        files += len(listed)
        if files >= PATHS_PER_BATCH:
            batches.append(batch)
            batch, files = [], 0
    batches += [batch] if batch else []

    reader = core.FileReader()
    results = {path: reader.read(path) for path, *_ in items}

    class MemoryReader(core.FileReader):
        def read(self, path, size=None):
            return results[path]

    dofn = reading.ReadHeaderDoFn()
    dofn.setup()
    dofn.reader = MemoryReader()
    studies = len({r.record["StudyInstanceUID"] for r in results.values() if r.kind == INSTANCE})
    gc.freeze()  # the headers held for the benchmark are no garbage collector's work in a real run
    best = {case: float("inf") for case in CASES}
    digest = ""
    for _ in range(rounds):
        decoded_cache(reader.spec).clear()  # each round decodes every series' values anew, as a run does
        started = time.process_time()
        for path, *_ in items:
            reader.read(path)
        best["parse"] = min(best["parse"], (time.process_time() - started) / studies * 1e6)
        started = time.process_time()
        partials = [out for jobs in batches for out in dofn.process(jobs) if isinstance(out, tuple)]
        best["read"] = min(best["read"], (time.process_time() - started) / studies * 1e6)
        keyed: dict = {}
        for key, blob in partials:
            keyed.setdefault(key, []).append(blob)
        started = time.process_time()
        merged = [grouping.merge_partials(item) for item in keyed.items()]
        best["group"] = min(best["group"], (time.process_time() - started) / studies * 1e6)
        text = repr([(key, uid, g.files, g.content, g.duplicates, sorted(g.series), sorted(g.instances.items()),
                      g.representative["SOPInstanceUID"]) for key, groups in sorted(merged)
                     for uid, g in sorted(groups.items())])
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(" ".join(f"{case}={best[case]:.1f}" for case in CASES), f"digest={digest}")


def main(argv=None) -> int:
    from benchmarks import checkouts  # here: the module itself also runs in baseline checkouts without it

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkouts.add_arguments(p, rounds=5)
    args = p.parse_args(argv)
    trees = checkouts.trees_of(args)
    for archive in args.archives:
        print(f"{archive}: us per study (parse; read and group beyond it), best of {args.rounds} rounds")
        if checkouts.alternated(trees, args.pairs, __file__, f"m.time_steps({archive!r}, {args.rounds})"):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
