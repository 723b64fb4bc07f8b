"""Step 2: read the headers of a batch of files and pre-aggregate their instances per study."""
from __future__ import annotations

import operator
import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared

from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES
from beam_pipeline.fhir import keywords, study
from beam_pipeline.run import core, folder_state, layout, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.settings import DEFAULT_READ_CONCURRENCY
from beam_pipeline.run.steps import COUNTS, ERRORS, NAMESPACE, PATHS_PER_BATCH, STATE
from beam_pipeline.sources import files as inputs
from beam_pipeline.sources.retry import AdaptiveLimit


_KEY = operator.attrgetter("key")


class SharedReading:
    """What a worker process's header readers share: the pool of reading threads (none for one at a
    time) and the AIMD limit of gs:// requests in flight, capped at --read-concurrency."""

    def __init__(self, read_concurrency: int):
        self.pool = ThreadPoolExecutor(read_concurrency, "header-read") if read_concurrency > 1 else None
        self.limit = AdaptiveLimit(read_concurrency)


@beam.typehints.with_output_types(typing.Tuple[str, bytes])
class ReadHeaderDoFn(beam.DoFn):
    """Reads the headers of a batch of unit jobs and pre-aggregates their instances per study.

    Emits one (group key, serialized partial) per study found in the batch instead of one element
    per instance, so the shuffle carries few, compact elements; and one state line per unit (its
    files read now and those reused from the previous run, ``folder_state``).
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

    def process(self, jobs):
        """``jobs``: (unit, listed items to read, ``FileEntry`` of its files not to read again)."""
        counts = Counter()
        items = [item for _, to_read, _ in jobs for item in to_read]
        remote = any(isinstance(path, str) and inputs.is_remote(path) for path, *_ in items)
        stamps = [inputs.stamp(*item) for item in items]  # before reading: a later change is seen
        outcomes = iter(zip(items, stamps, core.process_files(items, self.reader, self.pool if remote else None)))
        batch_partials: dict[str, dict] = {}
        read_instances = 0
        entry_of, source_key = folder_state.FileEntry, state.source_key
        for unit, to_read, reused in jobs:
            entries = list(reused)
            for item, stamp, outcome in islice(outcomes, len(to_read)):
                error = outcome.error
                read_instances += outcome.counts["instances_read"]
                record = None if error is not None else outcome.result.record
                entries.append(entry_of(source_key(item[0]), stamp, record, () if error is None else (error,),
                                        {k: v for k, v in sorted(outcome.counts.items()) if v}))
            entries.sort(key=_KEY)
            for part, whole in folder_state.unit_parts(entries):
                partials: dict[str, dict] = {}
                group_keys = []  # each file's group key (None: not an instance)
                for entry in part:
                    for name, count in entry.counts.items():  # (Counter.update costs more per file)
                        counts[name] += count
                    for error in entry.errors:
                        yield beam.pvalue.TaggedOutput(ERRORS, error)
                    group_keys.append(None if entry.record is None else add_partial(
                        partials, entry.record, entry.key, self.group_by, self.root, self.instance_keys))
                yield beam.pvalue.TaggedOutput(STATE, (layout.SOURCE_STATE_NAME,
                                                       folder_state.unit_line(unit, part, partials, whole, group_keys)))
                for key, groups in partials.items():  # (most units hold the batch's only part of a study)
                    merged = batch_partials.get(key)
                    batch_partials[key] = groups if merged is None else study.merge_directories([merged, groups])
        self.files.inc(len(items))
        self.instances.inc(read_instances)
        self.progress.add({"files_read": len(items), "instances_read": read_instances})
        for key in sorted(batch_partials):
            yield key, study.dump_groups(batch_partials[key])
        yield beam.pvalue.TaggedOutput(COUNTS, counts)

    def finish_bundle(self):
        self.progress.flush()

    def teardown(self):
        self.pool = self.reading = None  # shared with the process's other instances; ends with the last of them


def add_partial(partials: dict, record: dict, source_key: str, group_by: str, root: str, instance_keys) -> str:
    """Pre-aggregates the record of the file ``source_key`` into the partial groups of a batch, by
    study (or first-level folder); returns its group key."""
    if group_by == "directory":
        key = inputs.first_level_folder(state.key_path(source_key), root)
    else:
        key = record["StudyInstanceUID"]
    study.add_to_directory(partials.setdefault(key, {}), record, instance_keys)
    return key


class BatchJobsDoFn(beam.DoFn):
    """Unit jobs, or lists of them (``listing.ListFilesDoFn``'s) -> lists of jobs of about
    ``batch_size`` files to read each (so that a worker's reading pool has enough files in
    flight), flushed at the bundle's end."""

    def __init__(self, batch_size: int = PATHS_PER_BATCH):
        self.batch_size = batch_size

    def start_bundle(self):
        self.jobs, self.files = [], 0

    def process(self, element):
        jobs = element if isinstance(element, list) else (element,)
        self.jobs.extend(jobs)
        self.files += sum(max(1, len(job[1])) for job in jobs)
        if self.files >= self.batch_size:
            yield self.jobs
            self.start_bundle()

    def finish_bundle(self):
        if self.jobs:
            yield GlobalWindows.windowed_value(self.jobs)
        self.start_bundle()


def unit_items(batch) -> list[tuple[str, list]]:
    """A listed batch -> (unit, its items in the batch) pairs."""
    units: dict[str, list] = {}
    for item in batch:
        units.setdefault(folder_state.unit_of(state.source_key(item[0])), []).append(item)
    return sorted(units.items())


class ListedUnits(beam.PTransform):
    """What ``listing.ListInputFiles`` listed -> unit jobs (unit, its files to read, nothing reused)
    for a full run: the lists of jobs of the units the lister saw whole as they are, and one job
    per unit of the other files, joined by unit."""

    def expand(self, listed):
        jobs, loose = listed  # jobs: the listing steps' lists of jobs (a tuple of collections)
        joined = (loose
                  | "ByUnit" >> beam.FlatMap(unit_items)
                  | "Units" >> beam.GroupByKey()
                  | "Job" >> beam.MapTuple(lambda unit, parts: (unit, [item for part in parts for item in part], ())))
        # One Flatten straight into the Reshuffle that spreads the jobs: the in-process runner then
        # holds the listed paths once, in the shuffle, not again in a Flatten's buffer.
        return (*jobs, joined) | "AllJobs" >> beam.Flatten() | "Spread" >> beam.Reshuffle()


class ReadHeaders(beam.PTransform):
    """Unit jobs -> (group key, serialized partial groups), file errors, counts, state lines (one per unit)."""

    def __init__(self, use_fast_reader: bool = True, group_by: str = "study", root: str = "",
                 progress: ProgressSettings | None = None, read_concurrency: int = DEFAULT_READ_CONCURRENCY,
                 max_header_bytes: int = MAX_HEADER_BYTES, retry_deadline: float | None = None):
        super().__init__()
        self.dofn = ReadHeaderDoFn(use_fast_reader, group_by, root, progress, read_concurrency, max_header_bytes,
                                   retry_deadline)

    def expand(self, jobs):
        results = (jobs
                   | "Batch" >> beam.ParDo(BatchJobsDoFn())
                   | "ReadHeader" >> beam.ParDo(self.dofn).with_outputs(ERRORS, COUNTS, STATE, main="partials"))
        return results.partials, results[ERRORS], results[COUNTS], results[STATE]
