"""Step 1: list the input files and spread them, in batches, over the workers."""
from __future__ import annotations

import os
import pickle
import typing
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from beam_pipeline.run import core, folder_state, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.steps import COUNTS, ERRORS, NAMESPACE, PATHS_PER_BATCH
from beam_pipeline.sources import files as inputs


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


class UnitListingsDoFn(beam.DoFn):
    """Listed batches -> (folder, [(unit, listing digest, files, encoded), ...]): per unit its files
    stamped now and encoded in one piece ((key, stamp, listed item) each), so that an unchanged
    unit's files are compared by the digest alone, never decoded. A folder's units are sent on
    when the listing moves to another folder (a local walk lists a folder's files together), the
    last at the bundle's end; a unit that comes in several pieces is joined, and its digest
    computed again, by ``nightly.ChooseUnitsDoFn``."""

    def start_bundle(self):
        self.folder, self.units = None, {}

    def process(self, batch):
        units, stamp, unit_of, unit_folder = self.units, inputs.stamp, folder_state.unit_of, folder_state.unit_folder
        for item in batch:
            key = state.source_key(item[0])
            unit = unit_of(key)
            folder = unit_folder(unit)
            if folder != self.folder:
                yield from self._flush()
                units = self.units
                self.folder = folder
            stamped = units.get(unit)
            if stamped is None:
                stamped = units[unit] = []
            stamped.append((key, stamp(*item), item))

    def finish_bundle(self):
        for element in self._flush():
            yield GlobalWindows.windowed_value(element)

    def _flush(self):
        units, self.units = self.units, {}
        if units:
            yield self.folder, [(unit, folder_state.listing_digest((key, stamp) for key, stamp, _ in stamped),
                                 len(stamped), pickle.dumps(stamped, protocol=pickle.HIGHEST_PROTOCOL))
                                for unit, stamped in sorted(units.items())]


class ListInputFiles(beam.PTransform):
    """Lists the input files and spreads them, in batches, over the workers: the pattern's root
    first (its own files and its parts: subfolders or sub-prefixes), then each part on any
    worker (a ``Reshuffle`` between), so that listing an archive is not one worker's serial step.
    ``by_unit`` (``--since``): folder units (``UnitListingsDoFn``) instead of batches, made where
    they are listed (the join by folder that follows spreads them)."""

    def __init__(self, input_path: str, exclude: str | None = None, batch_size: int = PATHS_PER_BATCH,
                 progress: ProgressSettings | None = None, retry_deadline: float | None = None,
                 by_unit: bool = False):
        super().__init__()
        self.by_unit = by_unit
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
        counts = (top[COUNTS], parts[COUNTS]) | "ListCounts" >> beam.Flatten()
        errors = (top[ERRORS], parts[ERRORS]) | "ListErrors" >> beam.Flatten()
        if self.by_unit:  # made before the Flatten, whose elements are held between stages, encoded
            units = (top.files | "TopUnits" >> beam.ParDo(UnitListingsDoFn()),
                     parts.files | "PartUnits" >> beam.ParDo(UnitListingsDoFn()))
            return units | "AllListed" >> beam.Flatten(), counts, errors
        batches = ((top.files, parts.files)
                   | "AllListed" >> beam.Flatten()
                   | "Spread" >> beam.Reshuffle())
        return batches, counts, errors
