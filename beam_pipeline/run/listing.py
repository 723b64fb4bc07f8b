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
# Parts go to the workers in groups: an archive of many small top-level folders (patients of a
# few studies each) is a few hundred listing work items, not one per folder, each of which the
# Reshuffle and the steps after it carry; and at least PART_SPREAD items when there are as many
# parts, at most MAX_GROUP_PARTS parts an item, so that a big archive's listing stays spread.
PART_SPREAD = 256
MAX_GROUP_PARTS = 64


def part_groups(parts: list) -> list[list]:
    """The parts of a listing in consecutive groups, one listing work item each (``PART_SPREAD``)."""
    size = min(MAX_GROUP_PARTS, max(1, len(parts) // PART_SPREAD))
    return [parts[start:start + size] for start in range(0, len(parts), size)]


LOOSE = "loose"  # listed items whose unit the lister may not see whole (``ListFilesDoFn``)


@beam.typehints.with_output_types(typing.List[typing.Any])
class ListFilesDoFn(beam.DoFn):
    """The input pattern (``top``), or a group of its parts -> batches of (path, size, version), one
    per file; the count as data; with ``top``, the groups of parts to list next (to the ``parts``
    output, ``part_groups``).

    ``jobs`` (a full run): instead of batches of files, lists of unit jobs of about ``batch_size``
    files ((unit, its files, ()), what ``reading.ReadHeaders`` reads) for the units the lister
    sees whole: a local walk lists a folder's files together (``files.PartLister.folders``). The
    root's own files are whole too. The others' files go, in batches, to the ``loose`` output, to
    be joined by unit (``reading.ListedUnits``): the parts of gs:// (a part's listing is sorted by
    full name: a folder's files are not together), names that are not valid UTF-8 (their units
    span folders), and a folder's units that a subfolder which cannot be listed (a "file" of the
    folder, listed later) could join.

    Batched here rather than by ``BatchElements``: one element per file through an extra step
    costs the local runners more than reading a small header does. A part that cannot be listed
    (a list page still failing past the retry deadline, a refusal) is one error line and counts
    as one matched entry, as a local folder that cannot be listed does; the group's other parts
    are listed.
    """

    def __init__(self, exclude: str | None = None, progress: ProgressSettings | None = None,
                 batch_size: int = PATHS_PER_BATCH, top: bool = True, retry_deadline: float | None = None,
                 jobs: bool = False):
        self.exclude = exclude
        self.retry_deadline = retry_deadline
        self.batch_size = batch_size
        self.progress_settings = progress
        self.top = top
        self.jobs = jobs
        self.listed = Metrics.counter(NAMESPACE, "files_listed")
        self.parts = Metrics.counter(NAMESPACE, "listing_parts_done")

    def setup(self):
        self.progress = ProgressBeacon(self.progress_settings)
        self.lister = None  # (pattern, its files.PartLister), made by the first group

    def start_bundle(self):
        # What the bundle's elements list, batched together (a group of small parts fills no
        # batch alone), and their counts: sent on when full, the rest at the bundle's end.
        self.out, self.counts = _Batches(self.batch_size, self.jobs), Counter()

    def process(self, element):
        if self.top:
            pattern = os.fsdecode(element)  # bytes when the input's own path is not valid UTF-8
            yield from self._list(element, self._top(element, pattern))
            done = 1
        else:
            raw_pattern, parts = element
            lister = self._lister(os.fsdecode(raw_pattern))
            for part in parts:
                yield from self._list(part, _unit_pieces(lister, part) if self.jobs and not lister.remote
                                      else lister.files(part))
            done = len(parts)
        self.parts.inc(done)
        self.progress.add({"parts_listed": done}, force=True)

    def finish_bundle(self):
        for output in self.out.flush():
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)
        if self.counts:
            yield beam.pvalue.TaggedOutput(COUNTS, GlobalWindows.windowed_value(self.counts))
        self.start_bundle()

    def _list(self, where, pieces):
        """Adds the listed ``pieces`` (items, or (unit, items) of a whole unit) to the bundle's
        batches, sending on what is full; counts their files."""
        count = reported = 0
        try:
            for piece in pieces:
                if isinstance(piece, beam.pvalue.TaggedOutput):
                    yield piece
                    continue
                count += self.out.add(piece)
                if self.out.full:
                    yield from self.out.flush(everything=False)
                    self._listed(count - reported)
                    reported = count
        except OSError as exc:  # SourceUnavailable (a list page past the deadline), a refusal
            failed = core.listing_failure(where, exc)
            yield beam.pvalue.TaggedOutput(ERRORS, failed.error)
            self.counts.update(failed.counts)
        self._listed(count - reported)
        self.counts["files_matched"] += count

    def _listed(self, files: int) -> None:
        self.listed.inc(files)
        self.progress.add({"files_listed": files})

    def _lister(self, pattern: str) -> inputs.PartLister:
        if self.lister is None or self.lister[0] != pattern:
            self.lister = pattern, inputs.PartLister(pattern, self.exclude, self.retry_deadline)
        return self.lister[1]

    def _top(self, element, pattern):
        """The root's own files, its groups of parts sent on (tagged) first."""
        files, parts = inputs.list_top(pattern, self.exclude, self.retry_deadline)
        self.progress.add({"listing_parts": len(parts) + 1}, force=True)
        for group in part_groups(parts):
            yield beam.pvalue.TaggedOutput(PARTS, (element, group))
        if not self.jobs:
            yield from files
        else:  # all of the root's own files: on gs://, no part's file has their folder
            yield from _folder_pieces(files, [] if inputs.is_remote(pattern) else parts)


class _Batches:
    """What a listing bundle sends on: batches of listed items (to the main output, or with
    ``jobs`` to ``LOOSE``), and with ``jobs`` lists of whole units' jobs; each of about
    ``batch_size`` files (``full`` when one is), a unit never split."""

    def __init__(self, batch_size: int, jobs: bool):
        self.batch_size = batch_size
        self.jobs = jobs
        self.items, self.units, self.unit_files = [], [], 0
        self.full = False

    def add(self, piece) -> int:
        """An item, or (unit, its items); how many files it adds."""
        if isinstance(piece[1], list):
            self.units.append((piece[0], piece[1], ()))
            self.unit_files += len(piece[1])
            self.full = self.full or self.unit_files >= self.batch_size
            return len(piece[1])
        self.items.append(piece)
        self.full = self.full or len(self.items) >= self.batch_size
        return 1

    def flush(self, everything: bool = True):
        """The batches to send on: the full ones, or ``everything``."""
        if self.items and (everything or len(self.items) >= self.batch_size):
            items, self.items = self.items, []
            yield beam.pvalue.TaggedOutput(LOOSE, items) if self.jobs else items
        if self.units and (everything or self.unit_files >= self.batch_size):
            units, self.units, self.unit_files = self.units, [], 0
            yield units
        self.full = False


def _unit_pieces(lister: inputs.PartLister, part):
    """A local part's listing for ``ListFilesDoFn(jobs=True)``: (unit, its items) of each unit it
    sees whole, and the other files' items (see there)."""
    for paths, subfolders in lister.folders(part):
        items = [(path, None, None) for path in paths]
        if subfolders is None:  # a folder that cannot be listed: a "file" of its parent
            yield from items
        else:
            yield from _folder_pieces(items, subfolders)


def _folder_pieces(items: list, subfolders: list):
    """The listed items of one folder (all its files) -> (unit, its items) of each of its units,
    but the items of a unit that one of its ``subfolders`` could join (listed later as a "file"
    when it cannot be listed), and of names that are not valid UTF-8 (their units span folders),
    one by one."""
    source_key, unit_of = state.source_key, folder_state.unit_of
    joinable = {unit_of(source_key(folder if isinstance(folder, bytes) else inputs.portable(folder)))
                for folder in subfolders}
    units: dict[str, list] = {}
    for item in items:
        path = item[0]
        unit = None if isinstance(path, bytes) else unit_of(path)  # a str path is its key
        if unit is None or unit in joinable:
            yield item
        else:
            listed = units.get(unit)
            if listed is None:
                listed = units[unit] = []
            listed.append(item)
    yield from units.items()


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
    """Lists the input files and spreads them over the workers: the pattern's root first (its own
    files and its parts: subfolders or sub-prefixes), then each group of parts (``part_groups``)
    on any worker (a ``Reshuffle`` between), so that listing an archive is not one worker's
    serial step. A full run: (lists of unit jobs, spread; batches of the files whose units are
    joined after, ``ListFilesDoFn``), for ``reading.ListedUnits``.
    ``by_unit`` (``--since``): folder units (``UnitListingsDoFn``) instead, made where they are
    listed (the join by folder that follows spreads them)."""

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
        jobs = not self.by_unit
        top = (pbegin
               | "Pattern" >> beam.Create([inputs.portable(inputs.resolve_pattern(self.input_path))])
               | "ListTop" >> beam.ParDo(ListFilesDoFn(self.exclude, self.progress, self.batch_size,
                                                      retry_deadline=self.retry_deadline, jobs=jobs))
               .with_outputs(COUNTS, ERRORS, PARTS, LOOSE, main="files"))
        parts = (top[PARTS]
                 | "SpreadParts" >> beam.Reshuffle()
                 | "ListParts" >> beam.ParDo(ListFilesDoFn(self.exclude, self.progress, self.batch_size, top=False,
                                                         retry_deadline=self.retry_deadline, jobs=jobs))
                 .with_outputs(COUNTS, ERRORS, LOOSE, main="files"))
        counts = (top[COUNTS], parts[COUNTS]) | "ListCounts" >> beam.Flatten()
        errors = (top[ERRORS], parts[ERRORS]) | "ListErrors" >> beam.Flatten()
        if self.by_unit:  # made before the Flatten, whose elements are held between stages, encoded
            units = (top.files | "TopUnits" >> beam.ParDo(UnitListingsDoFn()),
                     parts.files | "PartUnits" >> beam.ParDo(UnitListingsDoFn()))
            return units | "AllListed" >> beam.Flatten(), counts, errors
        # Not flattened nor spread here: ``reading.ListedUnits`` flattens them with the joined units
        # into its one Reshuffle (a Flatten feeding a later Flatten would hold every path twice).
        loose = (top[LOOSE], parts[LOOSE]) | "AllLoose" >> beam.Flatten()
        return ((top.files, parts.files), loose), counts, errors
