"""The Beam pipeline: match files, read headers, group per study, build FHIR, write NDJSON.

Each domain step is one composite PTransform; the DICOM and FHIR logic lives in pure modules
(`header`, `study`, `fhir_build`, `mii`) and is only wired here.
"""
from __future__ import annotations

import argparse
import glob as globlib
import json
import logging
import os
import stat
import time
import warnings
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from beam_pipeline import fhir_build, header, study
from beam_pipeline.codes import INVALID_KEY
from beam_pipeline.fields import CORE_KEYWORDS, default_spec

NAMESPACE = "dicom2fhir"
RESOURCE_TYPES = ("ImagingStudy", "Device", "Observation")
OUTCOMES = ("converted", "duplicate", "skipped_not_dicom", "skipped_dicomdir", "error", "rejected_with_study")
PATHS_PER_BATCH = 200  # files read per element after the reshuffle: fewer, larger shuffled elements

_LOG = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# 1. Match


def resolve_pattern(input_path: str) -> str:
    """A directory (local or bucket prefix) becomes a recursive glob; a glob or file stays as is.
    Local paths become absolute, so that matched paths and folder keys agree."""
    if "://" not in input_path:
        input_path = os.path.abspath(input_path)
        if os.path.isdir(input_path):  # walked whatever its name: "Study [2020]" is no glob
            return os.path.join(globlib.escape(input_path), "**")
        return input_path if globlib.has_magic(input_path) else globlib.escape(input_path)
    if globlib.has_magic(input_path):
        return input_path
    if input_path.endswith("/") or not FileSystems.exists(input_path):
        return input_path.rstrip("/") + "/**"
    return input_path


def group_root(input_path: str) -> str:
    """The folder whose first-level subfolders are studies in ``--group-by directory`` mode."""
    root = input_path if "://" in input_path else os.path.abspath(input_path)
    if "://" not in root and os.path.isdir(root):
        return root.rstrip("/")
    while globlib.has_magic(root):
        root = root.rsplit("/", 1)[0]
    return root.rstrip("/")


def first_level_folder(path: str, root: str) -> str:
    """Key of a file in directory mode: its first-level folder under root (files at the top: root)."""
    relative = path[len(root):].lstrip("/") if path.startswith(root) else path
    parts = relative.split("/")
    return root + "/" + parts[0] if len(parts) > 1 else root


class MatchInputFiles(beam.PTransform):
    """Lists the input files and spreads them, in batches of paths, over the workers."""

    def __init__(self, pattern: str, batch_size: int = PATHS_PER_BATCH):
        super().__init__()
        self.pattern = pattern
        self.batch_size = batch_size

    def expand(self, pbegin):
        matched = Metrics.counter(NAMESPACE, "files_matched")

        def path_of(metadata):
            matched.inc()
            return metadata.path

        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "Path" >> beam.Map(path_of)
            | "Batch" >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            | "Spread" >> beam.Reshuffle()
        )


# ---------------------------------------------------------------------------------------------
# 2. Read headers


GCS_READ_CHUNK = 64 * 1024  # Beam's GCS reader fetches 16 MiB per read by default: pixel data


class FileOpener:
    """Opens input files for reading headers: local files directly, ``gs://`` objects with small
    ranged reads (so pixel data is not downloaded), other schemes through Beam's FileSystems."""

    def __init__(self):
        self._gcs = None

    def __call__(self, path: str):
        if path.startswith("gs://"):
            if self._gcs is None:
                from apache_beam.io.gcp.gcsio import GcsIO

                self._gcs = GcsIO()
            return self._gcs.open(path, "rb", read_buffer_size=GCS_READ_CHUNK)
        if "://" in path:
            return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
        return open(path, "rb")


