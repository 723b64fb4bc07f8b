"""The output folder: where each kind of line goes, its checks and clean-up before and after a run.

Layout (docs/output.md): resource files ``<Type>-SSSSS-of-NNNNN.ndjson`` and ``manifest.json``
at the top, which is what a bulk loader takes; transaction Bundles in ``bundles/``; the report
(``summary.json``, errors as plain JSON lines and as OperationOutcome NDJSON) in ``_report/``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
import zlib
from datetime import datetime, timezone

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.codes import RESOURCE_TYPES
from beam_pipeline.fhir import bulk_data
from beam_pipeline.run.layout import (
    BUNDLE_NAME,
    DELETIONS_NAME,
    DELTA_DIR,
    DELTA_MANIFEST_NAME,
    DELTA_PREFIX,
    LEGACY_NAMES,
    MANIFEST_NAME,
    OUTCOMES_NAME,
    PLACES,
    PROGRESS_PREFIX,
    STATE_HEADER_NAME,
    SUBFOLDERS,
    SUMMARY_NAME,
)
from beam_pipeline.run.settings import Settings
from beam_pipeline.sources.files import is_remote


class OutputError(Exception):
    """The output folder cannot be written; the message says why, in one line."""


class OutputFull(Exception):
    """The output's disk (or quota) filled up during the run; the output is incomplete."""


def disk_full(exc: BaseException) -> bool:
    """Whether a failed run's error, or any error it wraps, is a full disk or quota (Beam wraps a
    worker's error, on some runners as text)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
                text in str(exc) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# Characters (and newlines) per output file.
SHARD_BYTES = 128 * 1024 * 1024


def place(name: str) -> tuple[str, str]:
    """(folder, suffix) of a name's files: delta names ``_delta/<Type>`` in ``_delta``."""
    if name.startswith(DELTA_PREFIX):
        return DELTA_DIR, ".ndjson"
    return PLACES.get(name, ("", ".ndjson"))


def shard_name(name: str, shard_index: int, total_shards: int) -> str:
    """A shard's path relative to the output folder, e.g. ``bundles/Bundle-00000-of-00002.ndjson``."""
    folder, suffix = place(name)
    file_name = f"{name.rsplit('/', 1)[-1]}-{shard_index:05d}-of-{total_shards:05d}{suffix}"
    return f"{folder}/{file_name}" if folder else file_name


def shard_pattern(output_dir: str, name: str) -> str:
    folder, suffix = place(name)
    return FileSystems.join(output_dir, *([folder] if folder else []), f"{name.rsplit('/', 1)[-1]}-*-of-*{suffix}")


