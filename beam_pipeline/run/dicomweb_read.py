"""Steps 1+2 for a PACS: list studies over DICOMweb, fetch each study's headers on the workers."""
from __future__ import annotations

import logging
import typing
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipeline.fhir import keywords, study
from beam_pipeline.run import core, layout, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.steps import COUNTS, ERRORS, NAMESPACE, PATHS_PER_BATCH, REUSED, STATE
from beam_pipeline.sources.retry import RetryBudget


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
            yield beam.pvalue.TaggedOutput(REUSED, previous)
            yield beam.pvalue.TaggedOutput(COUNTS, Counter({"incremental:studies_not_fetched": 1}))
            return
        yield uid, stamp
        yield beam.pvalue.TaggedOutput(COUNTS, Counter({
            "incremental:studies_fetched": 1,
            "incremental:studies_new" if previous is None else "incremental:studies_changed_or_retried": 1}))


@beam.typehints.with_output_types(typing.Tuple[str, bytes])
class ReuseSourcesDoFn(beam.DoFn):
    """Batches of previous source entries (one per study) -> what fetching them gave (partial
    groups, error lines, counts) and their state lines, unchanged: the same outputs as
    ``FetchStudiesDoFn``."""

    def __init__(self):
        self.reused = Metrics.counter(NAMESPACE, "studies_reused")

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
            for record in records:
                study.add_to_directory(partials.setdefault(record["StudyInstanceUID"], {}), record, self.instance_keys)
        self.reused.inc(len(entries))
        for key in sorted(partials):
            yield key, study.dump_groups(partials[key])
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


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
                          REUSED, COUNTS, main="fetch"))
            once = chosen.fetch
            reused = (chosen[REUSED]
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