class ReadHeaderDoFn(beam.DoFn):
    """Reads the headers of a batch of files and pre-aggregates its instances per study.

    Emits one (group key, serialized partial) per study found in the batch instead of one element
    per instance, so the shuffle carries few, compact elements (the multi-process runner routes each
    shuffled element through its coordinator). Errors go to a tagged output.
    """

    ERRORS = "errors"

    def __init__(self, use_fast_reader: bool = True, group_by: str = "study", root: str = ""):
        self.use_fast_reader = use_fast_reader
        self.group_by = group_by
        self.root = root
        self.files = Metrics.counter(NAMESPACE, "files_read")
        self.not_dicom = Metrics.counter(NAMESPACE, "outcome:skipped_not_dicom")
        self.dicomdir = Metrics.counter(NAMESPACE, "outcome:skipped_dicomdir")
        self.errors = Metrics.counter(NAMESPACE, "outcome:error")
        self.instances = Metrics.counter(NAMESPACE, "instances_read")

    def setup(self):
        self.spec = default_spec()
        self.instance_keys = instance_keys()
        self.open_file = FileOpener()
        # pydicom's warnings about odd files may quote element values (patient data): keep them
        # off the console. Set once per worker: catch_warnings per file is not thread-safe.
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="pydicom")

    def process(self, paths):
        partials: dict[str, dict] = {}
        for path in paths:
            result = self._read(path)
            self.files.inc()
            if result.kind == header.INSTANCE:
                self.instances.inc()
                for keyword in result.record.get(INVALID_KEY, ()):
                    Metrics.counter(NAMESPACE, f"note:unparseable:{keyword}").inc()
                key = (first_level_folder(path, self.root) if self.group_by == "directory"
                       else result.record["StudyInstanceUID"])
                study.add_to_directory(partials.setdefault(key, {}), result.record, self.instance_keys)
            elif result.kind == header.NOT_DICOM:
                self.not_dicom.inc()
            elif result.kind == header.DICOMDIR:
                self.dicomdir.inc()
            else:
                self.errors.inc()
                Metrics.counter(NAMESPACE, f"error:{result.reason}").inc()
                yield beam.pvalue.TaggedOutput(self.ERRORS, {"reason": result.reason, "path": path,
                                                             "detail": result.detail})
        for key in sorted(partials):
            yield key, study.dump_groups(partials[key])

    def _read(self, path: str) -> header.HeaderResult:
        try:
            if "://" not in path and not stat.S_ISREG(os.stat(path).st_mode):  # would block or never end
                return header.HeaderResult(header.ERROR, reason="not-a-regular-file",
                                           detail="a FIFO, socket or device file is not read")
            with self.open_file(path) as fp:
                return header.read_header(fp, self.spec, use_fast=self.use_fast_reader)
        except OSError as exc:
            return header.HeaderResult(header.ERROR, reason="unreadable", detail=f"{type(exc).__name__}: {exc.strerror or exc}")


def instance_keys() -> tuple[str, ...]:
    from beam_pipeline import mii

    return tuple(dict.fromkeys(CORE_KEYWORDS["instance"] + tuple(mii.KEYWORDS["instance"])))


class ReadHeaders(beam.PTransform):
    """Batches of paths -> ((group key, serialized partial groups), file errors)."""

    def __init__(self, use_fast_reader: bool = True, group_by: str = "study", root: str = ""):
        super().__init__()
        self.dofn = ReadHeaderDoFn(use_fast_reader, group_by, root)

    def expand(self, batches):
        results = batches | "ReadHeader" >> beam.ParDo(self.dofn).with_outputs(
            ReadHeaderDoFn.ERRORS, main="partials")
        return results.partials, results[ReadHeaderDoFn.ERRORS]


# ---------------------------------------------------------------------------------------------
# 3. Group per study (multi-study guard)


def merge_partials(item) -> tuple[str, dict]:
    key, blobs = item
    return key, study.merge_directories(study.load_groups(blob) for blob in blobs)


@beam.typehints.with_output_types(tuple[str, study.StudyGroup])
class DirectoryGuardDoFn(beam.DoFn):
    """Rejects a folder holding more than one study as a whole; passes single-study folders on."""

    REJECTED = "rejected"

    def __init__(self):
        self.rejected_files = Metrics.counter(NAMESPACE, "outcome:rejected_with_study")

    def process(self, item):
        directory, groups = item
        if len(groups) == 1:
            (uid, group), = groups.items()
            yield uid, group
            return
        uids = sorted(groups)
        files = sum(g.files for g in groups.values())
        self.rejected_files.inc(files)
        Metrics.counter(NAMESPACE, f"error:{study.MULTIPLE_STUDIES_IN_DIRECTORY}").inc()
        yield beam.pvalue.TaggedOutput(self.REJECTED, {
            "reason": study.MULTIPLE_STUDIES_IN_DIRECTORY, "path": directory, "study_uids": uids,
            "files": files, "detail": f"{len(uids)} StudyInstanceUIDs in one folder: {', '.join(uids)}",
        })
        for uid in uids:  # no file of these studies may be written from other folders either
            yield uid, study.StudyGroup(uid, rejected_folders={directory})


class MergeGroupsFn(beam.CombineFn):
    """Merges StudyGroups of one study found in several folders (directory mode)."""

    def create_accumulator(self):
        return None

    def add_input(self, merged, group):
        return group if merged is None else merged.merge(group)

    def merge_accumulators(self, groups):
        merged = None
        for group in groups:
            if group is not None:
                merged = group if merged is None else merged.merge(group)
        return merged

    def extract_output(self, merged):
        return merged


