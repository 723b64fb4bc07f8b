"""A run's state in ``_state/``: what a later run started ``--since`` it needs to read only what changed.

The transforms route these lines; the encoding and every check live here (format: docs/state.md).
Three parts:

* source lines (``_state/sources-*.jsonl``): of a file input one per part of a folder unit
  (``folder_state``: its listing digest, partial study groups, per file its stamp, record, errors
  and counts), of a DICOMweb input one per study (``source_line``): everything reading produced,
  so an unchanged unit is reused whole and an unchanged file or study is not read;
* study lines (``_state/studies-*.jsonl``), one per study: the digest of its instance records, the
  key and hash of each of its lines (the lines are in the output, not held twice), its shared
  resources, error and counts: an unchanged study is not rebuilt and its lines are kept;
* the header ``_state/state.json``: format, converter version, input root, the options the lines
  depend on, and the size of every shard.

Records are plain JSON values (no pickle). Every line carries a checksum of its bytes; a later run
refuses a state that is missing, truncated, of another format, written by another version, for
another input or with other reading options, in one line, before it reads anything. Other
conversion options only mean that every study is rebuilt from the kept records.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from importlib import metadata

import orjson
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.codes import TRANSIENT_REASONS
from beam_pipeline.dicom import records as record_types
from beam_pipeline.run import core
from beam_pipeline.run.layout import SOURCE_STATE_NAME, STATE_HEADER_NAME, STUDY_STATE_NAME, SUMMARY_NAME
from beam_pipeline.run.settings import Settings
from beam_pipeline.sources import files as inputs
from beam_pipeline.sources.dicomweb import safe_url

FORMAT = 4  # 1: records pickled; 2: study lines held their resources; 3: unit lines without a head (all
#             refused); 4: docs/state.md
BYTES_KEY = "\0b64:"  # a key for a local path that is not valid UTF-8 (no str path holds NUL)


class StateError(Exception):
    """The previous run's state cannot be used; the message says why and what to do, in one line."""


# ---------------------------------------------------------------------------------------------
# Keys and records


def source_key(path: inputs.Path) -> str:
    """A source line's key: the path, or for an undecodable local name its bytes in base64."""
    if isinstance(path, bytes):
        return BYTES_KEY + base64.b64encode(path).decode("ascii")
    return path


def key_path(key: str) -> inputs.Path:
    return base64.b64decode(key[len(BYTES_KEY):]) if key.startswith(BYTES_KEY) else key


# Record values JSON has no type for, as a one-key object {tag: value}: the dose report's named
# tuples (their fields as an array), sets (sorted), bytes (hex). Plain tuples are arrays, read back
# as tuples (records hold no lists: the study's duplicate checks compare tuples).
_TYPES = {"DoseReport": record_types.DoseReport, "DoseItem": record_types.DoseItem}
_TAG = "\u0000"  # no DICOM keyword starts with NUL


def plain_value(value):
    if isinstance(value, tuple) and type(value).__name__ in _TYPES:
        return {_TAG + type(value).__name__: list(value)}
    if isinstance(value, (set, frozenset)):
        return {_TAG + type(value).__name__: sorted(value, key=repr)}
    if isinstance(value, bytes):
        return {_TAG + "bytes": value.hex()}
    raise TypeError(f"{type(value).__name__} is not a record value")


def typed_value(value):
    kind = type(value)
    if kind is list:
        return tuple([typed_value(item) for item in value])
    if kind is not dict:
        return value
    if len(value) == 1:
        (key, inner), = value.items()
        if key.startswith(_TAG):
            tag = key[1:]
            if tag in _TYPES:
                return _TYPES[tag](*[typed_value(item) for item in inner])
            if tag in ("set", "frozenset"):
                return (set if tag == "set" else frozenset)([typed_value(item) for item in inner])
            if tag == "bytes":
                return bytes.fromhex(inner)
    return {key: item if type(item) in _PLAIN else typed_value(item) for key, item in value.items()}


_PLAIN = (str, int, float, bool, type(None))


def decode_record(plain) -> dict:
    """An instance record from its plain JSON values (written with ``plain_value``): equal to the
    reader's, tuples as tuples."""
    return typed_value(plain)


