"""The source lines of a file input (``_state/sources-*.jsonl``): one per *unit*, a folder's files
whose names hash to one of ``FOLDER_SPLIT`` parts (docs/state.md).

A unit line holds a *head*: the digest of its listing (names and stamps), its files' error lines
and counts summed, and per study what it adds (files, content); and a *body*: the unit's partial
study groups (what reading it adds to each study, series- and study-level values once) and per
file its stamp, its record as the difference from its series' representative, its error lines and
counts. A later run reads only the heads (the body is the last member: the head is parsed without
it); it reuses a unit whose listing digest is unchanged without looking at its files or its body,
and in a changed unit it reads only the files whose stamp changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import operator
import typing
import zlib
from dataclasses import dataclass, fields
from itertools import compress, repeat

import orjson
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.codes import TRANSIENT_REASONS
from beam_pipeline.fhir import keywords
from beam_pipeline.fhir.study import StudyGroup
from beam_pipeline.run.state import BYTES_KEY, StateError, check_of, plain_value, seal, typed_value, unseal

FOLDER_SPLIT = 4  # units per folder
PART_FILES = 2000  # files per line at most: a unit of a folder of a million files is many lines


def unit_of(key: str) -> str:
    """The unit of a source key: its folder and a hash of its name."""
    folder, _, name = ("", "", key) if key.startswith(BYTES_KEY) else key.rpartition("/")
    return f"{folder}|{zlib.crc32(name.encode('utf-8', 'surrogatepass')) % FOLDER_SPLIT}"


def unit_folder(unit: str) -> str:
    """The folder of a unit (``unit_of``)."""
    return unit.rpartition("|")[0]


def listing_digest(stamped) -> str | None:
    """(key, stamp) pairs of a unit's files -> their digest; None when a stamp is unknown (the unit
    is then never reused whole)."""
    pairs = sorted(stamped)
    if any(stamp is None for _, stamp in pairs):
        return None
    text = "".join([f"{key}\0{stamp}\n" for key, stamp in pairs])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


_KEY_STAMP = operator.itemgetter(0, 1)  # a ``FileEntry``'s (key, stamp)


class FileEntry(typing.NamedTuple):
    """What reading one file gave: its record (None when not an instance), error lines, counts.
    (A named tuple: one is made per file, and a frozen dataclass costs several times more to make.)"""

    key: str
    stamp: str | None
    record: dict | None
    errors: tuple
    counts: dict

    def reusable(self, stamp: str | None) -> bool:
        """Unchanged (same known stamp) and not failed for a transient reason (tried again)."""
        return (stamp is not None and stamp == self.stamp
                and not any(error.get("reason") in TRANSIENT_REASONS for error in self.errors))


# What a unit line keeps of a group: not its instance-level values (``instances``, and the
# duplicates and conflicting SOPs they give), which the line's files hold in their records already
# (``_body_groups`` adds them again, in the files' order, as reading added them).
_GROUP_FIELDS = tuple(f.name for f in fields(StudyGroup)
                      if f.name not in ("pending", "instances", "duplicates", "conflicting_sops"))
_ABSENT = object()  # a key the series' representative lacks


def _group_plain(group: StudyGroup, content: str) -> dict:
    """A group's line values (``content``: its content in hex, as the line's head has it)."""
    body = {}
    for name in _GROUP_FIELDS:
        value = getattr(group, name)
        body[name] = plain_value(value) if isinstance(value, set) else value  # (not one orjson callback each)
    representative = body.pop("representative")
    body["representative"] = None if representative is None else representative["SeriesInstanceUID"]
    body["content"] = content
    return body


def _group_typed(body: dict) -> StudyGroup:
    values = typed_value(body)
    values["content"] = int(body["content"], 16)
    representative = values.pop("representative")
    group = StudyGroup(**values)
    group.representative = None if representative is None else group.series[representative]
    return group


def _body_groups(body: dict) -> tuple[list[tuple[str, str, StudyGroup]], list[FileEntry]]:
    """A unit line's body -> its groups ((group key, study uid, group), whole again: each file's
    instance-level values added back in the files' order) and its files with their records."""
    groups = [(key, uid, _group_typed(plain)) for key, uid, plain in body["groups"]]
    series = [(group, group.series[series_uid]) for _, _, group in groups for series_uid in sorted(group.series)]
    instance_keys = keywords.instance_keys()
    entries = []
    for key, stamp, at, diff, dropped, errors, counts in body["files"]:
        record = None
        if at is not None:
            group, base = series[at]
            record = {k: v for k, v in base.items() if k not in dropped}
            record.update(typed_value(diff))
            group.add_instance(record, instance_keys)
        entries.append(FileEntry(key, stamp, record, tuple(errors), counts))
    return groups, entries


