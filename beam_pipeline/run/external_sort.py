"""The writer's external sort: sorted run files, then their streaming merge into the output's shards.

A writer holds at most ``RUN_BYTES`` of lines, sorts them and writes them as a *run* file into the
run's temp folder, named by its name and a hash of its content (a retried bundle writes the same
file again, under the same name, whole or not at all). The runs' descriptions travel on as
elements, so only runs of committed bundles are merged. The merge reads its runs line by line
(``heapq.merge``), which gives exactly the lines ``sorted`` would, and sends each line to its shard
(``output.shard_of``): the files are those an in-memory sort writes, byte for byte.
"""
from __future__ import annotations

import hashlib
import heapq
import uuid
from dataclasses import dataclass

import orjson
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.run import output
from beam_pipeline.run.layout import DELETIONS_NAME
from beam_pipeline.sources.files import is_remote

RUN_BYTES = 8 * 1024 * 1024  # line bytes a writer holds before it writes a run (several writers share a stage)
RUNS_DIR = "runs"
# Runs merged at once: each open run holds a read buffer (16 MiB for gs://), so more runs are
# merged in rounds.
FAN_IN = 64
REMOTE_FAN_IN = 8
WRITE_LINES = 4096  # lines per write call at most
WRITE_BYTES = 1024 * 1024  # line bytes per write call at most (a large study's line is some 100 KB)
WRITE_ALONE = 64 * 1024  # a line (with its newline) this long is written in a call of its own


@dataclass(frozen=True)
class Run:
    """A run file: its name (``manifest.json``'s, e.g. ``ImagingStudy``), path, lines, and the
    size its lines count for in the shard count (characters + newline, as ``output.shard_count``)."""

    name: str
    path: str
    lines: int
    size: int
    skip: tuple = ()  # indices of the file's lines not in the run (a previous output's shard, ``--since``)


def _file_name(name: str) -> str:
    return name.replace("/", "--")


def write_run(temp_dir: str, name: str, lines: list[bytes], size: int) -> Run:
    """Sorts ``lines`` (UTF-8, no newline) and writes them as one run file; returns its description.

    Written in chunks, hashed as they go (no copy of the whole run is made), under a unique name,
    then renamed to its content's name: a reader never sees a partial run, whichever attempt of a
    bundle wrote it last."""
    lines.sort()
    digest = hashlib.sha256()
    partial = FileSystems.join(temp_dir, RUNS_DIR, f"{_file_name(name)}-{uuid.uuid4().hex}.partial")
    with FileSystems.create(partial, mime_type="application/octet-stream") as out:
        for chunk, _ in _chunks(lines):
            digest.update(chunk)
            out.write(chunk)
    path = FileSystems.join(temp_dir, RUNS_DIR, f"{_file_name(name)}-{digest.hexdigest()[:32]}.run")
    FileSystems.rename([partial], [path])
    return Run(name, path, len(lines), size)


READ_BUFFER = 1024 * 1024  # a local file's read buffer: a line of some 100 KB is found in it, copied once


def open_read(path: str):
    """A file to read line by line: a local one with a buffer of ``READ_BUFFER`` (Beam's default,
    8 KB, makes a long line's read several copies), others through Beam's file systems."""
    if is_remote(path):
        return FileSystems.open(path, mime_type="application/octet-stream")
    return open(path, "rb", buffering=READ_BUFFER)


def _lines(path: str, skip=(), newline: bool = False):
    skip = set(skip)
    with open_read(path) as handle:
        for index, line in enumerate(handle):
            if index not in skip:
                if newline:
                    yield line if line.endswith(b"\n") else line + b"\n"
                else:
                    yield line[:-1] if line.endswith(b"\n") else line


def run_lines(run: Run, newline: bool = False):
    """The lines of a run (UTF-8; without their newline, or with it), in order."""
    return _lines(run.path, run.skip, newline)


def merged(temp_dir: str, runs: list[Run], newline: bool = False):
    """The lines of ``runs`` in sorted order, read line by line (in rounds when there are many).

    ``newline``: each line with its newline, which the merge then neither strips nor adds back
    (a copy less of every line). The order is the same: a line (JSON) holds no byte below the
    newline's (control characters are escaped)."""
    fan_in = REMOTE_FAN_IN if is_remote(temp_dir) else FAN_IN
    while len(runs) > fan_in:
        grouped = [runs[start:start + fan_in] for start in range(0, len(runs), fan_in)]
        runs = [_merge_to_run(temp_dir, group) for group in grouped]
    return heapq.merge(*(run_lines(run, newline) for run in runs))


