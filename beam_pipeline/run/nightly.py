"""Steps 1+2 starting from a previous run (``--since``): read only the files that changed, reuse
the others' records from the previous run's state."""
from __future__ import annotations

import pickle
import typing
from collections import Counter

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from beam_pipeline.codes import RESOURCE_TYPES, SHARED_TYPES
from beam_pipeline.fhir import study
from beam_pipeline.run import external_sort, folder_state, layout, output, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.reading import ReadHeaders
from beam_pipeline.run.steps import COUNTS, DROPPED, ERRORS, NAMESPACE, REUSED


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
                | "Shards" >> beam.Create(self.shards)  # spread over the workers when there are several
                | "Entries" >> beam.FlatMap(shard_entries, parse, key_of))


def shard_entries(path: str, parse, key_of, placed: bool = False):
    """A state shard's lines, read in order (a shard is at most ``output.SHARD_BYTES``), parsed;
    ``placed``: ``parse(line's bytes, (shard path, byte offset))``."""
    offset = 0
    with external_sort.open_read(path) as handle:
        for raw in handle:
            line = raw.rstrip(b"\n")
            if line:  # placed: the line's bytes (a unit line is parsed in part)
                entry = parse(line, (path, offset)) if placed else parse(line.decode("utf-8"))
                yield key_of(entry), entry
            offset += len(raw)


class ReadUnits(beam.PTransform):
    """Source shards of a previous run's state -> (folder, [``folder_state.Unit.plain()``, ...]):
    the heads of its unit lines (``folder_state.read_unit_line``), consecutive lines of one folder
    in one element (the lines are sorted: a folder's lines are together, but for odd names)."""

    def __init__(self, shards):
        super().__init__()
        self.shards = list(shards)

    def expand(self, pbegin):
        if not self.shards:
            return pbegin | "None" >> beam.Create([]).with_output_types(typing.Tuple[typing.Any, typing.Any])
        return (pbegin
                | "Shards" >> beam.Create(self.shards)  # spread over the workers when there are several
                | "Units" >> beam.FlatMap(folder_units))


def folder_units(path: str):
    folder, units = None, []
    for key, unit in shard_entries(path, folder_state.read_unit_line, lambda unit: unit.key, placed=True):
        here = folder_state.unit_folder(key)
        if here != folder and units:
            yield folder, units
            units = []
        folder = here
        units.append(unit.plain())
    if units:
        yield folder, units


