"""Step 6: once every file is written, move them into place and write the state's header,
``manifest.json`` and ``summary.json`` (last: its presence marks a complete run)."""
from __future__ import annotations

import time

import apache_beam as beam

from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.run import layout, output, state
from beam_pipeline.run.settings import Settings
from beam_pipeline.run.steps import SumCounts
from beam_pipeline.run.summary import summarize


class WriteSummaryDoFn(beam.DoFn):
    """Moves the written files into place, then writes the state's header, manifest.json and
    summary.json last, once every shard is written (their side inputs are complete only then).

    Each document is written beside the files and renamed into place, so a run killed at any moment
    leaves either every file and its summary.json, or no summary.json (``output.prepare`` removed
    the previous one first)."""

    def __init__(self, settings: Settings, started: float, config: ConversionConfig):
        self.settings = settings
        self.started = started
        self.config = config

    def process(self, _, counts, files):
        settings = self.settings
        output.publish(settings, files)
        header = state.header(settings, self.config, state.shard_sizes(settings.output, files))
        output.place_document(settings, layout.STATE_HEADER_NAME, output.json_bytes(header, sort_keys=True))
        output.place_document(settings, layout.MANIFEST_NAME,
                              output.json_bytes(output.folder_manifest(settings, self.started, files)))
        if settings.since is not None:
            output.place_document(settings, layout.DELTA_MANIFEST_NAME,
                                  output.json_bytes(output.delta_manifest(settings, self.started, files)))
        summary = summarize(counts, time.time() - self.started)
        output.place_document(settings, layout.SUMMARY_NAME, output.json_bytes(summary))
        output.remove_temp_dir(settings)
        yield summary


class Summarize(beam.PTransform):
    """All counts + the written files -> manifest.json and summary.json, written last: the summary's
    presence marks a complete run."""

    def __init__(self, settings: Settings, started: float, config: ConversionConfig):
        super().__init__()
        self.settings = settings
        self.started = started
        self.config = config

    def expand(self, pcolls):
        counts, written_files = pcolls
        total = counts | "Sum" >> beam.CombineGlobally(SumCounts())
        return (counts.pipeline
                | "Once" >> beam.Create([None])
                | "WriteSummary" >> beam.ParDo(WriteSummaryDoFn(self.settings, self.started, self.config),
                                               counts=beam.pvalue.AsSingleton(total),
                                               files=beam.pvalue.AsList(written_files)))
