"""Step 6: once every file is written, move them into place and write the state's header,
``manifest.json`` and ``summary.json`` (last: its presence marks a complete run)."""
from __future__ import annotations

import time

import apache_beam as beam

from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.run import layout, output, state
from beam_pipeline.run.settings import Settings
from beam_pipeline.run.steps import SumCounts
from beam_pipeline.run.summary import summarize, write_summary


class WriteSummaryDoFn(beam.DoFn):
    """Moves the written files into place, then writes the state's header, manifest.json and
    summary.json, once every shard is written (their side inputs are complete only then)."""

    def __init__(self, settings: Settings, started: float, config: ConversionConfig):
        self.settings = settings
        self.started = started
        self.config = config

    def process(self, _, counts, files):
        output_dir = self.settings.output
        output.publish(self.settings, files)
        output.remove_temp_dir(self.settings)
        state.write_header(output_dir, state.header(self.settings, self.config, state.shard_sizes(output_dir, files)))
        output.write_json(output_dir, layout.MANIFEST_NAME, output.folder_manifest(self.settings, self.started, files))
        if self.settings.since is not None:
            output.write_json(output_dir, layout.DELTA_MANIFEST_NAME, output.delta_manifest(self.settings, self.started, files))
        summary = summarize(counts, time.time() - self.started)
        write_summary(output_dir, summary)
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
