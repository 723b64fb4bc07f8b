"""Step 5: write the lines into deterministic, sorted files in the run's temp folder."""
from __future__ import annotations

import apache_beam as beam
import orjson
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.run import delta, layout, output


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
