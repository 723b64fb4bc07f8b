"""The output folder: NDJSON shards, and its checks and clean-up before and after a run."""
from __future__ import annotations

import os
import shutil
import uuid

from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.codes import RESOURCE_TYPES
from beam_pipeline.inputs import is_remote
from beam_pipeline.progress import PROGRESS_PREFIX
from beam_pipeline.summary import SUMMARY_NAME

ERRORS_NAME = "errors"


class OutputError(Exception):
    """The output folder cannot be written; the message says why, in one line."""


class NdjsonSink(fileio.FileSink):
    """Writes the line of each (name, line) element."""

    def open(self, fh):
        self._fh = fh

    def write(self, record):
        self._fh.write(record[1].encode("utf-8"))
        self._fh.write(b"\n")

    def flush(self):
        self._fh.flush()


def check_local_output(output_dir: str) -> None:
    """Fail before any input is read when the folder cannot be created or written."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError(f"--output {output_dir} is a file, not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-probe-{uuid.uuid4().hex}")
        with open(probe, "wb") as handle:
            handle.write(b"probe\n")
        os.remove(probe)
    except OSError as exc:
        raise OutputError(f"--output {output_dir} cannot be written: {exc.strerror or exc}") from None


def prepare(output_dir: str) -> None:
    """Check the folder; remove our files of an earlier run (a re-run may write fewer shards) and
    the temp folders an interrupted run left behind."""
    if not is_remote(output_dir):
        check_local_output(output_dir)
        remove_temp_dirs(output_dir)
    patterns = [FileSystems.join(output_dir, f"{name}-*-of-*.ndjson") for name in (*RESOURCE_TYPES, ERRORS_NAME)]
    patterns.append(FileSystems.join(output_dir, SUMMARY_NAME))
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if stale:
        FileSystems.delete(stale)


def remove_temp_dirs(output_dir: str) -> None:
    """fileio writes into ``.temp<uuid>`` folders and leaves them when a run fails or ends
    (object stores have no folders to leave); an interrupted run leaves its progress folder."""
    if is_remote(output_dir) or not os.path.isdir(output_dir):
        return
    for entry in os.scandir(output_dir):
        if entry.name.startswith((".temp", PROGRESS_PREFIX)) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
