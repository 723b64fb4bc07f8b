"""The pipeline's steps as composite PTransforms; DoFns only route what ``core`` returns.

Every step also emits its counts (``collections.Counter``) to a ``counts`` output; ``Summarize``
adds them up and writes ``manifest.json`` (from the line counts of the final files) and then
``summary.json`` after all shards are final. Beam ``Metrics`` counters are kept for monitoring
(the Dataflow/Flink UIs, the progress line) and feed nothing a user reads.
"""
from __future__ import annotations

import logging
import os
import time
import typing
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import orjson
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from beam_pipeline.codes import Outcome, Reason
from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES
from beam_pipeline.fhir import keywords, study
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.run import core, delta, layout, output, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.settings import DEFAULT_READ_CONCURRENCY, Settings
from beam_pipeline.run.summary import summarize, write_summary
from beam_pipeline.sources import files as inputs
from beam_pipeline.sources.retry import AdaptiveLimit, RetryBudget

NAMESPACE = "dicom2fhir"
COUNTS = "counts"
ERRORS = "errors"
STATE = "state"      # (state name, line) for _state/
DELTA = "delta"      # ("_delta/<Type>", line)
DELETED = "deleted"  # "Type/id" of a resource the previous snapshot had and this one has not
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


# ---------------------------------------------------------------------------------------------
# 1. List


PARTS = "parts"


@beam.typehints.with_output_types(typing.List[typing.Any])
class ListFilesDoFn(beam.DoFn):
    """The input pattern (``top``), or one of its parts -> batches of (path, size, version), one per
    file; the count as data; with ``top``, the parts to list next (to the ``parts`` output).

    Batched here rather than by ``BatchElements``: one element per file through an extra step
    costs the local runners more than reading a small header does. A part that cannot be listed
    (a list page still failing past the retry deadline, a refusal) is one error line and counts
    as one matched entry, as a local folder that cannot be listed does.
    """

    def __init__(self, exclude: str | None = None, progress: ProgressSettings | None = None,
                 batch_size: int = PATHS_PER_BATCH, top: bool = True, retry_deadline: float | None = None):
        self.exclude = exclude
        self.retry_deadline = retry_deadline
        self.batch_size = batch_size
        self.progress_settings = progress
        self.top = top
        self.listed = Metrics.counter(NAMESPACE, "files_listed")
        self.parts = Metrics.counter(NAMESPACE, "listing_parts_done")

    def setup(self):
        self.progress = ProgressBeacon(self.progress_settings)

    def process(self, element):
        if self.top:
            pattern = os.fsdecode(element)  # bytes when the input's own path is not valid UTF-8
            where, items = element, self._top(element, pattern)
        else:
            raw_pattern, where = element
            items = inputs.list_part(os.fsdecode(raw_pattern), where, self.exclude, self.retry_deadline)
        count = 0
        batch = []
        try:
            for item in items:
                if isinstance(item, beam.pvalue.TaggedOutput):
                    yield item
                    continue
                count += 1
                batch.append(item)
                if len(batch) == self.batch_size:
                    self.listed.inc(len(batch))
                    self.progress.add({"files_listed": len(batch)})
                    yield batch
                    batch = []
        except OSError as exc:  # SourceUnavailable (a list page past the deadline), a refusal
            failed = core.listing_failure(where, exc)
            yield beam.pvalue.TaggedOutput(ERRORS, failed.error)
            yield beam.pvalue.TaggedOutput(COUNTS, failed.counts)
        if batch:
            yield batch
        self.listed.inc(len(batch))
        self.parts.inc()
        self.progress.add({"files_listed": len(batch), "parts_listed": 1}, force=True)
        yield beam.pvalue.TaggedOutput(COUNTS, Counter({"files_matched": count}))

    def _top(self, element, pattern):
        """The root's own files, its parts sent on (tagged) first."""
        files, parts = inputs.list_top(pattern, self.exclude, self.retry_deadline)
        self.progress.add({"listing_parts": len(parts) + 1}, force=True)
        for part in parts:
            yield beam.pvalue.TaggedOutput(PARTS, (element, part))
        yield from files