class ChooseUnitsDoFn(beam.DoFn):
    """(folder, {"now": its listed units (``listing.UnitListingsDoFn``), "before": its previous units
    (``ReadUnits``)}) -> per unit, its lines to reuse (``reused``) when its listing digest is
    unchanged, else a job (unit, items to read, entries to reuse) and the checks of its previous
    lines (``dropped``: written anew): a file is read again when it is new, its stamp differs or
    is unknown, or it failed for a transient reason; a file no longer listed is gone."""

    def __init__(self, progress: ProgressSettings | None = None):
        self.progress_settings = progress

    def setup(self):
        self.progress = ProgressBeacon(self.progress_settings)

    def finish_bundle(self):
        self.progress.flush()

    def process(self, item):
        _, joined = item
        now: dict[str, list] = {}
        for listed in joined["now"]:
            for unit, digest, files, encoded in listed:
                now.setdefault(unit, []).append((digest, files, encoded))
        before: dict[str, list] = {}
        for units in joined["before"]:
            for plain in units:
                part = folder_state.Unit(*plain)
                before.setdefault(part.key, []).append(part)
        for unit in sorted(now.keys() | before.keys()):
            yield from self._choose(unit, now.get(unit, []),
                                    sorted(before.get(unit, []), key=lambda part: part.place))

    def _choose(self, unit: str, now: list, before: list):
        """``now``: (listing digest, files, encoded) of the unit's listed files; ``before``: the
        unit's previous lines (parts)."""
        counts = Counter()
        # every line of the unit is written anew unless the unit is reused whole
        dropped = [beam.pvalue.TaggedOutput(DROPPED, (layout.SOURCE_STATE_NAME, part.hash, None)) for part in before]
        if not now:
            counts["incremental:files_gone"] += sum(part.files for part in before)
            yield beam.pvalue.TaggedOutput(COUNTS, counts)
            yield from dropped
            return
        listed = sum(files for _, files, _ in now)
        stamped = None
        digest = now[0][0]
        if len(now) > 1:  # listed in pieces: the whole unit's digest
            stamped = [entry for _, _, encoded in now for entry in pickle.loads(encoded)]
            digest = folder_state.listing_digest((key, stamp) for key, stamp, _ in stamped)
        if before and _whole(before) and digest is not None and digest == before[0].digest:
            self.progress.add({"unchanged": listed})  # not to be read: the progress line's total
            yield from (beam.pvalue.TaggedOutput(REUSED, part) for part in before)
            yield beam.pvalue.TaggedOutput(COUNTS, Counter({"incremental:files_reused": listed}))
            return
        yield from dropped
        if stamped is None:
            stamped = pickle.loads(now[0][2])
        entries = {entry.key: entry for part in before for entry in part.entries()}
        to_read, reused = [], []
        for key, stamp, listed_item in stamped:
            entry = entries.pop(key, None)
            if entry is not None and entry.reusable(stamp):
                reused.append(entry)
                continue
            counts["incremental:files_read"] += 1
            counts["incremental:files_new" if entry is None else "incremental:files_changed_or_retried"] += 1
            to_read.append(listed_item)
        counts["incremental:files_reused"] += len(reused)
        counts["incremental:files_gone"] += len(entries)
        self.progress.add({"unchanged": len(reused)})
        yield unit, to_read, reused
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


def _whole(parts) -> bool:
    """The lines of a unit may be reused whole: all its parts are there, of one listing, and none
    holds a file to try again."""
    first = parts[0]
    return (first.digest is not None and len(parts) == first.parts
            and all(part.digest == first.digest and part.parts == first.parts and not part.retry for part in parts))


class ReuseUnitsDoFn(beam.DoFn):
    """Unchanged units -> what reading them gave (partial groups, counted but not loaded, error
    lines, counts): the outputs of ``ReadHeaderDoFn`` but the state line (kept in the state's
    file), without a look at their files."""

    def __init__(self):
        self.reused = Metrics.counter(NAMESPACE, "files_reused")

    def start_bundle(self):
        self.partials: dict[str, dict] = {}

    def process(self, unit):
        yield from (beam.pvalue.TaggedOutput(ERRORS, error) for error in unit.errors)
        yield beam.pvalue.TaggedOutput(COUNTS, Counter(unit.counts))
        self.reused.inc(unit.files)
        for key, groups in unit.light().items():
            self.partials[key] = study.merge_directories([self.partials.get(key, {}), groups])

    def finish_bundle(self):
        for key in sorted(self.partials):
            yield GlobalWindows.windowed_value((key, study.dump_groups(self.partials[key])))
        self.partials = {}


class ReadChangedHeaders(beam.PTransform):
    """Listed units (``listing.UnitListingsDoFn``) + the previous run's units -> the outputs of ``ReadHeaders``
    (errors and counts as tuples of collections) (the state lines
    of the units read) and the previous lines of the units written anew (``DROPPED``; the others'
    are kept from the previous state by ``KeepPreviousLines``): unchanged units are reused whole,
    and of the others only new, changed and transiently failed files are read."""

    def __init__(self, previous_units, read_headers: ReadHeaders, progress: ProgressSettings | None = None):
        super().__init__()
        self.progress = progress
        self.previous_units = previous_units
        self.read_headers = read_headers

    def expand(self, units):
        chosen = ({"now": units, "before": self.previous_units}
                  | "JoinState" >> beam.CoGroupByKey()
                  | "Choose" >> beam.ParDo(ChooseUnitsDoFn(self.progress)).with_outputs(
                      REUSED, COUNTS, DROPPED, main="read"))
        # the units to read are spread by the join already
        partials, errors, counts, state_lines = chosen.read | "ReadHeaders" >> self.read_headers
        reused = chosen[REUSED] | "Reuse" >> beam.ParDo(ReuseUnitsDoFn()).with_outputs(
            ERRORS, COUNTS, main="partials")
        return ((partials, reused.partials) | "AllPartials" >> beam.Flatten(),
                (errors, reused[ERRORS]),  # flattened with the run's others once (a Flatten is a stage)
                (counts, reused[COUNTS], chosen[COUNTS]),
                state_lines, chosen[DROPPED])