# ---------------------------------------------------------------------------------------------
# Lines, each with its checksum


_CHECK = b',"check":"'
_CHECK_TAIL = len(_CHECK) + 16 + 2  # ,"check":"<16 hex digits>"}


def _checksum(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


def seal(body: dict, default=None) -> str:
    """The body as one JSON line, the checksum of its bytes as its last member. Keys keep their
    order (resources are written back exactly as built)."""
    data = orjson.dumps(body, default=default)
    return (data[:-1] + _CHECK + _checksum(data).encode("ascii") + b'"}').decode("utf-8")


def check_of(line: str | bytes, what: str) -> str:
    """A line's check (16 hex digits), verified on its bytes (not re-serialized)."""
    data = line.encode("utf-8") if isinstance(line, str) else line
    if len(data) <= _CHECK_TAIL or data[-_CHECK_TAIL:-18] != _CHECK or not data.endswith(b'"}'):
        raise StateError(f"a {what} line of the previous state is damaged (not a state line): "
                         "run once without --since")
    check = data[-18:-2].decode("ascii", "replace")
    if check != _checksum(data[:-_CHECK_TAIL] + b"}"):
        raise StateError(f"a {what} line of the previous state is damaged (checksum): run once without --since")
    return check


def unseal(line: str | bytes, what: str) -> dict:
    """The body of a line, its checksum checked on the bytes (not re-serialized)."""
    check_of(line, what)
    data = line.encode("utf-8") if isinstance(line, str) else line
    try:
        parsed = orjson.loads(data[:-_CHECK_TAIL] + b"}")
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise StateError(f"a {what} line of the previous state is damaged (not a state line): "
                         "run once without --since")
    return parsed


@dataclass(frozen=True)
class SourceEntry:
    """What reading one source gave: the state line's content, and the line itself."""

    key: str
    stamp: str | None
    records: tuple  # records as plain values (decoded only where reused)
    errors: tuple[dict, ...]
    counts: dict
    line: str

    def reusable(self, stamp: str | None) -> bool:
        """Unchanged (same known stamp) and not failed for a transient reason (tried again)."""
        return (stamp is not None and stamp == self.stamp
                and not any(error.get("reason") in TRANSIENT_REASONS for error in self.errors))

    def outcome(self) -> tuple[list[dict], list[dict], Counter]:
        """(records, error lines, counts) as reading the source gave them."""
        return [decode_record(text) for text in self.records], list(self.errors), Counter(self.counts)


def source_line(key: str, stamp: str | None, records, errors, counts) -> str:
    return seal({"key": key, "stamp": stamp, "records": list(records),
                  "errors": list(errors), "counts": {k: v for k, v in sorted(counts.items()) if v}}, default=plain_value)


def read_source_line(line: str) -> SourceEntry:
    body = unseal(line, "source")
    return SourceEntry(body["key"], body["stamp"], tuple(body["records"]), tuple(body["errors"]),
                       body["counts"], line)


def line_hash(line: str | bytes) -> str:
    """A resource line's digest (32 hex digits of SHA-256 of its UTF-8 bytes): what the study state
    keeps of a line, to find it in the previous output and to see whether it changed."""
    return hashlib.sha256(line.encode("utf-8") if isinstance(line, str) else line).hexdigest()[:32]


_KEY_PREFIX = '{"resourceType":"'


def line_key(line: str) -> str:
    """``Type/id`` of a resource line (written by ``core.dumps``: type and id first, else parsed)."""
    if line.startswith(_KEY_PREFIX):
        type_end = line.find('"', len(_KEY_PREFIX))
        if line.startswith(',"id":"', type_end + 1):
            id_start = type_end + 8
            id_end = line.find('"', id_start)
            return f"{line[len(_KEY_PREFIX):type_end]}/{line[id_start:id_end]}"
    resource = orjson.loads(line)
    return f"{resource['resourceType']}/{resource['id']}"


_KEY_PREFIX_BYTES = _KEY_PREFIX.encode()


def line_key_of_bytes(line: bytes) -> str | None:
    """``Type/id`` of a resource line (UTF-8) from its start, as ``line_key`` reads it; None when
    the line does not start with its type and id (then only its hash tells it)."""
    if line.startswith(_KEY_PREFIX_BYTES):
        type_end = line.find(b'"', len(_KEY_PREFIX_BYTES))
        if line.startswith(b',"id":"', type_end + 1):
            id_start = type_end + 8
            id_end = line.find(b'"', id_start)
            if id_end > 0:
                return f"{line[len(_KEY_PREFIX_BYTES):type_end].decode()}/{line[id_start:id_end].decode()}"
    return None


@dataclass(frozen=True)
class StudyEntry:
    """A previous run's study line: its key and digest, and the line (parsed further only where it
    is used: a reused or changed study, not on its way through the shuffle)."""

    key: str
    digest: str
    line: str

    def body(self) -> dict:
        return orjson.loads(self.line)  # checked when read (``read_study_line``)

    def kept(self) -> tuple[dict | None, Counter, list[tuple[str, str]]]:
        """(error, counts, shared resources) of the study as built: what a reused study gives
        beside its lines, which stay in the previous output's files."""
        body = self.body()
        return (body["error"], Counter(body["counts"]),
                [(shared_key, core.dumps(resource)) for shared_key, resource in body["shared"]])

    def hashes(self) -> dict[str, list[tuple[str, str]]]:
        """resource type -> [(``Type/id``, line hash)] of the lines the study wrote."""
        return {name: [tuple(pair) for pair in pairs] for name, pairs in self.body()["lines"].items()}

    def names(self) -> list[str]:
        """The resource types (``Bundle`` too) of the lines the study wrote."""
        return [name for name, pairs in self.body()["lines"].items() if pairs]

    @property
    def shared(self) -> list[tuple[str, str]]:
        """The shared resources the study built."""
        return self.kept()[2]


def study_line(key: str, digest: str, outcome: core.StudyOutcome) -> str:
    """A built study: its digest, error, counts and shared resources, and of each of its lines only
    its key and hash (the lines themselves are in the output; a later run keeps them there)."""
    return seal({
        "key": key, "digest": digest, "error": outcome.error,
        "lines": {name: [[line_key(line), line_hash(line)] for line in lines]
                  for name, lines in sorted(outcome.lines.items())},
        "shared": [[shared_key, orjson.Fragment(line)] for shared_key, line in outcome.shared],  # as written
        "counts": {k: v for k, v in sorted(outcome.counts.items()) if v},
    })


def read_study_line(line: str) -> StudyEntry:
    body = unseal(line, "study")
    return StudyEntry(body["key"], body["digest"], line)


# ---------------------------------------------------------------------------------------------
# The header: what the lines depend on


def converter_version() -> str:
    """The package version and a digest of its code and terminology tables: a state written by
    other code is not reused (its records or lines could differ)."""
    import terminologies

    import beam_pipeline

    digest = hashlib.sha256()
    for package in (beam_pipeline, terminologies):
        root = os.path.dirname(package.__file__)
        for folder, dirs, names in sorted(os.walk(root)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                if name.endswith((".py", ".json", ".csv", ".tsv", ".c")):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode() + b"\0")
                    with open(path, "rb") as handle:
                        digest.update(handle.read())
    try:
        version = metadata.version("dicom-fhir-beam")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+{digest.hexdigest()[:12]}"


def source_of(settings: Settings) -> str:
    """The input the state describes: the input's root pattern, or the DICOMweb base and query."""
    if settings.dicomweb is not None:
        query = dataclasses.asdict(settings.dicomweb.query)
        return f"dicomweb:{safe_url(settings.dicomweb.connection.url)}|{json.dumps(query, sort_keys=True)}"
    return inputs.resolve_pattern(settings.input) if not inputs.is_remote(settings.input) else settings.input.rstrip("/")


def reading_options(settings: Settings) -> dict:
    """Options the source lines depend on (a difference refuses the state)."""
    return {"group_by": settings.group_by, "fast_reader": settings.use_fast_reader,
            "max_header_bytes": settings.max_header_bytes}


def conversion_options(settings: Settings, config) -> dict:
    """Options the study lines depend on (a difference rebuilds every study)."""
    options = dataclasses.asdict(config)
    options["validate"] = settings.validate
    return json.loads(json.dumps(options))  # tuples as lists, as read back


def header(settings: Settings, config, shards: dict) -> dict:
    return {"format": FORMAT, "converter": converter_version(), "source": source_of(settings),
            "reading": reading_options(settings), "conversion": conversion_options(settings, config),
            "shards": shards}


def shard_sizes(output_dir: str, files) -> dict:
    """{name: [[relative path, bytes], ...]} of the written state files."""
    paths = sorted((name, relative) for name, relative, _ in files if name in (SOURCE_STATE_NAME, STUDY_STATE_NAME))
    sizes = {}
    if paths:
        matched = FileSystems.match([FileSystems.join(output_dir, relative) for _, relative in paths])
        for (name, relative), result in zip(paths, matched):
            sizes.setdefault(name, []).append([relative, result.metadata_list[0].size_in_bytes])
    return sizes


@dataclass(frozen=True)
class Previous:
    """A previous run's usable state: its shards, and whether its studies can be reused."""

    folder: str
    sources: tuple[str, ...]
    studies: tuple[str, ...]
    reuse_studies: bool = True
    changed_options: tuple[str, ...] = ()


def _differences(before: dict, now: dict) -> list[str]:
    return sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))