def unit_parts(entries: list[FileEntry]) -> list[tuple[list[FileEntry], dict]]:
    """A unit's files (sorted by key) in consecutive parts of at most ``PART_FILES``, one line
    each, and what each line says of the whole unit: its listing digest, whether a file is to be
    tried again, and which part of how many the line is."""
    errors = [error for entry in entries for error in entry.errors]
    whole = {"digest": listing_digest(map(_KEY_STAMP, entries)),
             "retry": bool(errors) and any(error.get("reason") in TRANSIENT_REASONS for error in errors)}
    if len(entries) <= PART_FILES:  # (a unit of one line, as most are)
        return [(entries, {**whole, "part": [0, 1]})]
    parts = [entries[start:start + PART_FILES] for start in range(0, len(entries), PART_FILES)]
    return [(part, {**whole, "part": [index, len(parts)]}) for index, part in enumerate(parts)]


def unit_line(unit: str, entries: list[FileEntry], partials: dict[str, dict[str, StudyGroup]], whole: dict,
              group_keys: list | None = None) -> str:
    """A unit's line (of the part ``entries``); ``partials`` are its entries' records grouped (key ->
    study uid -> group), ``whole`` from ``unit_parts``; ``group_keys``: each entry's group key
    (default: its study uid, as in study mode). In directory mode one unit (of names that are not
    valid UTF-8) can hold two folders' groups of the same study and series: each file is indexed
    under its own. (One line per unit: with small studies, one per study or more, so built in one
    pass over its files.)"""
    groups = [(key, uid, partials[key][uid], f"{partials[key][uid].content:x}")
              for key in sorted(partials) for uid in sorted(partials[key])]
    series: dict[tuple, tuple[int, dict]] = {}  # (group key, study, series) -> (index, representative)
    for key, uid, group, _ in groups:
        for series_uid in sorted(group.series):
            series[key, uid, series_uid] = (len(series), group.series[series_uid])
    if group_keys is None:
        group_keys = [None if entry.record is None else entry.record["StudyInstanceUID"] for entry in entries]
    files, errors, counts = [], [], {}
    for entry, group_key in zip(entries, group_keys):
        for name, count in entry.counts.items():
            counts[name] = counts.get(name, 0) + count
        errors += entry.errors
        record = entry.record
        if record is None:
            files.append([entry.key, entry.stamp, None, None, None, list(entry.errors), entry.counts])
            continue
        at, base = series[group_key, record["StudyInstanceUID"], record["SeriesInstanceUID"]]
        files.append([entry.key, entry.stamp, at, *record_difference(record, base), list(entry.errors), entry.counts])
    return seal({
        "unit": unit,
        "digest": whole["digest"],
        "retry": whole["retry"],
        "part": whole["part"],
        "count": len(entries),
        "errors": errors,
        "counts": {k: v for k, v in sorted(counts.items()) if v},
        "studies": [[key, uid, group.files, content] for key, uid, group, content in groups],
        _BODY: {"groups": [[key, uid, _group_plain(group, content)] for key, uid, group, content in groups],
                "files": files},
    }, default=plain_value)