def _merge_to_run(temp_dir: str, runs: list[Run]) -> Run:
    path = FileSystems.join(temp_dir, RUNS_DIR, f"merged-{uuid.uuid4().hex}.run")
    with FileSystems.create(path, mime_type="application/octet-stream") as out:
        count = _write_lines(out, heapq.merge(*(run_lines(run, newline=True) for run in runs)))
    return Run(runs[0].name, path, count, sum(run.size for run in runs))


def _chunks(lines, ended: bool = False):
    """(bytes to write, their line count): lines (``ended``: each with its newline) joined by at
    most WRITE_LINES and WRITE_BYTES, each followed by a newline."""
    chunk, held = [], 0
    for line in lines:
        if ended and len(line) >= WRITE_ALONE:  # written as it is: no copy into a chunk
            if chunk:
                yield _joined(chunk, ended), len(chunk)
                chunk, held = [], 0
            yield line, 1
            continue
        chunk.append(line)
        held += len(line)
        if held >= WRITE_BYTES or len(chunk) == WRITE_LINES:
            yield _joined(chunk, ended), len(chunk)
            chunk, held = [], 0
    if chunk:
        yield _joined(chunk, ended), len(chunk)


def _joined(chunk: list[bytes], ended: bool) -> bytes:
    if ended:
        return b"".join(chunk)
    chunk.append(b"")  # the last line's newline, in the one join
    return b"\n".join(chunk)


def _write_lines(out, lines) -> int:
    """Writes lines that end with their newline; returns their count."""
    count = 0
    for chunk, lines_in_chunk in _chunks(lines, ended=True):
        out.write(chunk)
        count += lines_in_chunk
    return count


def merge_into_shards(temp_dir: str, name: str, runs: list[Run]) -> list[tuple[str, str, int]]:
    """Merges a name's runs into its shard files (every shard, empty ones too) in the temp folder;
    returns (name, path relative to the output folder, line count) of each."""
    total = output.shard_count(sum(run.size for run in runs))
    relatives = [output.shard_name(name, index, total) for index in range(total)]
    mime = "application/fhir+ndjson" if relatives[0].endswith(".ndjson") else "application/jsonl"
    outs = [FileSystems.create(FileSystems.join(temp_dir, _file_name(relative)), mime_type=mime)
            for relative in relatives]
    counts = [0] * total
    try:
        if total == 1:
            counts[0] = _write_lines(outs[0], merged(temp_dir, runs, newline=True))
        else:
            chunks = [[] for _ in range(total)]
            held = [0] * total  # bytes in each shard's chunk: the shards together hold WRITE_BYTES at most
            for line in merged(temp_dir, runs, newline=True):
                shard = output.shard_of(memoryview(line)[:-1], total)  # of the line without its newline
                chunk = chunks[shard]
                chunk.append(line)
                held[shard] += len(line)
                if held[shard] * total >= WRITE_BYTES or len(chunk) == WRITE_LINES:
                    outs[shard].write(b"".join(chunk))
                    counts[shard] += len(chunk)
                    chunk.clear()
                    held[shard] = 0
            for shard, chunk in enumerate(chunks):
                if chunk:
                    outs[shard].write(b"".join(chunk))
                    counts[shard] += len(chunk)
    finally:
        for out in outs:
            out.close()
    return [(name, relative, count) for relative, count in zip(relatives, counts)]


def write_deletions(temp_dir: str, runs: list[Run]) -> tuple[str, str, int]:
    """The deleted keys' runs -> ``_delta/deletions.json``, one transaction Bundle of DELETEs, keys
    sorted and once each, written as it is merged: the bytes of ``orjson.dumps(delta.deletions_bundle(keys),
    option=OPT_INDENT_2)`` and a newline, without holding the keys."""
    path = FileSystems.join(temp_dir, _file_name(DELETIONS_NAME))
    count, previous = 0, None
    with FileSystems.create(path, mime_type="application/fhir+json") as out:
        out.write(b'{\n  "resourceType": "Bundle",\n  "type": "transaction"')
        for key in merged(temp_dir, runs) if runs else ():
            if key == previous:
                continue
            entry = orjson.dumps({"request": {"method": "DELETE", "url": key.decode("utf-8")}},
                                 option=orjson.OPT_INDENT_2)
            out.write((b',\n  "entry": [\n' if count == 0 else b",\n") + b"    " + entry.replace(b"\n", b"\n    "))
            count, previous = count + 1, key
        out.write(b"\n  ]\n}\n" if count else b"\n}\n")
    return DELETIONS_NAME, DELETIONS_NAME, count
