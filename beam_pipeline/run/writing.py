"""Step 5: write the lines into deterministic, sorted files in the run's temp folder, in bounded
memory (an external sort: ``external_sort``)."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from beam_pipeline.run import external_sort
from beam_pipeline.run.layout import DELETIONS_NAME

# What a held line costs beyond its bytes (the list slot, the bytes object's header).
LINE_OVERHEAD = 64


class WriteRunsDoFn(beam.DoFn):
    """(name, line) -> ``external_sort.Run`` descriptions: the lines of a bundle, per name, sorted into
    run files of at most ``RUN_BYTES`` (written when the budget is reached and at the bundle's end,
    so a run holds only lines of its own bundle)."""

    def __init__(self, temp_dir: str, run_bytes: int | None = None):
        self.temp_dir = temp_dir
        self.run_bytes = run_bytes or external_sort.RUN_BYTES

    def start_bundle(self):
        self.lines: dict[str, list[bytes]] = {}
        self.sizes: dict[str, int] = {}
        self.held = 0

    def process(self, item):
        name, line = item
        data = line.encode("utf-8")
        self.lines.setdefault(name, []).append(data)
        self.sizes[name] = self.sizes.get(name, 0) + len(line) + 1
        self.held += len(data) + LINE_OVERHEAD
        if self.held >= self.run_bytes:
            yield from self._spill()

    def finish_bundle(self):
        for run in self._spill():
            yield GlobalWindows.windowed_value(run)

    def _spill(self):
        runs = [external_sort.write_run(self.temp_dir, name, lines, self.sizes[name])
                for name, lines in sorted(self.lines.items())]
        self.start_bundle()
        return runs


class _InTempDir(beam.PTransform):
    """A writing transform: its files go to the run's temp folder (``output.temp_dir``)."""

    def __init__(self, temp_dir: str):
        super().__init__()
        self.temp_dir = temp_dir


class SortedRuns(_InTempDir):
    """(name, line) -> sorted run files (``external_sort.Run``), written by a DoFn fused with the step
    that makes the lines: the lines are not held between stages, only the runs' descriptions."""

    def expand(self, named_lines):
        return named_lines | "SortedRuns" >> beam.ParDo(WriteRunsDoFn(self.temp_dir))


class MergeRuns(_InTempDir):
    """Runs (of any number of ``SortedRuns``) -> each name's shard files, one merge per name;
    returns (name, relative path, line count) of every file written."""

    def expand(self, runs):
        temp_dir = self.temp_dir
        return (runs
                | "ByName" >> beam.Map(lambda run: (run.name, run))
                | "RunsPerName" >> beam.GroupByKey()
                | "MergeRuns" >> beam.FlatMapTuple(
                    lambda name, runs: external_sort.merge_into_shards(temp_dir, name, sorted(runs, key=_order))))


class WriteNdjson(_InTempDir):
    """(name, line) -> files named by ``output.shard_name`` (resource types at the top,
    ``bundles/``, ``_report/``, ``_state/``, ``_delta/``); returns (name, relative path, line count)
    of every file written.

    Deterministic, unlike ``fileio.WriteToFiles`` (whose files follow the runner's bundles): a
    name's file count follows from the size of its lines, a line's file from a hash of it, and each
    file is written sorted. So re-runs, engines, worker counts and an incremental run write the
    same bytes as a full run. Lines go to sorted run files as they come (``SortedRuns``); one merge
    per name writes its shards (``MergeRuns``). A pipeline with several sources of lines gives each
    its own ``SortedRuns`` and merges all their runs at once.
    """

    def expand(self, named_lines):
        return (named_lines
                | "Runs" >> SortedRuns(self.temp_dir)
                | "Merge" >> MergeRuns(self.temp_dir))


def _order(run: external_sort.Run) -> tuple:
    return run.path, run.lines


class WriteDeletions(_InTempDir):
    """Deleted keys -> ``_delta/deletions.json``, one transaction Bundle (written even when empty,
    so a nightly loader can always post it); returns the written file as ``WriteNdjson`` does."""

    def expand(self, keys):
        temp_dir = self.temp_dir
        runs = (keys
                | "Named" >> beam.Map(lambda key: (DELETIONS_NAME, key))
                | "SortedRuns" >> beam.ParDo(WriteRunsDoFn(temp_dir)))
        # once, with every run as a side input (no combine: it costs the local runner two stages)
        return (keys.pipeline
                | "Once" >> beam.Create([DELETIONS_NAME])
                | "Write" >> beam.Map(lambda _, runs: external_sort.write_deletions(temp_dir, sorted(runs, key=_order)),
                                      beam.pvalue.AsList(runs)))
