"""What every step of the pipeline shares: the names of its tagged outputs, the metrics namespace,
and adding up the counts each step emits as data.

Every step also emits its counts (``collections.Counter``) to a ``counts`` output; ``summarizing``
adds them up and writes ``manifest.json`` (from the line counts of the final files) and then
``summary.json`` after all shards are final. Beam ``Metrics`` counters are kept for monitoring
(the Dataflow/Flink UIs, the progress line) and feed nothing a user reads.
"""
from __future__ import annotations

from collections import Counter

import apache_beam as beam


NAMESPACE = "dicom2fhir"
COUNTS = "counts"
ERRORS = "errors"
STATE = "state"      # (state name, line) for _state/
DELTA = "delta"      # ("_delta/<Type>", line)
DELETED = "deleted"  # "Type/id" of a resource the previous snapshot had and this one has not
DROPPED = "dropped"  # (name, line hash, key or None) of a previous line the output no longer keeps
REUSED = "reused"    # what a --since run takes from the previous run's state instead of reading it
PATHS_PER_BATCH = 200  # files read per element after the reshuffle: fewer, larger shuffled elements


class SumCounts(beam.CombineFn):
    """Adds Counters; only accumulators it created are changed, never its inputs."""

    def create_accumulator(self):
        return Counter()

    def add_input(self, total, counts):
        total.update(counts)
        return total

    def merge_accumulators(self, totals):
        merged = Counter()
        for total in totals:
            merged.update(total)
        return merged

    def extract_output(self, total):
        return total
