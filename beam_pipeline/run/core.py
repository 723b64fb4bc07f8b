"""One file in, one outcome out; one study in, its lines out: the steps both paths share.

The Beam DoFns (the step modules) and the in-process ``convert.convert_files`` call these pure
functions and only route what they return, so the two paths cannot drift. Each step returns the
counts it adds to ``summary.json`` (as data, not Beam metrics): every input file ends in exactly
one ``outcome:`` count.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field

import orjson

from beam_pipeline.codes import SHARED_TYPES, Outcome, Reason, SourceUnavailable
from beam_pipeline.dicom import header
from beam_pipeline.dicom.fields import FieldSpec
from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES
from beam_pipeline.dicom.records import DICOMDIR, ERROR, INSTANCE, NOT_DICOM, HeaderResult
from beam_pipeline.fhir import build as fhir_build
from beam_pipeline.fhir import bulk_data, keywords
from beam_pipeline.fhir.bundles import transaction_bundle
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.fhir.referenced import referenced_resources
from beam_pipeline.fhir.study import StudyGroup
from beam_pipeline.run.layout import ERRORS_NAME, OUTCOMES_NAME
from beam_pipeline.sources import dicomweb
from beam_pipeline.sources import files as inputs

_SKIPPED = {NOT_DICOM: Outcome.SKIPPED_NOT_DICOM, DICOMDIR: Outcome.SKIPPED_DICOMDIR}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def quiet_pydicom() -> None:
    """pydicom's warnings about odd files may quote element values (patient data): keep them off
    the console, once per worker (``catch_warnings`` per file is not thread-safe). pydicom warns
    with a stack level, so a warning may be attributed to the reader module that called it."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for module in ("pydicom", "beam_pipeline"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


@dataclass
class FileOutcome:
    """A read file: its record (instances), or the error line to write; and its counts."""

    result: HeaderResult
    error: dict | None = None
    counts: Counter = field(default_factory=Counter)


class FileReader:
    """What reading a file needs, built once per worker (``DoFn.setup``), never per file."""

    def __init__(self, use_fast_reader: bool = True, open_file=None,
                 max_header_bytes: int = MAX_HEADER_BYTES):
        self.use_fast_reader = use_fast_reader
        self.max_header_bytes = max_header_bytes
        self.spec = keywords.header_spec()
        self.open_file = open_file or inputs.InputOpener()

    def read(self, path: inputs.Path, size: int | None = None) -> HeaderResult:
        """Classify one file; problems of the file system become error results, never exceptions."""
        try:
            if not (isinstance(path, str) and inputs.is_remote(path)):
                problem = inputs.local_file_problem(path)
                if problem:
                    return HeaderResult(ERROR, reason=problem[0], detail=problem[1])
            with self.open_file(path, size) as fp:
                return header.read_header(fp, self.spec, use_fast=self.use_fast_reader,
                                          max_header_bytes=self.max_header_bytes)
        except SourceUnavailable as exc:  # storage still failing after the retry deadline: retryable
            return HeaderResult(ERROR, reason=Reason.UNAVAILABLE, detail=exc.strerror or "storage unavailable")
        except OSError as exc:
            return HeaderResult(ERROR, reason=Reason.UNREADABLE, detail=f"{type(exc).__name__}: {exc.strerror or 'cannot be read'}")


def dicom_uid_problem(record: dict) -> str | None:
    """A UID that is not digits and dots of at most 64 characters (a stray byte, a bad writer)."""
    for keyword in _UID_KEYWORDS:
        value = record.get(keyword)
        if value is not None and (len(value) > 64 or not _UID.fullmatch(value)):
            return f"{keyword} is not a valid DICOM UID (digits and dots, at most 64 characters)"
    return None


def process_file(path: inputs.Path, reader: FileReader, size: int | None = None) -> FileOutcome:
    """Read one file into an instance record, or the error line that stands for it."""
    return outcome_of(reader.read(path, size), path)


def process_files(items, reader: FileReader, pool: Executor | None = None) -> list[FileOutcome]:
    """``process_file`` over (path, size, ...) items with up to the pool's size in flight (object
    storage is bound by round trips), outcomes in input order: one per item, whatever happens."""
    def guarded(item) -> FileOutcome:
        path, size = item[0], item[1]
        try:
            return process_file(path, reader, size)
        except Exception as exc:  # a reader bug or an unexpected client error costs one file
            return outcome_of(HeaderResult(ERROR, reason=Reason.UNREADABLE,
                                           detail=f"{type(exc).__name__} while reading"), path)

    items = list(items)
    if pool is None or len(items) < 2:
        return [guarded(item) for item in items]
    return list(pool.map(guarded, items))


def listing_failure(where: inputs.Path, exc: OSError) -> FileOutcome:
    """A folder or prefix that could not be listed: one error line, counted as one matched entry
    (as a local folder that cannot be listed is); ``unavailable`` when storage still failed
    transiently past the retry deadline, else ``unreadable``."""
    reason = Reason.UNAVAILABLE if isinstance(exc, SourceUnavailable) else Reason.UNREADABLE
    detail = f"cannot be listed: {exc.strerror or type(exc).__name__}"
    outcome = outcome_of(HeaderResult(ERROR, reason=reason, detail=detail), where)
    outcome.counts["files_matched"] += 1
    return outcome


