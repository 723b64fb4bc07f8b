"""The writer's external sort gives the files an in-memory sort gives, byte for byte: shards by a
hash of each line, lines sorted, empty shards written; in rounds when there are many runs; runs of
a retried bundle (the same content) under the same name; the deletions Bundle as orjson indents it.
Also through Beam, with a run budget small enough that every bundle writes many runs."""
from __future__ import annotations

import random
import zlib

import apache_beam as beam
import orjson
import pytest

from beam_pipeline.run import delta, external_sort, output, writing
from beam_pipeline.run.pipeline import local_runner


def random_lines(rng: random.Random, count: int) -> list[str]:
    words = ["a", "b", "é", "z", "{", "\"", "ü", "日本", "0", "9", " "]
    return [orjson.dumps({"k": "".join(rng.choice(words) for _ in range(rng.randint(0, 12)))}).decode()
            for _ in range(count)] + ['{"k":"dup"}'] * 3


def expected_files(name: str, lines: list[str]) -> dict[str, bytes]:
    """What the in-memory writer wrote: shard count from the characters, shard from crc32, sorted."""
    total = output.shard_count(sum(len(line) + 1 for line in lines))
    shards = {output.shard_name(name, index, total): [] for index in range(total)}
    for line in lines:
        index = zlib.crc32(line.encode()) % total if total > 1 else 0
        shards[output.shard_name(name, index, total)].append(line)
    return {relative: "".join(line + "\n" for line in sorted(group)).encode() for relative, group in shards.items()}


def written(temp, files) -> dict[str, bytes]:
    return {relative: (temp / relative.replace("/", "--")).read_bytes() for _, relative, _ in files}


@pytest.mark.parametrize("runs, fan_in", [(1, 64), (7, 64), (40, 4)])
def test_merged_runs_give_the_in_memory_sort_files_in_several_shards(tmp_path, monkeypatch, runs, fan_in):
    rng = random.Random(runs)
    lines = random_lines(rng, 3000)
    monkeypatch.setattr(output, "SHARD_BYTES", 9000)  # several shards
    monkeypatch.setattr(external_sort, "FAN_IN", fan_in)
    shuffled = lines[:]
    rng.shuffle(shuffled)
    described = []
    for part in range(runs):
        chunk = shuffled[part::runs]
        described.append(external_sort.write_run(str(tmp_path), "ImagingStudy", [line.encode() for line in chunk],
                                                 sum(len(line) + 1 for line in chunk)))
    files = external_sort.merge_into_shards(str(tmp_path), "ImagingStudy", described)
    expected = expected_files("ImagingStudy", lines)
    assert len(expected) > 3
    assert written(tmp_path, files) == expected
    assert sum(count for _, _, count in files) == len(lines)


def test_a_retried_bundle_writes_the_same_run_file(tmp_path):
    lines = [b'{"b":1}', b'{"a":2}']
    first = external_sort.write_run(str(tmp_path), "_delta/Patient", list(lines), 16)
    again = external_sort.write_run(str(tmp_path), "_delta/Patient", list(reversed(lines)), 16)
    assert first == again
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [first.path.rsplit("/", 1)[-1]]


@pytest.mark.parametrize("keys", [[], ["Device/b", "ImagingStudy/a", "Device/b", "Patient/ü"]])
def test_the_deletions_bundle_is_written_as_orjson_indents_it(tmp_path, keys):
    runs = [external_sort.write_run(str(tmp_path), "_delta/deletions.json", [key.encode()], 1) for key in keys]
    name, relative, count = external_sort.write_deletions(str(tmp_path), runs)
    bundle = delta.deletions_bundle(keys)
    assert (tmp_path / relative.replace("/", "--")).read_bytes() == orjson.dumps(bundle, option=orjson.OPT_INDENT_2) + b"\n"
    assert count == len(bundle.get("entry", ()))


def test_the_beam_writer_with_a_tiny_run_budget_writes_the_same_files(tmp_path, monkeypatch):
    rng = random.Random(3)
    named = [("ImagingStudy", line) for line in random_lines(rng, 1500)] + [("errors", '{"reason":"x"}')]
    monkeypatch.setattr(output, "SHARD_BYTES", 12000)
    monkeypatch.setattr(external_sort, "RUN_BYTES", 2000)  # read when the DoFn is made
    with beam.Pipeline(runner=local_runner(beam.options.pipeline_options.PipelineOptions())) as pipeline:
        files = (pipeline | beam.Create(named) | writing.WriteNdjson(str(tmp_path))
                 | beam.combiners.ToList())
        files | beam.Map(lambda got: (tmp_path / "files.json").write_bytes(orjson.dumps(got)))
    got = [tuple(entry) for entry in orjson.loads((tmp_path / "files.json").read_bytes())]
    assert len(list((tmp_path / "runs").iterdir())) > 10  # the budget made many runs
    expected = expected_files("ImagingStudy", [line for name, line in named if name == "ImagingStudy"])
    expected.update(expected_files("errors", ['{"reason":"x"}']))
    assert written(tmp_path, got) == expected