class ListInputFiles(beam.PTransform):
    """Lists the input files and spreads them, in batches, over the workers: the pattern's root
    first (its own files and its parts: subfolders or sub-prefixes), then each part on any
    worker (a ``Reshuffle`` between), so that listing an archive is not one worker's serial step."""

    def __init__(self, input_path: str, exclude: str | None = None, batch_size: int = PATHS_PER_BATCH,
                 progress: ProgressSettings | None = None, retry_deadline: float | None = None):
        super().__init__()
        self.retry_deadline = retry_deadline
        self.input_path = input_path
        self.exclude = exclude
        self.batch_size = batch_size
        self.progress = progress

    def expand(self, pbegin):
        top = (pbegin
               | "Pattern" >> beam.Create([inputs.portable(inputs.resolve_pattern(self.input_path))])
               | "ListTop" >> beam.ParDo(ListFilesDoFn(self.exclude, self.progress, self.batch_size,
                                                      retry_deadline=self.retry_deadline))
               .with_outputs(COUNTS, ERRORS, PARTS, main="files"))
        parts = (top[PARTS]
                 | "SpreadParts" >> beam.Reshuffle()
                 | "ListParts" >> beam.ParDo(ListFilesDoFn(self.exclude, self.progress, self.batch_size, top=False,
                                                         retry_deadline=self.retry_deadline))
                 .with_outputs(COUNTS, ERRORS, main="files"))
        batches = ((top.files, parts.files)
                   | "AllListed" >> beam.Flatten()
                   | "Spread" >> beam.Reshuffle())
        counts = (top[COUNTS], parts[COUNTS]) | "ListCounts" >> beam.Flatten()
        errors = (top[ERRORS], parts[ERRORS]) | "ListErrors" >> beam.Flatten()
        return batches, counts, errors


# ---------------------------------------------------------------------------------------------
# 2. Read headers


class SharedReading:
    """What a worker process's header readers share: the pool of reading threads (none for one at a
    time) and the AIMD limit of gs:// requests in flight, capped at --read-concurrency."""

    def __init__(self, read_concurrency: int):
        self.pool = ThreadPoolExecutor(read_concurrency, "header-read") if read_concurrency > 1 else None
        self.limit = AdaptiveLimit(read_concurrency)


@beam.typehints.with_output_types(typing.Tuple[str, bytes])
class ReadHeaderDoFn(beam.DoFn):
    """Reads the headers of a batch of files and pre-aggregates its instances per study.

    Emits one (group key, serialized partial) per study found in the batch instead of one element
    per instance, so the shuffle carries few, compact elements.
    """

    def __init__(self, use_fast_reader: bool = True, group_by: str = "study", root: str = "",
                 progress: ProgressSettings | None = None, read_concurrency: int = DEFAULT_READ_CONCURRENCY,
                 max_header_bytes: int = MAX_HEADER_BYTES, retry_deadline: float | None = None):
        self.use_fast_reader = use_fast_reader
        self.max_header_bytes = max_header_bytes
        self.retry_deadline = retry_deadline
        self.group_by = group_by
        self.root = root
        self.progress_settings = progress
        self.read_concurrency = read_concurrency
        self.files = Metrics.counter(NAMESPACE, "files_read")
        self.instances = Metrics.counter(NAMESPACE, "instances_read")
        # One read pool and one in-flight limit per worker process, shared by the DoFn instances of
        # its bundle threads, so --read-concurrency bounds a worker's requests in flight whatever
        # its thread count, and a throttling store slows the whole worker down.
        self.shared_reading = shared.Shared()

    def setup(self):
        self.reading = self.shared_reading.acquire(lambda: SharedReading(self.read_concurrency))
        self.reader = core.FileReader(self.use_fast_reader, inputs.InputOpener(self.retry_deadline, self.reading.limit),
                                      self.max_header_bytes)
        self.pool = self.reading.pool
        self.progress = ProgressBeacon(self.progress_settings)
        self.instance_keys = keywords.instance_keys()
        core.quiet_pydicom()

    def process(self, batch):
        partials: dict[str, dict] = {}
        counts = Counter()
        remote = any(isinstance(path, str) and inputs.is_remote(path) for path, *_ in batch)
        stamps = [inputs.stamp(*item) for item in batch]  # before reading: a later change is seen
        outcomes = core.process_files(batch, self.reader, self.pool if remote else None)
        for (path, *_), stamp, outcome in zip(batch, stamps, outcomes):
            counts.update(outcome.counts)
            records = [] if outcome.error is not None or outcome.result.record is None else [outcome.result.record]
            errors = [] if outcome.error is None else [outcome.error]
            yield beam.pvalue.TaggedOutput(STATE, (layout.SOURCE_STATE_NAME, state.source_line(
                state.source_key(path), stamp, records, errors, outcome.counts)))
            yield from (beam.pvalue.TaggedOutput(ERRORS, error) for error in errors)
            for record in records:
                add_partial(partials, record, path, self.group_by, self.root, self.instance_keys)
        self.files.inc(len(batch))
        self.instances.inc(counts["instances_read"])
        self.progress.add({"files_read": len(batch), "instances_read": counts["instances_read"]})
        for key in sorted(partials):
            yield key, study.dump_groups(partials[key])
        yield beam.pvalue.TaggedOutput(COUNTS, counts)

    def finish_bundle(self):
        self.progress.flush()

    def teardown(self):
        self.pool = self.reading = None  # shared with the process's other instances; ends with the last of them