def shard_count(total_bytes: int) -> int:
    """How many files a name's lines go into: from their size alone, so every runner and worker
    count writes the same files."""
    return max(1, -(-total_bytes // SHARD_BYTES))


def shard_of(line: bytes, total_shards: int) -> int:
    """The file a line (UTF-8) goes into: a hash of its content (stable across processes, unlike ``hash``)."""
    return zlib.crc32(line) % total_shards if total_shards > 1 else 0


def json_bytes(document: dict, sort_keys: bool = False) -> bytes:
    return json.dumps(document, indent=2, sort_keys=sort_keys).encode("utf-8") + b"\n"


def place_document(settings, name: str, data: bytes) -> str:
    """Writes one document (``manifest.json``, ``_report/summary.json``, ...) into the run's temp
    folder, then renames it into place: a run killed while writing it leaves no partial file."""
    temp = FileSystems.join(temp_dir(settings), name.replace("/", "--"))
    with FileSystems.create(temp, mime_type="application/json") as out:
        out.write(data)
    path = FileSystems.join(settings.output, name)
    FileSystems.rename([temp], [path])
    return path


def folder_manifest(settings: Settings, started: float, files) -> dict:
    """The Bulk Data manifest of a run's folder from its written files ``(name, relative path, line
    count)``: top-level resource files as ``output``, OperationOutcome files as ``error``, the
    transaction Bundles (not for bulk import) as the extension ``transactionBundles``."""
    resources = [(name, path, count) for name, path, count in files if place(name)[0] == ""]
    outcomes = [(path, count) for name, path, count in files if name == OUTCOMES_NAME]
    bundles = [(name, path, count) for name, path, count in files if name == BUNDLE_NAME]
    body = bulk_data.manifest(
        transaction_time=bulk_data.transaction_time(datetime.fromtimestamp(started, timezone.utc)),
        request=settings.request, requires_access_token=is_remote(settings.output),
        outputs=resources, errors=outcomes, base_url=settings.manifest_base_url)
    if bundles:
        body["extension"] = {"transactionBundles": bulk_data.output_entries(bundles, settings.manifest_base_url)}
    return body


def delta_manifest(settings: Settings, started: float, files) -> dict:
    """The Bulk Data manifest of a ``--since`` run's ``_delta/``: its changed resources as
    ``output`` (for the same bulk import as the snapshot), and the transaction Bundle of DELETEs
    to post after them as the extension ``deletions``."""
    changed = [(name[len(DELTA_PREFIX):], path, count) for name, path, count in files
               if name.startswith(DELTA_PREFIX) and name != DELETIONS_NAME]
    deletions = [(BUNDLE_NAME, path, count) for name, path, count in files if name == DELETIONS_NAME]
    body = bulk_data.manifest(
        transaction_time=bulk_data.transaction_time(datetime.fromtimestamp(started, timezone.utc)),
        request=settings.request, requires_access_token=is_remote(settings.output),
        outputs=[entry for entry in changed if entry[0] != BUNDLE_NAME], errors=[],
        base_url=settings.manifest_base_url)
    body["extension"] = {"deletions": bulk_data.output_entries(deletions, settings.manifest_base_url)}
    bundles = [entry for entry in changed if entry[0] == BUNDLE_NAME]
    if bundles:
        body["extension"]["transactionBundles"] = bulk_data.output_entries(bundles, settings.manifest_base_url)
    return body


def check_local_output(output_dir: str) -> None:
    """Fail before any input is read when the folder cannot be created or written."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError(f"--output {output_dir} is a file, not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        with open(probe, "wb") as handle:
            handle.write(b"probe\n")
        os.remove(probe)
    except OSError as exc:
        raise OutputError(f"--output {output_dir} cannot be written: {exc.strerror or exc}") from None


def prepare(output_dir: str, input_path: str | None = None) -> None:
    """Check the folder; remove our files of an earlier run (a re-run may write fewer shards) and
    the temp folders an interrupted run left behind."""
    if not is_remote(output_dir):
        check_local_output(output_dir)
        remove_stale_dirs(output_dir, input_path)
        for folder in SUBFOLDERS:  # created once here, not by every shard writer
            os.makedirs(os.path.join(output_dir, folder), exist_ok=True)
    # The summary first: a run killed while the rest goes leaves no summary beside partial files.
    _delete_matching([FileSystems.join(output_dir, name) for name in (SUMMARY_NAME, "summary.json")])
    names = (*RESOURCE_TYPES, *PLACES, *(DELTA_PREFIX + name for name in RESOURCE_TYPES))
    patterns = [shard_pattern(output_dir, name) for name in dict.fromkeys(names)]
    patterns += [FileSystems.join(output_dir, name) for name in (
        SUMMARY_NAME, MANIFEST_NAME, STATE_HEADER_NAME, DELETIONS_NAME, DELTA_MANIFEST_NAME, *LEGACY_NAMES)]
    _delete_matching(patterns)


def _delete_matching(patterns: list[str]) -> None:
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if stale:
        FileSystems.delete(stale)


def remove_empty_subfolders(output_dir: str) -> None:
    """``prepare`` creates the subfolders the writers may write into; unused ones go at the end."""
    if is_remote(output_dir):
        return
    for folder in SUBFOLDERS:
        with contextlib.suppress(OSError):  # not empty, or already gone
            os.rmdir(os.path.join(output_dir, folder))


TEMP_PREFIX = ".temp-dicom2fhir-"
PROBE_PREFIX = ".write-probe-"
_PROBE = re.compile(rf"{re.escape(PROBE_PREFIX)}[0-9a-f]{{32}}")  # a probe file a killed run left
# Hidden folders a run of this tool makes in the output folder (and Beam's fileio default name):
# only folders whose whole name matches are ever removed, so a user's ".templates" stays.
_OUR_HIDDEN_FOLDERS = re.compile(
    rf"({re.escape(TEMP_PREFIX)}|{re.escape(PROGRESS_PREFIX)})[0-9a-f]{{12}}"
    r"|\.temp[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def temp_dir(settings) -> str:
    """Where this run writes its files before ``publish`` (removed at the end): a run that fails
    leaves no partial file among the results."""
    return FileSystems.join(settings.output, TEMP_PREFIX + settings.run_id)


def publish(settings, files) -> None:
    """Moves the written files (name, relative path, lines) from the temp folder to their places.
    A retried step finds some already moved: those are left where they are."""
    temp = temp_dir(settings)
    waiting = {m.path.rstrip("/").rsplit("/", 1)[-1]
               for result in FileSystems.match([FileSystems.join(temp, "*")]) for m in result.metadata_list}
    moves = [(FileSystems.join(temp, relative.replace("/", "--")), FileSystems.join(settings.output, relative))
             for relative in sorted(relative for _, relative, _ in files) if relative.replace("/", "--") in waiting]
    if moves:
        FileSystems.rename([source for source, _ in moves], [target for _, target in moves])


def remove_temp_dir(settings) -> None:
    """This run's temp folder (on an object store: the objects under its prefix)."""
    path = temp_dir(settings)
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(Exception):  # nothing left to delete, or a store refusing: not the run's result
        FileSystems.delete([path.rstrip("/") + "/"])


def remove_stale_dirs(output_dir: str, keep_under: str | None = None) -> None:
    """Temp and progress folders (and write probes) that interrupted earlier runs left behind; never
    a folder that holds ``keep_under`` (the input)."""
    if is_remote(output_dir) or not os.path.isdir(output_dir):
        return
    keep = os.path.realpath(keep_under) + os.sep if keep_under and not is_remote(keep_under) else None
    for entry in os.scandir(output_dir):
        if _PROBE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.remove(entry.path)
            continue
        if not (_OUR_HIDDEN_FOLDERS.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        if keep and keep.startswith(os.path.realpath(entry.path) + os.sep):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