class GroupStudies(beam.PTransform):
    """Partials keyed by study (or folder) -> one StudyGroup per study, plus folder rejections
    (directory mode; None in study mode)."""

    def __init__(self, group_by: str = "study"):
        super().__init__()
        self.group_by = group_by

    def expand(self, partials):
        merged = (partials
                  | "Shuffle" >> beam.GroupByKey()
                  | "Merge" >> beam.Map(merge_partials))
        if self.group_by == "study":
            return merged | "OneStudy" >> beam.FlatMap(lambda item: item[1].values()), None
        guarded = merged | "Guard" >> beam.ParDo(DirectoryGuardDoFn()).with_outputs(
            DirectoryGuardDoFn.REJECTED, main="ok")
        groups = (guarded.ok
                  | "MergeSplitStudies" >> beam.CombinePerKey(MergeGroupsFn())
                  | "DropKey" >> beam.Values())
        return groups, guarded[DirectoryGuardDoFn.REJECTED]


# ---------------------------------------------------------------------------------------------
# 4. Build resources


def dumps(resource: dict) -> str:
    return orjson.dumps(resource).decode("utf-8")


class BuildResourcesDoFn(beam.DoFn):
    """StudyGroup -> (resource type, NDJSON line); rejected studies go to the errors output."""

    ERRORS = "errors"
    DEVICES = "devices"

    def __init__(self, config: fhir_build.ConversionConfig, validate: str = "sampled"):
        self.config = config
        self.validate = validate
        self.converted = Metrics.counter(NAMESPACE, "outcome:converted")
        self.duplicates = Metrics.counter(NAMESPACE, "outcome:duplicate")
        self.rejected_files = Metrics.counter(NAMESPACE, "outcome:rejected_with_study")
        self.written = Metrics.counter(NAMESPACE, "studies_written")
        self.rejected = Metrics.counter(NAMESPACE, "studies_rejected")

    def setup(self):
        from terminologies import Terminologies

        self.terms = Terminologies.load()
        self.validator = None if self.validate == "none" else fhir_build.Validator(full=self.validate == "full")

    def process(self, group):
        built = fhir_build.build_study(group, self.config, self.terms)
        if built.rejection is None and self.validator is not None:
            built.rejection = self.validator.problem(built.resources)
        if built.rejection is not None:
            reason, detail = built.rejection
            self.rejected.inc()
            if group.files:  # a study wholly inside a rejected folder is named by the folder's error
                self.rejected_files.inc(group.files)
                Metrics.counter(NAMESPACE, f"error:{reason}").inc()
                yield beam.pvalue.TaggedOutput(self.ERRORS, {"reason": reason, "study_uid": group.study_uid,
                                                             "files": group.files, "detail": detail})
            return
        self.written.inc()
        self.converted.inc(len(group.instances))
        self.duplicates.inc(group.duplicates)
        for note, count in built.notes.items():
            Metrics.counter(NAMESPACE, f"note:{note}").inc(count)
        for resource_type, resource in built.resources:
            if resource_type == "Device":  # shared by studies: deduplicated downstream
                yield beam.pvalue.TaggedOutput(self.DEVICES, (resource["id"], dumps(resource)))
            else:
                yield resource_type, dumps(resource)


class BuildResources(beam.PTransform):
    """StudyGroups -> (resource type, NDJSON line), errors; each Device once for the whole run."""

    def __init__(self, config: fhir_build.ConversionConfig, validate: str = "sampled"):
        super().__init__()
        self.config = config
        self.validate = validate

    def expand(self, groups):
        """Returns (ImagingStudy/Observation lines, Device lines, errors), each as (name, line)."""
        built = groups | "Build" >> beam.ParDo(BuildResourcesDoFn(self.config, self.validate)).with_outputs(
            BuildResourcesDoFn.ERRORS, BuildResourcesDoFn.DEVICES, main="resources")
        devices = (built[BuildResourcesDoFn.DEVICES]
                   | "DeviceOnce" >> beam.CombinePerKey(min)  # same id: one line, chosen deterministically
                   | "DeviceLine" >> beam.Map(lambda item: ("Device", item[1])))
        return built.resources, devices, built[BuildResourcesDoFn.ERRORS]


# ---------------------------------------------------------------------------------------------
# 5. Write


