"""Steps 1+2 starting from a previous run (``--since``): read only the files that changed, reuse
the others' records from the previous run's state."""
from __future__ import annotations

import typing
import zlib
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipeline.fhir import keywords, study
from beam_pipeline.run import layout, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.reading import ReadHeaders, add_partial
from beam_pipeline.run.steps import COUNTS, ERRORS, NAMESPACE, PATHS_PER_BATCH, STATE
from beam_pipeline.sources import files as inputs


# Listed files and the previous run's source lines meet in groups: a folder's files in up to
# FOLDER_SPLIT groups (a listed batch, which is one part of the listing, so becomes a few shuffled
# elements, not one per file, and a folder of a million objects is still split), folded into
# JOIN_BUCKETS (so a million small folders do not make a million groups).
FOLDER_SPLIT = 16
JOIN_BUCKETS = 4096


def join_bucket(key: str) -> int:
    folder, _, name = key.rpartition("/")
    split = zlib.crc32(name.encode("utf-8", "surrogatepass")) % FOLDER_SPLIT
    return zlib.crc32(f"{folder}|{split}".encode("utf-8", "surrogatepass")) % JOIN_BUCKETS


class ReadState(beam.PTransform):
    """Shards of a previous run's state -> (key, entry) per line, parsed (and checked) on the
    workers; ``key_of`` chooses the key (default: the entry's own)."""

    def __init__(self, shards, parse, key_of=None):
        super().__init__()
        self.shards = list(shards)
        self.parse = parse
        self.key_of = key_of or (lambda entry: entry.key)

    def expand(self, pbegin):
        parse, key_of = self.parse, self.key_of
        if not self.shards:
            return pbegin | "None" >> beam.Create([]).with_output_types(typing.Tuple[typing.Any, typing.Any])
        return (pbegin
                | "Shards" >> beam.Create(self.shards)
                | "Lines" >> beam.io.ReadAllFromText()
                | "Parse" >> beam.Map(lambda line: (lambda entry: (key_of(entry), entry))(parse(line))))


class ChooseSourcesDoFn(beam.DoFn):
    """(bucket, listed batches now, previous entries) -> batches of listed items to read (main
    output), or of previous entries to reuse (``reused``): a file is read again when it is new,
    its stamp differs or is unknown, or it failed for a transient reason; a file no longer listed
    is gone."""

    REUSED = "reused"

    def __init__(self, batch_size: int = PATHS_PER_BATCH, progress: ProgressSettings | None = None):
        self.batch_size = batch_size
        self.progress_settings = progress

    def setup(self):
        self.progress = ProgressBeacon(self.progress_settings)

    def finish_bundle(self):
        self.progress.flush()

    def process(self, item):
        _, joined = item
        previous = {entry.key: entry for entry in joined["before"]}
        to_read, reused, counts = [], [], Counter()
        for listed_item in (listed for batch in joined["now"] for listed in batch):
            entry = previous.pop(state.source_key(listed_item[0]), None)
            if entry is not None and entry.reusable(inputs.stamp(*listed_item)):
                reused.append(entry)
                continue
            counts["incremental:files_read"] += 1
            counts["incremental:files_new" if entry is None else "incremental:files_changed_or_retried"] += 1
            to_read.append(listed_item)
        counts["incremental:files_reused"] += len(reused)
        counts["incremental:files_gone"] += len(previous)
        self.progress.add({"unchanged": len(reused)})  # not to be read: the progress line's total
        for start in range(0, len(to_read), self.batch_size):
            yield to_read[start:start + self.batch_size]
        for start in range(0, len(reused), 10 * self.batch_size):
            yield beam.pvalue.TaggedOutput(self.REUSED, reused[start:start + 10 * self.batch_size])
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


@beam.typehints.with_output_types(typing.Tuple[str, bytes])
class ReuseSourcesDoFn(beam.DoFn):
    """Batches of previous source entries -> what reading them gave (partial groups, error lines,
    counts) and their state lines, unchanged: the same outputs as ``ReadHeaderDoFn``."""

    def __init__(self, group_by: str = "study", root: str = ""):
        self.group_by = group_by
        self.root = root
        self.reused = Metrics.counter(NAMESPACE, "files_reused")

    def setup(self):
        self.instance_keys = keywords.instance_keys()

    def process(self, entries):
        partials: dict[str, dict] = {}
        counts = Counter()
        for entry in entries:
            records, errors, file_counts = entry.outcome()
            counts.update(file_counts)
            yield beam.pvalue.TaggedOutput(STATE, (layout.SOURCE_STATE_NAME, entry.line))
            yield from (beam.pvalue.TaggedOutput(ERRORS, error) for error in errors)
            path = state.key_path(entry.key)
            for record in records:
                add_partial(partials, record, path, self.group_by, self.root, self.instance_keys)
        self.reused.inc(len(entries))
        for key in sorted(partials):
            yield key, study.dump_groups(partials[key])
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


class ReadChangedHeaders(beam.PTransform):
    """Listed batches + the previous run's source entries -> the outputs of ``ReadHeaders``, reading
    only new, changed and transiently failed files; the others' records come from the state."""

    def __init__(self, previous_sources, read_headers: "ReadHeaders", group_by: str = "study", root: str = "",
                 batch_size: int = PATHS_PER_BATCH, progress: ProgressSettings | None = None):
        super().__init__()
        self.progress = progress
        self.previous_sources = previous_sources
        self.read_headers = read_headers
        self.group_by = group_by
        self.root = root
        self.batch_size = batch_size

    def expand(self, batches):
        def by_bucket(batch):
            buckets: dict[int, list] = {}
            for item in batch:
                buckets.setdefault(join_bucket(state.source_key(item[0])), []).append(item)
            return sorted(buckets.items())

        chosen = ({"now": batches | "ByBucket" >> beam.FlatMap(by_bucket), "before": self.previous_sources}
                  | "JoinState" >> beam.CoGroupByKey()
                  | "Choose" >> beam.ParDo(ChooseSourcesDoFn(self.batch_size, self.progress)).with_outputs(
                      ChooseSourcesDoFn.REUSED, COUNTS, main="read"))
        to_read = chosen.read | "SpreadToRead" >> beam.Reshuffle()
        partials, errors, counts, state_lines = to_read | "ReadHeaders" >> self.read_headers
        reused = (chosen[ChooseSourcesDoFn.REUSED]
                  | "Reuse" >> beam.ParDo(ReuseSourcesDoFn(self.group_by, self.root)).with_outputs(
                      ERRORS, COUNTS, STATE, main="partials"))
        return ((partials, reused.partials) | "AllPartials" >> beam.Flatten(),
                (errors, reused[ERRORS]) | "AllFileErrors" >> beam.Flatten(),
                (counts, reused[COUNTS], chosen[COUNTS]) | "AllReadCounts" >> beam.Flatten(),
                (state_lines, reused[STATE]) | "AllSourceState" >> beam.Flatten())