def check_previous(folder: str, settings: Settings, config) -> Previous:
    """The state of ``folder`` if this run may start from it, else ``StateError`` in one line."""
    redo = "run once without --since"
    path = FileSystems.join(folder, STATE_HEADER_NAME)
    if not FileSystems.exists(path):
        raise StateError(f"--since {folder}: no state ({STATE_HEADER_NAME} is missing: not an output folder of "
                         f"this converter, or its run did not finish): {redo}")
    if not FileSystems.exists(FileSystems.join(folder, SUMMARY_NAME)):
        raise StateError(f"--since {folder}: its run did not finish ({SUMMARY_NAME} is missing): start from the "
                         f"last complete output, or {redo}")
    try:
        with FileSystems.open(path) as handle:
            document = json.loads(handle.read())
        if not isinstance(document, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        raise StateError(f"--since {folder}: its state is damaged ({STATE_HEADER_NAME} is not valid JSON): "
                         f"{redo}") from None
    if document.get("format") != FORMAT:
        raise StateError(f"--since {folder}: its state has format {document.get('format')!r}, this converter "
                         f"reads format {FORMAT}: {redo}")
    version = converter_version()
    if document.get("converter") != version:
        raise StateError(f"--since {folder}: its state was written by another version of the converter "
                         f"({document.get('converter')}, this is {version}): {redo}")
    if document.get("source") != source_of(settings):
        raise StateError(f"--since {folder}: its state is of another input ({document.get('source')}): "
                         "give the same --input (or --dicomweb and filters) as that run, or run without --since")
    reading = _differences(document.get("reading") or {}, reading_options(settings))
    if reading:
        raise StateError(f"--since {folder}: its state was read with other options "
                         f"({', '.join(reading)} differ): give the same options, or {redo}")
    shards = document.get("shards") or {}
    listed = {name: [entry[0] for entry in shards.get(name, [])] for name in (SOURCE_STATE_NAME, STUDY_STATE_NAME)}
    expected = [(relative, size) for entries in shards.values() for relative, size in entries]
    if expected:
        matched = FileSystems.match([FileSystems.join(folder, relative) for relative, _ in expected])
        for (relative, size), result in zip(expected, matched):
            found = result.metadata_list[0].size_in_bytes if result.metadata_list else None
            if found != size:
                state = "missing" if found is None else f"{found} bytes instead of {size}"
                raise StateError(f"--since {folder}: its state is truncated or damaged ({relative}: {state}): {redo}")
    changed = _differences(document.get("conversion") or {}, conversion_options(settings, config))
    return Previous(folder, tuple(FileSystems.join(folder, r) for r in listed[SOURCE_STATE_NAME]),
                    tuple(FileSystems.join(folder, r) for r in listed[STUDY_STATE_NAME]),
                    reuse_studies=not changed, changed_options=tuple(changed))
