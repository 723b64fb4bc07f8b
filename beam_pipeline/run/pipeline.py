"""Wires the steps (``listing``, ``reading``, ``nightly``, ``dicomweb_read``, ``grouping``, ``building``,
``writing``, ``summarizing``) into one pipeline, and runs it to completion."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.run import (
    beam_memo,
    building,
    core,
    dicomweb_read,
    fhir_sink,
    grouping,
    layout,
    listing,
    nightly,
    output,
    reading,
    state,
    summarizing,
    writing,
)
from beam_pipeline.run.progress import ProgressReporter
from beam_pipeline.run.settings import Settings
from beam_pipeline.run.summary import read_summary
from beam_pipeline.sources import files as inputs

_LOG = logging.getLogger(__name__)


def conversion_config(settings: Settings) -> ConversionConfig:
    """The mapping's options, ``meta.source`` filled in: the input's root as a URI unless given
    (the DICOMweb base is set by the CLI)."""
    config = settings.conversion
    if config.source is None and settings.input is not None:
        config = dataclasses.replace(config, source=inputs.root_uri(inputs.resolve_pattern(settings.input)))
    return config


def build_pipeline(pipeline, settings: Settings, started: float | None = None,
                   previous: state.Previous | None = None) -> None:
    """List -> read headers -> group per study -> build -> write; files and counts -> manifest.json,
    then summary.json last. With the ``previous`` run's state, only new and changed files are read
    and only changed studies rebuilt, and what changed is written to ``_delta/``."""
    started = time.time() if started is None else started
    progress = settings.progress
    config = conversion_config(settings)
    temp = output.temp_dir(settings)
    dropped = []  # --since: the previous lines not kept (the other lines of ``kept`` names are)
    kept = []
    if settings.dicomweb is not None:
        listed_counts = listing_errors = None
        before = None if previous is None else (
            pipeline | "PreviousSources" >> nightly.ReadState(previous.sources, state.read_source_line))
        partials, file_errors, read_counts, source_state = pipeline | "ReadDicomWeb" >> dicomweb_read.ReadDicomWeb(
            settings.dicomweb, progress, previous_sources=before)
    else:
        batches, listed_counts, listing_errors = pipeline | "ListFiles" >> listing.ListInputFiles(
            settings.input, settings.output, progress=progress, retry_deadline=settings.retry_deadline,
            by_unit=previous is not None)  # --since: folder units, joined with the previous ones
        root = inputs.group_root(settings.input)
        read_headers = reading.ReadHeaders(
            settings.use_fast_reader, settings.group_by, root, progress,
            settings.read_concurrency, settings.max_header_bytes, settings.retry_deadline)
        if previous is None:
            partials, file_errors, read_counts, source_state = (batches | "Units" >> reading.ListedUnits()
                                                                | "ReadHeaders" >> read_headers)
        else:
            before = pipeline | "PreviousSources" >> nightly.ReadUnits(previous.sources)
            partials, file_errors, read_counts, source_state, dropped_sources = (
                batches | "ReadChangedHeaders" >> nightly.ReadChangedHeaders(before, read_headers, progress=progress))
            kept, dropped = [layout.SOURCE_STATE_NAME], [dropped_sources]
    groups, folder_errors, folder_counts = partials | "GroupStudies" >> grouping.GroupStudies(settings.group_by)
    previous_studies = None if previous is None else (
        pipeline | "PreviousStudies" >> nightly.ReadState(previous.studies, state.read_study_line))
    studies, shared, study_errors, build_counts, study_state, changes = groups | "BuildResources" >> building.BuildResources(
        config, settings.validate, progress, previous_studies, previous.reuse_studies if previous else True)
    if previous is not None and previous.reuse_studies:  # reused studies' lines: from the previous output
        kept, dropped = kept + list(nightly.STUDY_NAMES), dropped + [changes[2]]
    kept_runs = None
    if kept:  # the previous output's lines of the units and studies reused, read by the merge
        kept_runs = (dropped | "AllDropped" >> beam.Flatten()
                     | "KeptLines" >> nightly.KeepPreviousLines(previous.folder, kept))
    errors = _collections(listing_errors, file_errors, folder_errors, study_errors)
    sink = None
    if settings.fhir_server is not None:
        sent = studies if kept_runs is None else (
            (studies, kept_runs | "KeptBundles" >> beam.FlatMap(
                lambda run: nightly.run_lines(run) if run.name == layout.BUNDLE_NAME else ()))
            | "AllStudyLines" >> beam.Flatten())
        sink = sent | "FhirServer" >> fhir_sink.WriteToFhirServer(
            settings.fhir_server, fhir_sink.previous_shards(settings.since), started, settings.stable_after,
            deleted=changes[1] if changes is not None else None)
        errors.append(sink[0])
    error_lines = (errors
                   | "AllErrors" >> beam.Flatten()
                   | "ErrorLines" >> beam.FlatMap(core.error_lines))
    # Each source of lines writes its own sorted runs, fused with the step that makes them (lines
    # that went through a Flatten would be held in memory between stages by the in-process runner);
    # only the runs' descriptions are brought together, and merged once per name.
    small = [shared, error_lines] + ([sink[2]] if sink else [])
    if changes is not None:
        small.append(changes[0])
    runs = [studies | "StudyRuns" >> writing.SortedRuns(temp),
            study_state | "StudyStateRuns" >> writing.SortedRuns(temp),
            source_state | "SourceStateRuns" >> writing.SortedRuns(temp),
            small | "SmallOutputs" >> beam.Flatten() | "SmallRuns" >> writing.SortedRuns(temp)]
    runs += [kept_runs] if kept_runs is not None else []  # --since: lines kept as they were
    written = [runs | "AllRuns" >> beam.Flatten() | "WriteFiles" >> writing.MergeRuns(temp)]
    if changes is not None:
        written.append(changes[1] | "WriteDeletions" >> writing.WriteDeletions(temp))
    counts = (_collections(listed_counts, read_counts, folder_counts, build_counts, sink and sink[1])
              | "AllCounts" >> beam.Flatten())
    (counts, written | "AllWritten" >> beam.Flatten()) | "Summarize" >> summarizing.Summarize(settings, started, config)


def _collections(*items) -> list:
    """The collections given, a tuple of them counting as its members, None as none: flattened
    once (on the local runner, a Flatten of a Flatten costs a stage)."""
    return [c for item in items if item is not None for c in (item if isinstance(item, tuple) else (item,))]


def local_runner(options):
    """The in-process FnApiRunner unless a runner was named: Beam 2.77's DirectRunner first tries
    to download the Prism runner, which an air-gapped machine cannot do. ``--runner dask`` is
    this project's Dask runner (``run/dask_runner.py``)."""
    runner = options.view_as(StandardOptions).runner
    if runner is not None and runner.lower() in ("dask", "daskrunner"):  # beam_pipeline.run.dask_runner.NAMES
        from beam_pipeline.run.dask_runner import DaskRunner

        return DaskRunner()
    if runner in (None, "DirectRunner"):
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        from apache_beam.runners.portability.fn_api_runner.fn_runner import ExtendedProvisionInfo
        from google.protobuf import struct_pb2

        # Workers of --direct_running_mode multi_processing get no options from the runner and
        # log every gRPC channel at INFO on the console; WARNING keeps what matters.
        worker_options = struct_pb2.Struct()
        worker_options.update({"default_sdk_harness_log_level": "WARNING",
                               # a notice about main sessions, which this pipeline does not use
                               "sdk_harness_log_level_overrides": {"__main__": "ERROR"}})
        return FnApiRunner(provision_info=ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(
            retrieval_token="unused-retrieval-token", pipeline_options=worker_options)))
    return None