class _NdjsonSink(fileio.FileSink):
    """Writes the line of each (name, line) element."""

    def open(self, fh):
        self._fh = fh

    def write(self, record):
        self._fh.write(record[1].encode("utf-8"))
        self._fh.write(b"\n")

    def flush(self):
        self._fh.flush()


class WriteNdjson(beam.PTransform):
    """(name, line) -> sharded ``<name>-SSSSS-of-NNNNN.ndjson`` files, several names in one step.

    Apply it where the lines are produced: a Flatten in front would make the runner materialize
    every line between stages.
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def expand(self, named_lines):
        def count(item):
            Metrics.counter(NAMESPACE, f"lines:{item[0]}").inc()
            return item

        return (named_lines
                | "Count" >> beam.Map(count)
                | "Write" >> fileio.WriteToFiles(
                    path=self.output_dir, destination=lambda item: item[0], sink=lambda _: _NdjsonSink(),
                    file_naming=fileio.destination_prefix_naming(".ndjson")))


def error_line(error: dict) -> str:
    return json.dumps(error, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipeline",
        description="Convert a DICOM archive into FHIR R4 ImagingStudy/Device NDJSON for bulk import.")
    parser.add_argument("--input", required=True, help="directory (recursive), glob, or gs:// path/glob")
    parser.add_argument("--output", required=True, help="output directory (local or gs://)")
    parser.add_argument("--group-by", choices=("study", "directory"), default="study",
                        help="study: one study across any folders (default); directory: each first-level "
                             "folder under --input is one study, folders with several studies are rejected")
    defaults = fhir_build.ConversionConfig()
    parser.add_argument("--study-id-system", default=defaults.study_id_system)
    parser.add_argument("--patient-id-system", default=defaults.patient_id_system)
    parser.add_argument("--accession-id-system", default=defaults.accession_id_system,
                        help="system of the ACSN identifier (default: none, as the legacy converter)")
    parser.add_argument("--encounter-id-system", default=defaults.encounter_id_system,
                        help="system of Encounter identifiers built from AdmissionID")
    parser.add_argument("--patient-id-length", type=int, default=None,
                        help="keep only the first N characters of PatientID (default: whole)")
    parser.add_argument("--timezone", default=defaults.timezone,
                        help="zone of DICOM dates without TimezoneOffsetFromUTC (default Europe/Berlin)")
    parser.add_argument("--no-instances", action="store_true", help="leave out the instance level")
    parser.add_argument("--no-devices", action="store_true", help="write no Device resources")
    parser.add_argument("--observations", action="store_true",
                        help="write body weight/height Observations and reference them")
    parser.add_argument("--validate", choices=("sampled", "full", "none"), default="sampled",
                        help="fhir.resources R4B validation of every study: sampled (default) validates each "
                             "resource with one instance per distinct instance shape and checks every "
                             "instance uid; full validates every instance (slow for large studies); none")
    parser.add_argument("--pydicom-only", action="store_true",
                        help="read every header with pydicom instead of the fast scanner")
    args, beam_args = parser.parse_known_args(argv)
    if "://" not in args.input and not os.path.exists(args.input) and not globlib.has_magic(args.input):
        parser.error(f"--input {args.input} does not exist")
    if args.patient_id_length is not None and args.patient_id_length < 1:
        parser.error("--patient-id-length must be at least 1")
    try:
        ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        parser.error(f"--timezone {args.timezone!r} is not a known time zone")
    return args, beam_args


def config_from_args(args) -> fhir_build.ConversionConfig:
    return fhir_build.ConversionConfig(
        study_id_system=args.study_id_system, patient_id_system=args.patient_id_system,
        accession_id_system=args.accession_id_system, encounter_id_system=args.encounter_id_system,
        patient_id_length=args.patient_id_length, timezone=args.timezone,
        include_instances=not args.no_instances, include_devices=not args.no_devices,
        observations=args.observations)


def build_pipeline(pipeline, args) -> None:
    """Wires the steps; shared by run() and the tests."""
    config = config_from_args(args)
    root = group_root(args.input)
    batches = pipeline | "MatchFiles" >> MatchInputFiles(resolve_pattern(args.input))
    partials, file_errors = batches | "ReadHeaders" >> ReadHeaders(not args.pydicom_only, args.group_by, root)
    groups, folder_errors = partials | "GroupStudies" >> GroupStudies(args.group_by)
    studies, devices, study_errors = groups | "BuildResources" >> BuildResources(config, validate=args.validate)
    studies | "WriteStudies" >> WriteNdjson(args.output)
    errors = [e for e in (file_errors, folder_errors, study_errors) if e is not None]
    error_lines = (errors
                   | "AllErrors" >> beam.Flatten()
                   | "ErrorLine" >> beam.Map(lambda error: ("errors", error_line(error))))
    (devices, error_lines) | "SmallOutputs" >> beam.Flatten() | "WriteDevicesAndErrors" >> WriteNdjson(args.output)


def local_runner(options: PipelineOptions):
    """The in-process FnApiRunner unless a runner was named: Beam 2.77's DirectRunner first tries
    to download the Prism runner, which an air-gapped machine cannot do."""
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def clear_previous_output(output_dir: str) -> None:
    """Old shards would mix with new ones (a re-run may write fewer shards): remove ours only."""
    patterns = [FileSystems.join(output_dir, f"{name}-*-of-*.ndjson") for name in (*RESOURCE_TYPES, "errors")]
    patterns.append(FileSystems.join(output_dir, "summary.json"))
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if stale:
        FileSystems.delete(stale)


def remove_empty_temp_dirs(output_dir: str) -> None:
    """fileio leaves its emptied local ``.temp…`` folders behind (object stores have no folders)."""
    if "://" in output_dir or not os.path.isdir(output_dir):
        return
    for entry in os.scandir(output_dir):
        if entry.name.startswith(".temp") and entry.is_dir() and not os.listdir(entry.path):
            os.rmdir(entry.path)


def counters(result) -> dict[str, int]:
    """Committed counter values of this pipeline, summed over the steps that share a name."""
    totals: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals


def summarize(totals: dict[str, int], seconds: float) -> dict:
    def prefixed(prefix):
        return {k[len(prefix):]: v for k, v in sorted(totals.items()) if k.startswith(prefix)}

    outcomes = {name: totals.get(f"outcome:{name}", 0) for name in OUTCOMES}
    converted = outcomes["converted"]
    return {
        "files_matched": totals.get("files_matched", 0),
        "outcomes": outcomes,
        "studies": {"written": totals.get("studies_written", 0), "rejected": totals.get("studies_rejected", 0)},
        "resources": {name: totals.get(f"lines:{name}", 0) for name in RESOURCE_TYPES},
        "errors_by_reason": prefixed("error:"),
        "notes": prefixed("note:"),
        "seconds": round(seconds, 3),
        "instances_per_second": round(converted / seconds, 1) if seconds > 0 else None,
    }


def write_summary(output_dir: str, summary: dict) -> str:
    path = FileSystems.join(output_dir, "summary.json")
    with FileSystems.create(path) as out:
        out.write(json.dumps(summary, indent=2, sort_keys=False).encode("utf-8") + b"\n")
    return path


def describe(summary: dict) -> str:
    """A short human-readable report (counts only: no identifiers)."""
    outcomes = summary["outcomes"]
    accounted = sum(outcomes.values())
    lines = [
        f"files matched: {summary['files_matched']} (accounted for: {accounted})",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()),
        f"studies written: {summary['studies']['written']}, rejected: {summary['studies']['rejected']}",
        "resources: " + ", ".join(f"{k} {v}" for k, v in summary["resources"].items()),
    ]
    if summary["errors_by_reason"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in summary["errors_by_reason"].items()))
    if summary["notes"]:
        lines.append("notes: " + ", ".join(f"{k} {v}" for k, v in summary["notes"].items()))
    lines.append(f"{summary['seconds']} s, {summary['instances_per_second']} instances/s")
    return "\n".join(lines)


def execute(pipeline, args) -> dict:
    """Build, run to completion and summarize; the summary is written to the output directory."""
    started = time.monotonic()
    clear_previous_output(args.output)
    build_pipeline(pipeline, args)
    result = pipeline.run()
    result.wait_until_finish()
    remove_empty_temp_dirs(args.output)
    summary = summarize(counters(result), time.monotonic() - started)
    write_summary(args.output, summary)
    if summary["files_matched"] == 0:
        _LOG.warning("no file matched --input %s", args.input)
    if sum(summary["outcomes"].values()) != summary["files_matched"]:
        _LOG.error("outcomes do not add up to files matched: %s", summary["outcomes"])
    return summary


def run(argv=None) -> dict:
    """Parse options once, run the pipeline, write and print the summary."""
    args, beam_args = parse_args(argv)
    options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = False
    summary = execute(beam.Pipeline(runner=local_runner(options), options=options), args)
    print(describe(summary), flush=True)
    return summary


def main(argv=None) -> int:
    """Console entry: exit 1 when the outcomes do not account for every matched file (a bug)."""
    summary = run(argv)
    return 0 if sum(summary["outcomes"].values()) == summary["files_matched"] else 1
