"""Step 4: build each study's resources (or reuse them from the previous run's state), shared
resources once per run, and with a previous run what changed."""
from __future__ import annotations

import typing
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared

from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.fhir.study import StudyGroup
from beam_pipeline.run import core, delta, folder_state, layout, state
from beam_pipeline.run.progress import ProgressBeacon, ProgressSettings
from beam_pipeline.run.steps import COUNTS, DELETED, DELTA, DROPPED, ERRORS, NAMESPACE, STATE


@beam.typehints.with_output_types(typing.Tuple[str, str])
class BuildStudyDoFn(beam.DoFn):
    """(study uid, {"now": [StudyGroup], "before": [previous StudyEntry]}), or a StudyGroup alone
    (no previous run) -> (resource type, NDJSON line); shared resources (Device, Patient,
    Encounter: each key once per bundle, its smallest line), rejections and the study's state line
    to their own outputs. A study whose records are those of the previous run is not rebuilt: its
    lines come from the state. With a previous run, what changed goes to ``delta``/``deleted``."""

    SHARED = "shared"

    def __init__(self, config: ConversionConfig, validate: str = "sampled", progress: ProgressSettings | None = None,
                 incremental: bool = False, reuse_studies: bool = True):
        self.config = config
        self.validate = validate
        self.progress_settings = progress
        self.incremental = incremental
        self.reuse_studies = reuse_studies
        self.written = Metrics.counter(NAMESPACE, "studies_written")
        self.rejected = Metrics.counter(NAMESPACE, "studies_rejected")
        self.reused = Metrics.counter(NAMESPACE, "studies_reused")

    def setup(self):
        from beam_pipeline.fhir import build as fhir_build
        from terminologies import Terminologies

        self.terms = Terminologies.load()
        self.validator = None if self.validate == "none" else fhir_build.Validator(full=self.validate == "full")
        self.parts = fhir_build.MappedParts()  # per worker: studies of alike scanners repeat them
        self.progress = ProgressBeacon(self.progress_settings)

    def start_bundle(self):
        self.counts = Counter()  # one Counter per bundle crosses to the summary, not one per study
        self.shared = {}  # "Type/id" -> its smallest line in the bundle: alike studies share their Devices

    def process(self, item):
        if isinstance(item, StudyGroup):
            uid, now, before = item.study_uid, [item], []
        else:
            uid, joined = item
            now, before = list(joined["now"]), list(joined["before"])
        previous = before[0] if before else None
        if not now:  # every file of the study is gone (or no longer a valid instance)
            hashes = previous.hashes()
            _, deleted = delta.study_changes(hashes, None)
            yield from (beam.pvalue.TaggedOutput(DELETED, key) for key in deleted)
            yield from _dropped(hashes)
            self.counts["incremental:studies_deleted"] += 1
            return
        group = now[0]
        digest = group.digest()
        if previous is not None and self.reuse_studies and previous.digest == digest:
            # Reused: its lines stay in the previous output's files (``nightly.KeepPreviousLines``).
            error, counts, shared_lines = previous.kept()
            outcome, line = core.StudyOutcome(shared=shared_lines, error=error, counts=counts), previous.line
            self.reused.inc()
            self.counts["incremental:studies_reused"] += 1
        else:
            group = folder_state.load_pending(group)  # the parts of unchanged units, loaded now
            outcome = core.process_study(group, self.config, self.terms, self.validator, self.parts)
            line = state.study_line(uid, digest, outcome)
            if self.incremental:
                self.counts["incremental:studies_rebuilt"] += 1
                hashes = previous.hashes() if previous else None
                changed, deleted = delta.study_changes(hashes, outcome)
                yield from (beam.pvalue.TaggedOutput(DELTA, named) for named in changed)
                yield from (beam.pvalue.TaggedOutput(DELETED, key) for key in deleted)
                if self.reuse_studies:
                    yield from _dropped(hashes or {})
        yield beam.pvalue.TaggedOutput(STATE, (layout.STUDY_STATE_NAME, line))
        counts = self.counts
        for name, count in outcome.counts.items():
            counts[name] += count
        self.progress.add({"studies_written": outcome.counts["studies_written"]})
        if outcome.error is not None:
            yield beam.pvalue.TaggedOutput(ERRORS, outcome.error)
        for resource_type, lines in outcome.lines.items():
            for resource_line in lines:
                yield resource_type, resource_line
        for key, shared_line in outcome.shared:
            kept = self.shared.get(key)  # the runner's combine picks among bundles, this within one
            self.shared[key] = shared_line if kept is None else core.pick_shared((kept, shared_line))

    def finish_bundle(self):
        self.progress.flush()
        # the Beam counters once per bundle: each inc asks Beam for its state tracker
        for metric, name in ((self.written, "studies_written"), (self.rejected, "studies_rejected")):
            if self.counts.get(name):
                metric.inc(self.counts[name])
        for shared_item in sorted(self.shared.items()):
            yield beam.pvalue.TaggedOutput(self.SHARED, GlobalWindows.windowed_value(shared_item))
        if self.counts:
            yield beam.pvalue.TaggedOutput(COUNTS, GlobalWindows.windowed_value(self.counts))
        self.counts = Counter()
        self.shared = {}