def record_difference(record: dict, base: dict) -> tuple[dict, list]:
    """(the record's values that its series' representative ``base`` lacks or holds otherwise, in
    the record's order; the keys of ``base`` the record lacks). Compared key by key in C: a unit
    line holds one such difference per file."""
    if record is base:
        return {}, []
    if len(record) == len(base) and list(record) == list(base):  # the same keys in the same order, as
        # most files of a series have: their values compared pairwise, without a lookup per key
        return dict(compress(record.items(), map(operator.ne, record.values(), base.values()))), []
    changed = map(operator.ne, record.values(), map(base.get, record, repeat(_ABSENT)))
    diff = dict(compress(record.items(), changed))
    return diff, ([] if base.keys() <= record.keys() else [k for k in base if k not in record])


_BODY = "body"  # the last member of a unit line: what only a changed unit or rebuilt study loads
_BODY_START = b',"' + _BODY.encode() + b'":'  # no string (quotes escaped) nor head key holds it


@dataclass(frozen=True)
class Unit:
    """A previous run's unit line (one part of a unit), read: what deciding and reusing the unit needs (its listing
    digest, its files' error lines and counts, and per study what it adds to its digest), and
    where the line is, to load the rest only for a unit or study that changed. The line itself
    does not travel: an unchanged unit's line is kept in the state's file (``hash`` finds it)."""

    key: str
    digest: str | None
    retry: bool
    parts: int     # lines of the unit (``unit_parts``)
    files: int
    errors: tuple
    counts: dict
    groups: tuple  # (group key, study uid, files, content) of each group of the unit
    place: tuple   # (shard path, byte offset) of the line
    hash: str      # the line's check (``state.check_of``): which line of the shard it is

    def plain(self) -> tuple:
        """The fields as a tuple (``Unit(*plain)`` again): plain values travel between steps
        faster than a pickled object."""
        return tuple(getattr(self, field.name) for field in fields(Unit))

    def light(self) -> dict[str, dict[str, StudyGroup]]:
        """The unit's partial groups, counted (files, content) but not loaded: each refers to the
        line (``pending``), loaded only when its study is built again (``load_pending``)."""
        partials: dict[str, dict] = {}
        for key, uid, files, content in self.groups:
            partials.setdefault(key, {})[uid] = StudyGroup(uid, files=files, content=content,
                                                           pending=((*self.place, key, files, content),))
        return partials

    def entries(self) -> list[FileEntry]:
        """Every file of the unit with its record rebuilt."""
        return _body_groups(_load(self.place)[_BODY])[1]


def _load(place: tuple) -> dict:
    """The body of the unit line at (shard path, byte offset), checked again."""
    path, offset = place
    with FileSystems.open(path, mime_type="application/octet-stream") as handle:
        handle.seek(offset)
        line = handle.readline().decode("utf-8").rstrip("\n")
    return unseal(line, "source")


def load_pending(group: StudyGroup) -> StudyGroup:
    """A new group: ``group`` with its pending parts loaded from their unit lines and merged in."""
    if not group.pending:
        return group
    loaded = StudyGroup(group.study_uid).merge(dataclasses.replace(group, pending=()))
    for path, offset, key, files, content in group.pending:
        for group_key, uid, part in _body_groups(_load((path, offset))[_BODY])[0]:
            if group_key == key and uid == group.study_uid:
                if (part.files, part.content) != (files, content):
                    raise StateError("a source line of the previous state changed during the run: "
                                     "run once without --since")
                part.files, part.content = 0, 0  # counted in ``group`` already
                loaded.merge(part)
    return loaded


def read_unit_line(line: bytes, place: tuple) -> Unit:
    """A unit line's head, its check verified on the whole line; the body is not parsed."""
    check = check_of(line, "source")
    end = line.find(_BODY_START)
    try:
        head = orjson.loads(line[:end] + b"}") if end > 0 else None
    except orjson.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or "unit" not in head:
        raise StateError("a source line of the previous state is not a folder unit: run once without --since")
    groups = tuple((key, uid, files, int(content, 16)) for key, uid, files, content in head["studies"])
    return Unit(head["unit"], head["digest"], head["retry"], head["part"][1], head["count"], tuple(head["errors"]),
                head["counts"], groups, place, check)