def outcome_of(result: HeaderResult, path: inputs.Path | None = None, **where) -> FileOutcome:
    """Counts and error line for one read header; ``where`` names the source when there is no path."""
    if result.kind == INSTANCE:
        problem = dicom_uid_problem(result.record)
        if problem:
            result = HeaderResult(ERROR, reason=Reason.INVALID_UID, detail=problem)
    counts = Counter()  # (filled key by key: ``Counter(mapping)`` costs microseconds per file)
    for note in result.notes:
        counts[f"note:{note}"] = 1
    if result.kind == INSTANCE:
        counts["instances_read"] += 1  # its outcome is decided with its study
        return FileOutcome(result, None, counts)
    if result.kind in _SKIPPED:
        counts[f"outcome:{_SKIPPED[result.kind]}"] += 1
        return FileOutcome(result, None, counts)
    counts[f"outcome:{Outcome.ERROR}"] += 1
    counts[f"error:{result.reason}"] += 1
    error = {"reason": str(result.reason), "detail": result.detail, **where}
    if path is not None:
        error["path"] = inputs.display_path(path)
    return FileOutcome(result, error, counts)


@dataclass
class StudyOutcome:
    """Lines of one study by resource type (shared ones as ("Type/id", line)), or its error line; and counts."""

    lines: dict = field(default_factory=dict)   # resource type -> [line]
    shared: list = field(default_factory=list)  # ("Type/id", line) of SHARED_TYPES: deduplicated later
    error: dict | None = None
    counts: Counter = field(default_factory=Counter)


_CONVERTED, _DUPLICATE = f"outcome:{Outcome.CONVERTED}", f"outcome:{Outcome.DUPLICATE}"


def dumps(resource: dict) -> str:
    return orjson.dumps(resource).decode("utf-8")


def process_study(group: StudyGroup, config: ConversionConfig, terms, validator,
                  parts: fhir_build.MappedParts | None = None) -> StudyOutcome:
    """Build (and validate) one study; a rejected study names its reason and counts its files.
    ``parts``: the worker's mapped extensions (``build.MappedParts``)."""
    built = fhir_build.build_study(group, config, terms, parts)
    if built.rejection is None and validator is not None:
        built.rejection = validator.problem(built.resources)
    out = StudyOutcome()
    if built.rejection is not None:
        reason, detail = built.rejection
        out.counts["studies_rejected"] += 1
        if group.files:  # a study wholly inside a rejected folder is named by the folder's error
            out.counts[f"outcome:{Outcome.REJECTED_WITH_STUDY}"] += group.files
            out.counts[f"error:{reason}"] += 1
            out.error = {"reason": str(reason), "study_uid": group.study_uid, "files": group.files,
                         "detail": detail}
        return out
    counts = out.counts
    counts.update({"studies_written": 1, _CONVERTED: len(group.instances), _DUPLICATE: group.duplicates})
    for note, count in built.notes.items():
        counts[f"note:{note}"] = count  # each note once (built.notes is a Counter)
    resources = built.resources
    if config.patients or config.encounters:
        resources = resources + referenced_resources(resources, config.patients, config.encounters)
    lines = out.lines
    for resource_type, resource in resources:
        if resource_type in SHARED_TYPES:
            out.shared.append((f"{resource_type}/{resource['id']}", dumps(resource)))
        else:
            typed = lines.get(resource_type)
            if typed is None:
                typed = lines[resource_type] = []
            typed.append(dumps(resource))
            counts["lines:" + resource_type] += 1
    if config.bundles:
        out.lines["Bundle"] = [dumps(transaction_bundle(resources))]
        out.counts["lines:Bundle"] += 1
    return out


def pick_shared(lines) -> str:
    """The one line written for a Device (Patient, Encounter) id that several studies built (Devices
    may differ in model name): the smallest, so every runner and worker count picks the same."""
    return min(lines)


def shared_type(key: str) -> str:
    """The resource type of a shared line's ``Type/id`` key."""
    return key.split("/", 1)[0]


def error_line(error: dict) -> str:
    return orjson.dumps(error, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def error_lines(error: dict) -> list[tuple[str, str]]:
    """An error as a plain JSON line and as an OperationOutcome line (the Bulk Data error file)."""
    return [(ERRORS_NAME, error_line(error)), (OUTCOMES_NAME, dumps(bulk_data.error_outcome(error)))]


@dataclass
class StudyRead:
    """Records of a fetched study's instances, the error lines for the rest, and the counts.

    Each instance the server returned counts as one matched "file", so the outcomes add up as for
    files; a study that could not be fetched has no known instances and counts as failed.
    """

    records: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def process_fetched_study(fetched: dicomweb.FetchedStudy, spec: FieldSpec) -> StudyRead:
    """The records of a study fetched from DICOMweb, and an outcome for each of its instances."""
    read = StudyRead()
    if fetched.error is not None:
        read.counts["dicomweb:studies_failed"] += 1
        read.counts[f"error:{fetched.error['reason']}"] += 1
        read.errors.append({**fetched.error, "reason": str(fetched.error["reason"])})
        return read
    read.counts["dicomweb:studies_fetched"] += 1
    read.counts["files_matched"] += len(fetched.instances)
    for index, dataset in enumerate(fetched.instances):
        outcome = outcome_of(dicomweb.read_instance(dataset, spec), study_uid=fetched.study_uid, instance=index)
        read.counts.update(outcome.counts)
        if outcome.error is not None:
            read.errors.append(outcome.error)
        elif outcome.result.record is not None:
            read.records.append(outcome.result.record)
    return read