def _dropped(hashes: dict):
    """(resource type, line hash, key) of a previous study's lines that the output no longer keeps."""
    for name, pairs in hashes.items():
        for key, line_hash in pairs:
            yield beam.pvalue.TaggedOutput(DROPPED, (name, line_hash, key))


def shared_delta(item):
    """(key, {"now": [line], "before": [line]}) -> tagged delta lines and deleted keys."""
    key, joined = item
    changed, deleted = delta.shared_change(key, list(joined["before"]), list(joined["now"]))
    yield from (beam.pvalue.TaggedOutput(DELTA, named) for named in changed)
    yield from (beam.pvalue.TaggedOutput(DELETED, key) for key in deleted)


class BuildResources(beam.PTransform):
    """StudyGroups (+ the previous run's study entries) -> study lines, shared lines (each
    Device/Patient/Encounter once per run), errors, counts, study state lines, and with a previous
    run its delta lines and deleted keys."""

    def __init__(self, config: ConversionConfig, validate: str = "sampled", progress: ProgressSettings | None = None,
                 previous_studies=None, reuse_studies: bool = True):
        super().__init__()
        self.config = config
        self.validate = validate
        self.progress = progress
        self.previous_studies = previous_studies
        self.reuse_studies = reuse_studies

    def expand(self, groups):
        incremental = self.previous_studies is not None
        if incremental:
            keyed = groups | "ByStudy" >> beam.Map(lambda group: (group.study_uid, group))
            joined = {"now": keyed, "before": self.previous_studies} | "JoinState" >> beam.CoGroupByKey()
        else:
            joined = groups  # each StudyGroup alone: no step to pair it with an empty past
        built = joined | "Build" >> beam.ParDo(BuildStudyDoFn(
            self.config, self.validate, self.progress, incremental, self.reuse_studies)).with_outputs(
            ERRORS, COUNTS, BuildStudyDoFn.SHARED, STATE, DELTA, DELETED, DROPPED, main="resources")
        picks = built[BuildStudyDoFn.SHARED] | "SharedOnce" >> beam.CombinePerKey(core.pick_shared)
        shared = picks | "SharedLine" >> beam.Map(lambda item: (core.shared_type(item[0]), item[1]))
        shared_counts = shared | "CountShared" >> beam.Map(lambda item: Counter({f"lines:{item[0]}": 1}))
        counts = (built[COUNTS], shared_counts) | "BuildCounts" >> beam.Flatten()
        changes = None
        if incremental:
            before = (self.previous_studies
                      | "PreviousShared" >> beam.FlatMap(lambda item: item[1].shared)
                      | "PreviousSharedOnce" >> beam.CombinePerKey(core.pick_shared))
            shared_changes = ({"now": picks, "before": before}
                              | "JoinShared" >> beam.CoGroupByKey()
                              | "SharedDelta" >> beam.FlatMap(shared_delta).with_outputs(DELTA, DELETED))
            changes = ((built[DELTA], shared_changes[DELTA]) | "AllDelta" >> beam.Flatten(),
                       (built[DELETED], shared_changes[DELETED]) | "AllDeleted" >> beam.Flatten(),
                       built[DROPPED])
        return built.resources, shared, built[ERRORS], counts, built[STATE], changes
