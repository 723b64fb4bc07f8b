"""The pipeline's steps, in order, one module each (``pipeline`` wires them); this module only
re-exports their names for callers that import them from here.

``steps`` (tagged outputs, counts), ``listing`` (1), ``reading`` (2), ``nightly`` (1+2 from a
previous run), ``dicomweb_read`` (1+2 over DICOMweb), ``grouping`` (3), ``building`` (4),
``writing`` (5), ``summarizing`` (6).
"""
from __future__ import annotations

from beam_pipeline.run.building import BuildResources, BuildStudyDoFn, shared_delta
from beam_pipeline.run.dicomweb_read import (
    STUDIES_PER_BATCH,
    ChooseStudiesDoFn,
    FetchStudiesDoFn,
    ListStudiesDoFn,
    ReadDicomWeb,
    ReuseSourcesDoFn,
    listed_once,
)
from beam_pipeline.run.grouping import DirectoryGuardDoFn, GroupStudies, MergeGroupsFn, merge_partials
from beam_pipeline.run.listing import PARTS, ListFilesDoFn, ListInputFiles
from beam_pipeline.run.nightly import ChooseUnitsDoFn, ReadChangedHeaders, ReadState, ReuseUnitsDoFn
from beam_pipeline.run.reading import BatchJobsDoFn, ListedUnits, ReadHeaderDoFn, ReadHeaders, SharedReading, add_partial
from beam_pipeline.run.steps import COUNTS, DELETED, DELTA, ERRORS, NAMESPACE, PATHS_PER_BATCH, STATE, SumCounts
from beam_pipeline.run.summarizing import Summarize, WriteSummaryDoFn
from beam_pipeline.run.writing import WriteDeletions, WriteNdjson

__all__ = [
    "BuildResources", "BuildStudyDoFn", "shared_delta",
    "STUDIES_PER_BATCH", "ChooseStudiesDoFn", "FetchStudiesDoFn", "ListStudiesDoFn", "ReadDicomWeb", "listed_once",
    "DirectoryGuardDoFn", "GroupStudies", "MergeGroupsFn", "merge_partials",
    "PARTS", "ListFilesDoFn", "ListInputFiles",
    "ChooseUnitsDoFn", "ReadChangedHeaders", "ReadState", "ReuseSourcesDoFn", "ReuseUnitsDoFn",
    "BatchJobsDoFn", "ListedUnits", "ReadHeaderDoFn", "ReadHeaders", "SharedReading", "add_partial",
    "COUNTS", "DELETED", "DELTA", "ERRORS", "NAMESPACE", "PATHS_PER_BATCH", "STATE", "SumCounts",
    "Summarize", "WriteSummaryDoFn",
    "WriteDeletions", "WriteNdjson",
]