def add_partial(partials: dict, record: dict, path, group_by: str, root: str, instance_keys) -> None:
    """Pre-aggregates a record into the partial groups of a batch, by study (or first-level folder)."""
    key = inputs.first_level_folder(path, root) if group_by == "directory" else record["StudyInstanceUID"]
    study.add_to_directory(partials.setdefault(key, {}), record, instance_keys)


class ReadHeaders(beam.PTransform):
    """Batches of paths -> (group key, serialized partial groups), file errors, counts, state lines."""

    def __init__(self, use_fast_reader: bool = True, group_by: str = "study", root: str = "",
                 progress: ProgressSettings | None = None, read_concurrency: int = DEFAULT_READ_CONCURRENCY,
                 max_header_bytes: int = MAX_HEADER_BYTES, retry_deadline: float | None = None):
        super().__init__()
        self.dofn = ReadHeaderDoFn(use_fast_reader, group_by, root, progress, read_concurrency, max_header_bytes,
                                   retry_deadline)

    def expand(self, batches):
        results = batches | "ReadHeader" >> beam.ParDo(self.dofn).with_outputs(ERRORS, COUNTS, STATE, main="partials")
        return results.partials, results[ERRORS], results[COUNTS], results[STATE]


# ---------------------------------------------------------------------------------------------
# 1+2 starting from a previous run (--since): read only the files that changed


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


# ---------------------------------------------------------------------------------------------
# 1+2 for a PACS: list studies over DICOMweb, fetch each study's headers on the workers

STUDIES_PER_BATCH = 16  # studies fetched per element after the reshuffle (concurrently, bounded)


class ListStudiesDoFn(beam.DoFn):
    """The source -> (StudyInstanceUID, stamp) of every matching study (QIDO-RS, paged); their
    count as data.

    A listing that fails part-way fails the run: a silently partial listing would skip studies.
    """

    def __init__(self, source, progress: ProgressSettings | None = None):
        self.source = source
        self.progress_settings = progress
        self.listed = Metrics.counter(NAMESPACE, "studies_listed")

    def setup(self):
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # an INFO line per request
        self.progress = ProgressBeacon(self.progress_settings)

    def process(self, _):
        from beam_pipeline.sources import dicomweb

        count = 0
        for listed in dicomweb.list_stamped_studies(self.source.connection, self.source.query):
            count += 1
            if count % 100 == 0:
                self.listed.inc(100)
                self.progress.add({"studies_listed": 100})
            yield listed
        self.listed.inc(count % 100)
        self.progress.add({"studies_listed": count % 100, "listing_done": 1}, force=True)
        yield beam.pvalue.TaggedOutput(COUNTS, Counter({"dicomweb:studies_listed": count}))