def keep_previous_lines(name: str, folder: str, dropped) -> list[external_sort.Run]:
    """``name``'s shards in the previous output ``folder`` as sorted runs (a shard is sorted) for
    the writer's merge, less the lines of ``dropped`` ((name, line hash, key) of the studies
    rebuilt or gone, or (name, check, None) of the units written anew; each drops one line): the
    merge reads the shard itself, skipping those lines. So what is reused reaches the output
    without passing through the pipeline, and without a copy. A resource line is hashed only when
    its key (read from its start) is one of a dropped line's."""
    drops = Counter(line_hash for dropped_name, line_hash, _ in dropped if dropped_name == name)
    keys = {key for dropped_name, _, key in dropped if dropped_name == name}
    state_lines = name == layout.SOURCE_STATE_NAME  # a state line has its check: no hash needed
    matched = FileSystems.match([output.shard_pattern(folder, name)])[0].metadata_list
    runs = []
    for shard in sorted(m.path for m in matched):
        lines = size = 0
        skip = []
        with external_sort.open_read(shard) as source:
            for index, line in enumerate(source):  # each line with its newline (not copied without it)
                ended = line.endswith(b"\n")
                if drops:
                    if state_lines:
                        digest = _check(line, ended)
                    else:
                        key = state.line_key_of_bytes(line)
                        digest = state.line_hash(line[:-1] if ended else line) if key is None or key in keys else None
                    if drops[digest]:
                        drops[digest] -= 1
                        skip.append(index)
                        continue
                lines += 1
                # characters and the newline, as the writer counts them
                size += (len(line) if line.isascii() else len(line.decode("utf-8"))) + (not ended)
        if lines:
            runs.append(external_sort.Run(name, shard, lines, size, tuple(skip)))
    return runs


def _check(line: bytes, ended: bool = False) -> str:
    """A state line's check, as written (verified when the line was read: ``folder_state.read_unit_line``);
    ``ended``: the line ends with its newline."""
    end = len(line) - 2 - ended
    return line[end - 16:end].decode("ascii", "replace")  # a copy of 16 bytes, whatever the line's size


# The names whose lines are all built by studies (shared resources are written once per run, anew).
STUDY_NAMES = tuple(name for name in RESOURCE_TYPES if name not in SHARED_TYPES)


class KeepPreviousLines(beam.PTransform):
    """The dropped lines ((name, hash, key) of the studies rebuilt or gone, of the units written
    anew) -> sorted runs (``external_sort.Run``) of the lines of the previous output's ``names``
    that this output keeps: one step for every name, with the dropped lines as its side input."""

    def __init__(self, folder: str, names):
        super().__init__()
        self.folder = folder
        self.names = sorted(names)

    def expand(self, dropped):
        return (dropped.pipeline
                | "Names" >> beam.Create(self.names, reshuffle=False)  # each a scan of its shards, quick
                | "Keep" >> beam.FlatMap(keep_previous_lines, self.folder, beam.pvalue.AsList(dropped)))


def run_lines(run: external_sort.Run):
    """(name, line) of a run's lines."""
    for line in external_sort.run_lines(run):
        yield run.name, line.decode("utf-8")
