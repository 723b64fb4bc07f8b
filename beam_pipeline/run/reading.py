"""Step 2: read the headers of a batch of files and pre-aggregate their instances per study."""
from __future__ import annotations

import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES
from beam_pipeline.fhir import keywords, study
from beam_pipeline.run import core, layout, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.settings import DEFAULT_READ_CONCURRENCY
from beam_pipeline.run.steps import COUNTS, ERRORS, NAMESPACE, STATE
from beam_pipeline.sources import files as inputs
from beam_pipeline.sources.retry import AdaptiveLimit


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