@beam.typehints.with_output_types(typing.Tuple[str, bytes])
class FetchStudiesDoFn(beam.DoFn):
    """Fetches the metadata of a batch of studies (at most ``max_in_flight`` requests at once per
    DoFn instance) and emits each study's instances as partial groups, as ``ReadHeaderDoFn`` does."""

    def __init__(self, source, progress: ProgressSettings | None = None):
        self.source = source
        self.progress_settings = progress
        self.fetched = Metrics.counter(NAMESPACE, "studies_fetched")
        self.failed = Metrics.counter(NAMESPACE, "studies_failed")
        self.instances = Metrics.counter(NAMESPACE, "instances_read")

    def setup(self):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from beam_pipeline.fhir.keywords import header_spec

        self.spec = header_spec()
        self.instance_keys = keywords.instance_keys()
        self.clients = threading.local()  # a requests.Session per thread
        self.budget = RetryBudget(self.source.connection.retry.budget)  # retry sleeps of all its threads
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.source.connection.max_in_flight))
        self.progress = ProgressBeacon(self.progress_settings)
        core.quiet_pydicom()
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

    def teardown(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def _fetch(self, listed: tuple[str, str | None]):
        from beam_pipeline.sources import dicomweb

        client = getattr(self.clients, "client", None)
        if client is None:
            client = self.clients.client = self.source.connection.client(self.budget)
        return core.process_fetched_study(dicomweb.fetch_study(client, listed[0]), self.spec)

    def process(self, batch):
        """``batch``: (StudyInstanceUID, stamp) pairs as listed; each study's source state line
        keeps the stamp taken at listing, so a study changed since is fetched again next time."""
        counts = Counter()
        partials: dict[str, dict] = {}
        for (uid, stamp), read in zip(batch, self.pool.map(self._fetch, batch)):
            counts.update(read.counts)
            yield beam.pvalue.TaggedOutput(STATE, (layout.SOURCE_STATE_NAME, state.source_line(
                uid, stamp, read.records, read.errors, read.counts)))
            for error in read.errors:
                yield beam.pvalue.TaggedOutput(ERRORS, error)
            for record in read.records:
                study.add_to_directory(partials.setdefault(record["StudyInstanceUID"], {}), record,
                                       self.instance_keys)
        self.fetched.inc(counts["dicomweb:studies_fetched"])
        self.failed.inc(counts["dicomweb:studies_failed"])
        self.instances.inc(counts["instances_read"])
        self.progress.add({"studies_fetched": counts["dicomweb:studies_fetched"] + counts["dicomweb:studies_failed"],
                           "instances_read": counts["instances_read"]})
        for key in sorted(partials):
            yield key, study.dump_groups(partials[key])
        yield beam.pvalue.TaggedOutput(COUNTS, counts)

    def finish_bundle(self):
        self.progress.flush()


def listed_once(stamps) -> str | None:
    """The stamp of a study listed more than once (the archive changed while paging): unknown
    (None) unless every listing agrees, so the next run fetches it again."""
    distinct = set(stamps)
    return distinct.pop() if len(distinct) == 1 else None


class ChooseStudiesDoFn(beam.DoFn):
    """(uid, {"now": [stamp], "before": [previous source entry]}) -> (uid, stamp) to fetch (main),
    or the entry to reuse (``reused``): a study is fetched again when it is new, its stamp
    differs or is unknown, or it failed for a transient reason; a study no longer listed is gone."""

    def __init__(self, progress: ProgressSettings | None = None):
        self.progress_settings = progress

    def setup(self):
        self.progress = ProgressBeacon(self.progress_settings)

    def finish_bundle(self):
        self.progress.flush()

    def process(self, item):
        uid, joined = item
        now, before = list(joined["now"]), list(joined["before"])
        previous = before[0] if before else None
        if not now:
            yield beam.pvalue.TaggedOutput(COUNTS, Counter({"incremental:studies_gone": 1}))
            return
        stamp = now[0]
        if previous is not None and previous.reusable(stamp):
            self.progress.add({"unchanged": 1})
            yield beam.pvalue.TaggedOutput(ChooseSourcesDoFn.REUSED, previous)
            yield beam.pvalue.TaggedOutput(COUNTS, Counter({"incremental:studies_not_fetched": 1}))
            return
        yield uid, stamp
        yield beam.pvalue.TaggedOutput(COUNTS, Counter({
            "incremental:studies_fetched": 1,
            "incremental:studies_new" if previous is None else "incremental:studies_changed_or_retried": 1}))


class ReadDicomWeb(beam.PTransform):
    """A DICOMweb source -> (study uid, serialized partial groups), errors, counts, source state
    lines: the same outputs as ``ListInputFiles`` + ``ReadHeaders``, so grouping, building and
    writing are shared. With the previous run's source entries (one per study), only studies whose
    stamp (series and instance counts, study attributes) changed are fetched."""

    def __init__(self, source, progress: ProgressSettings | None = None, batch_size: int = STUDIES_PER_BATCH,
                 previous_sources=None):
        super().__init__()
        self.source = source
        self.progress = progress
        self.batch_size = batch_size
        self.previous_sources = previous_sources

    def expand(self, pbegin):
        listed = (pbegin
                  | "Query" >> beam.Create([None])
                  | "ListStudies" >> beam.ParDo(ListStudiesDoFn(self.source, self.progress)).with_outputs(COUNTS, main="uids"))
        once = listed.uids | "Once" >> beam.CombinePerKey(listed_once)
        counts, errors, partials, state_lines = [listed[COUNTS]], [], [], []
        if self.previous_sources is not None:
            chosen = ({"now": once, "before": self.previous_sources}
                      | "JoinState" >> beam.CoGroupByKey()
                      | "Choose" >> beam.ParDo(ChooseStudiesDoFn(self.progress)).with_outputs(
                          ChooseSourcesDoFn.REUSED, COUNTS, main="fetch"))
            once = chosen.fetch
            reused = (chosen[ChooseSourcesDoFn.REUSED]
                      | "BatchReused" >> beam.BatchElements(min_batch_size=1, max_batch_size=10 * PATHS_PER_BATCH)
                      | "Reuse" >> beam.ParDo(ReuseSourcesDoFn()).with_outputs(ERRORS, COUNTS, STATE, main="partials"))
            counts += [chosen[COUNTS], reused[COUNTS]]
            errors.append(reused[ERRORS])
            partials.append(reused.partials)
            state_lines.append(reused[STATE])
        fetched = (once
                   | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
                   | "Spread" >> beam.Reshuffle()
                   | "Fetch" >> beam.ParDo(FetchStudiesDoFn(self.source, self.progress)).with_outputs(
                       ERRORS, COUNTS, STATE, main="partials"))
        counts.append(fetched[COUNTS])
        errors.append(fetched[ERRORS])
        partials.append(fetched.partials)
        state_lines.append(fetched[STATE])
        return (partials | "AllPartials" >> beam.Flatten(), errors | "AllErrors" >> beam.Flatten(),
                counts | "SourceCounts" >> beam.Flatten(), state_lines | "AllSourceState" >> beam.Flatten())


# ---------------------------------------------------------------------------------------------
# 3. Group per study (multi-study guard)


def merge_partials(item) -> tuple[str, dict]:
    key, blobs = item
    return key, study.merge_directories(study.load_groups(blob) for blob in blobs)


@beam.typehints.with_output_types(typing.Tuple[str, study.StudyGroup])
class DirectoryGuardDoFn(beam.DoFn):
    """Rejects a folder holding more than one study as a whole; passes single-study folders on."""

    REJECTED = "rejected"

    def process(self, item):
        directory, groups = item
        if len(groups) == 1:
            (uid, group), = groups.items()
            yield uid, group
            return
        uids = sorted(groups)
        files = sum(g.files for g in groups.values())
        yield beam.pvalue.TaggedOutput(COUNTS, Counter({
            f"outcome:{Outcome.REJECTED_WITH_STUDY}": files, f"error:{Reason.MULTIPLE_STUDIES_IN_DIRECTORY}": 1}))
        yield beam.pvalue.TaggedOutput(self.REJECTED, {
            "reason": str(Reason.MULTIPLE_STUDIES_IN_DIRECTORY), "path": directory, "study_uids": uids,
            "files": files, "detail": f"{len(uids)} StudyInstanceUIDs in one folder: {', '.join(uids)}",
        })
        for uid in uids:  # no file of these studies may be written from other folders either
            yield uid, study.StudyGroup(uid, rejected_folders={directory})


class MergeGroupsFn(beam.CombineFn):
    """Merges StudyGroups of one study found in several folders (directory mode).

    Inputs are never changed (runners may reuse them): the accumulator is a fresh group that
    the inputs are merged into.
    """

    def create_accumulator(self):
        return None

    def add_input(self, merged, group):
        return (merged or study.StudyGroup(group.study_uid)).merge(group)

    def merge_accumulators(self, groups):
        merged = None
        for group in groups:
            if group is not None:
                merged = (merged or study.StudyGroup(group.study_uid)).merge(group)
        return merged

    def extract_output(self, merged):
        return merged


class GroupStudies(beam.PTransform):
    """Partials keyed by study (or folder) -> one StudyGroup per study, plus folder rejections and
    their counts (directory mode; empty in study mode)."""

    def __init__(self, group_by: str = "study"):
        super().__init__()
        self.group_by = group_by

    def expand(self, partials):
        merged = (partials
                  | "Shuffle" >> beam.GroupByKey()
                  | "Merge" >> beam.Map(merge_partials))
        if self.group_by == "study":
            return merged | "OneStudy" >> beam.FlatMap(lambda item: item[1].values()), None, None
        guarded = merged | "Guard" >> beam.ParDo(DirectoryGuardDoFn()).with_outputs(
            DirectoryGuardDoFn.REJECTED, COUNTS, main="ok")
        groups = (guarded.ok
                  | "MergeSplitStudies" >> beam.CombinePerKey(MergeGroupsFn())
                  | "DropKey" >> beam.Values())
        return groups, guarded[DirectoryGuardDoFn.REJECTED], guarded[COUNTS]


# ---------------------------------------------------------------------------------------------
# 4. Build resources


@beam.typehints.with_output_types(typing.Tuple[str, str])
class BuildStudyDoFn(beam.DoFn):
    """(study uid, {"now": [StudyGroup], "before": [previous StudyEntry]}) -> (resource type, NDJSON
    line); shared resources (Device, Patient, Encounter), rejections and the study's state line to
    their own outputs. A study whose records are those of the previous run is not rebuilt: its
    lines come from the state. With a previous run, what changed goes to ``delta``/``deleted``."""

    SHARED = "shared"

    def __init__(self, config: ConversionConfig, validate: str = "sampled", progress: ProgressSettings | None = None,
                 incremental: bool = False, reuse_studies: bool = True):
        self.config = config
        self.validate = validate
        self.progress_settings = progress
        self.incremental = incremental
        self.reuse_studies = reuse_studies
        self.written = Metrics.counter(NAMESPACE, "studies_written")
        self.rejected = Metrics.counter(NAMESPACE, "studies_rejected")
        self.reused = Metrics.counter(NAMESPACE, "studies_reused")

    def setup(self):
        from beam_pipeline.fhir import build as fhir_build
        from terminologies import Terminologies

        self.terms = Terminologies.load()
        self.validator = None if self.validate == "none" else fhir_build.Validator(full=self.validate == "full")
        self.progress = ProgressBeacon(self.progress_settings)

    def process(self, item):
        uid, joined = item
        now, before = list(joined["now"]), list(joined["before"])
        previous = before[0] if before else None
        if not now:  # every file of the study is gone (or no longer a valid instance)
            _, deleted = delta.study_changes(previous.outcome, None)
            yield from (beam.pvalue.TaggedOutput(DELETED, key) for key in deleted)
            yield beam.pvalue.TaggedOutput(COUNTS, Counter({"incremental:studies_deleted": 1}))
            return
        group = now[0]
        digest = group.digest()
        if previous is not None and self.reuse_studies and previous.digest == digest:
            outcome, line = previous.outcome, previous.line
            self.reused.inc()
            extra = Counter({"incremental:studies_reused": 1})
        else:
            outcome = core.process_study(group, self.config, self.terms, self.validator)
            line = state.study_line(uid, digest, outcome)
            extra = Counter({"incremental:studies_rebuilt": 1} if self.incremental else {})
            if self.incremental:
                changed, deleted = delta.study_changes(previous.outcome if previous else None, outcome)
                yield from (beam.pvalue.TaggedOutput(DELTA, named) for named in changed)
                yield from (beam.pvalue.TaggedOutput(DELETED, key) for key in deleted)
        yield beam.pvalue.TaggedOutput(STATE, (layout.STUDY_STATE_NAME, line))
        yield beam.pvalue.TaggedOutput(COUNTS, outcome.counts + extra)
        self.written.inc(outcome.counts["studies_written"])
        self.rejected.inc(outcome.counts["studies_rejected"])
        self.progress.add({"studies_written": outcome.counts["studies_written"]})
        if outcome.error is not None:
            yield beam.pvalue.TaggedOutput(ERRORS, outcome.error)
        for resource_type, lines in outcome.lines.items():
            for resource_line in lines:
                yield resource_type, resource_line
        for shared in outcome.shared:
            yield beam.pvalue.TaggedOutput(self.SHARED, shared)

    def finish_bundle(self):
        self.progress.flush()


def shared_delta(item):
    """(key, {"now": [line], "before": [line]}) -> tagged delta lines and deleted keys."""
    key, joined = item
    changed, deleted = delta.shared_change(key, list(joined["before"]), list(joined["now"]))
    yield from (beam.pvalue.TaggedOutput(DELTA, named) for named in changed)
    yield from (beam.pvalue.TaggedOutput(DELETED, key) for key in deleted)


class BuildResources(beam.PTransform):
    """StudyGroups (+ the previous run's study entries) -> study lines, shared lines (each
    Device/Patient/Encounter once per run), errors, counts, study state lines, and with a previous
    run its delta lines and deleted keys."""

    def __init__(self, config: ConversionConfig, validate: str = "sampled", progress: ProgressSettings | None = None,
                 previous_studies=None, reuse_studies: bool = True):
        super().__init__()
        self.config = config
        self.validate = validate
        self.progress = progress
        self.previous_studies = previous_studies
        self.reuse_studies = reuse_studies

    def expand(self, groups):
        incremental = self.previous_studies is not None
        keyed = groups | "ByStudy" >> beam.Map(lambda group: (group.study_uid, group))
        if incremental:
            joined = {"now": keyed, "before": self.previous_studies} | "JoinState" >> beam.CoGroupByKey()
        else:
            joined = keyed | "Alone" >> beam.MapTuple(lambda uid, group: (uid, {"now": [group], "before": []}))
        built = joined | "Build" >> beam.ParDo(BuildStudyDoFn(
            self.config, self.validate, self.progress, incremental, self.reuse_studies)).with_outputs(
            ERRORS, COUNTS, BuildStudyDoFn.SHARED, STATE, DELTA, DELETED, main="resources")
        picks = built[BuildStudyDoFn.SHARED] | "SharedOnce" >> beam.CombinePerKey(core.pick_shared)
        shared = picks | "SharedLine" >> beam.Map(lambda item: (core.shared_type(item[0]), item[1]))
        shared_counts = shared | "CountShared" >> beam.Map(lambda item: Counter({f"lines:{item[0]}": 1}))
        counts = (built[COUNTS], shared_counts) | "BuildCounts" >> beam.Flatten()
        changes = None
        if incremental:
            before = (self.previous_studies
                      | "PreviousShared" >> beam.FlatMap(lambda item: item[1].outcome.shared)
                      | "PreviousSharedOnce" >> beam.CombinePerKey(core.pick_shared))
            shared_changes = ({"now": picks, "before": before}
                              | "JoinShared" >> beam.CoGroupByKey()
                              | "SharedDelta" >> beam.FlatMap(shared_delta).with_outputs(DELTA, DELETED))
            changes = ((built[DELTA], shared_changes[DELTA]) | "AllDelta" >> beam.Flatten(),
                       (built[DELETED], shared_changes[DELETED]) | "AllDeleted" >> beam.Flatten())
        return built.resources, shared, built[ERRORS], counts, built[STATE], changes


class WriteDeletions(beam.PTransform):
    """Deleted keys -> ``_delta/deletions.json``, one transaction Bundle (written even when empty,
    so a nightly loader can always post it); returns the written file as ``WriteNdjson`` does."""

    def __init__(self, temp_dir: str):
        super().__init__()
        self.temp_dir = temp_dir

    def expand(self, keys):
        temp_dir = self.temp_dir

        def write(all_keys):
            bundle = delta.deletions_bundle(all_keys)
            relative = layout.DELETIONS_NAME
            with FileSystems.create(FileSystems.join(temp_dir, relative.replace("/", "--")),
                                    mime_type="application/fhir+json") as out:
                out.write(orjson.dumps(bundle, option=orjson.OPT_INDENT_2) + b"\n")
            return layout.DELETIONS_NAME, relative, len(bundle.get("entry", ()))

        return keys | "AllKeys" >> beam.combiners.ToList() | "Write" >> beam.Map(write)


# ---------------------------------------------------------------------------------------------
# 5. Write, then summarize


class WriteNdjson(beam.PTransform):
    """(name, line) -> files named by ``output.shard_name`` (resource types at the top,
    ``bundles/``, ``_report/``, ``_state/``, ``_delta/``); returns (name, relative path, line count)
    of every file written.

    Deterministic, unlike ``fileio.WriteToFiles`` (whose files follow the runner's bundles): a
    name's file count follows from the size of its lines, a line's file from a hash of it, and each
    file is written sorted. So re-runs, engines, worker counts and an incremental run write the
    same bytes as a full run.
    """

    def __init__(self, temp_dir: str):
        super().__init__()
        self.temp_dir = temp_dir

    def expand(self, named_lines):
        temp_dir = self.temp_dir
        shards = (named_lines
                  | "Bytes" >> beam.Map(lambda item: (item[0], len(item[1]) + 1))
                  | "BytesPerName" >> beam.CombinePerKey(sum)
                  | "ShardCount" >> beam.MapTuple(lambda name, size: (name, output.shard_count(size))))
        every_shard = shards | "EveryShard" >> beam.FlatMapTuple(
            lambda name, total: [((name, index, total), None) for index in range(total)])
        keyed = named_lines | "AssignShard" >> beam.Map(
            lambda item, totals: ((item[0], output.shard_of(item[1], totals[item[0]]), totals[item[0]]), item[1]),
            totals=beam.pvalue.AsDict(shards))
        return ((keyed, every_shard)
                | "WithEmpty" >> beam.Flatten()
                | "PerShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.MapTuple(
                    lambda key, lines: output.write_shard(temp_dir, *key, (line for line in lines if line is not None))))