def in_process(runner) -> bool:
    """Whether ``local_runner`` gave the in-process FnApiRunner."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return isinstance(runner, FnApiRunner)


def execute(new_pipeline, settings: Settings) -> dict:
    """Check the source, prepare the output, run to completion, return the summary the pipeline wrote.

    ``new_pipeline()`` makes the Pipeline once the checks have passed: Beam creates a temp folder
    for every Pipeline object and removes it only when it runs, so a run refused here leaves none.
    """
    started = time.time()
    if settings.dicomweb is not None:  # unreachable server, refused credentials: one line, no pipeline
        from beam_pipeline.sources import dicomweb

        dicomweb.check_server(settings.dicomweb.connection, settings.dicomweb.query)
    previous = None
    if settings.since is not None:
        previous = state.check_previous(settings.since, settings, conversion_config(settings))
        if previous.changed_options:
            _LOG.warning("the conversion options differ from the --since run's (%s): every study is rebuilt "
                         "from the kept records", ", ".join(previous.changed_options))
    output.prepare(settings.output, settings.input)
    beam_memo.install()
    pipeline = new_pipeline()
    build_pipeline(pipeline, settings, started, previous)
    reporter = ProgressReporter(settings.progress) if settings.progress else contextlib.nullcontext()
    try:
        with reporter:
            result = pipeline.run()
            result.wait_until_finish()
    finally:
        output.remove_temp_dir(settings)
        output.remove_empty_subfolders(settings.output)
    summary = read_summary(settings.output)
    if summary["files_matched"] == 0:
        _LOG.warning("no instance was found on the DICOMweb server" if settings.dicomweb is not None
                     else "no file matched --input")
    return summary