class WriteSummaryDoFn(beam.DoFn):
    """Moves the written files into place, then writes the state's header, manifest.json and
    summary.json, once every shard is written (their side inputs are complete only then)."""

    def __init__(self, settings: Settings, started: float, config: ConversionConfig):
        self.settings = settings
        self.started = started
        self.config = config

    def process(self, _, counts, files):
        output_dir = self.settings.output
        output.publish(self.settings, files)
        output.remove_temp_dir(self.settings)
        state.write_header(output_dir, state.header(self.settings, self.config, state.shard_sizes(output_dir, files)))
        output.write_json(output_dir, layout.MANIFEST_NAME, output.folder_manifest(self.settings, self.started, files))
        if self.settings.since is not None:
            output.write_json(output_dir, layout.DELTA_MANIFEST_NAME, output.delta_manifest(self.settings, self.started, files))
        summary = summarize(counts, time.time() - self.started)
        write_summary(output_dir, summary)
        yield summary


class Summarize(beam.PTransform):
    """All counts + the written files -> manifest.json and summary.json, written last: the summary's
    presence marks a complete run."""

    def __init__(self, settings: Settings, started: float, config: ConversionConfig):
        super().__init__()
        self.settings = settings
        self.started = started
        self.config = config

    def expand(self, pcolls):
        counts, written_files = pcolls
        total = counts | "Sum" >> beam.CombineGlobally(SumCounts())
        return (counts.pipeline
                | "Once" >> beam.Create([None])
                | "WriteSummary" >> beam.ParDo(WriteSummaryDoFn(self.settings, self.started, self.config),
                                               counts=beam.pvalue.AsSingleton(total),
                                               files=beam.pvalue.AsList(written_files)))
