"""Step 3: group the partial groups per study (with the multi-study guard of directory mode)."""
from __future__ import annotations

import typing
from collections import Counter

import apache_beam as beam

from beam_pipeline.codes import Outcome, Reason
from beam_pipeline.fhir import study
from beam_pipeline.run.steps import COUNTS


def merge_partials(item) -> tuple[str, dict]:
    key, blobs = item
    return key, study.merge_directories(study.load_groups(blob) for blob in blobs)


@beam.typehints.with_output_types(typing.Tuple[str, study.StudyGroup])
class DirectoryGuardDoFn(beam.DoFn):
    """Rejects a folder holding more than one study as a whole; passes single-study folders on."""

    REJECTED = "rejected"

    def process(self, item):
        directory, groups = item
        if len(groups) == 1:
            (uid, group), = groups.items()
            yield uid, group
            return
        uids = sorted(groups)
        files = sum(g.files for g in groups.values())
        yield beam.pvalue.TaggedOutput(COUNTS, Counter({
            f"outcome:{Outcome.REJECTED_WITH_STUDY}": files, f"error:{Reason.MULTIPLE_STUDIES_IN_DIRECTORY}": 1}))
        yield beam.pvalue.TaggedOutput(self.REJECTED, {
            "reason": str(Reason.MULTIPLE_STUDIES_IN_DIRECTORY), "path": directory, "study_uids": uids,
            "files": files, "detail": f"{len(uids)} StudyInstanceUIDs in one folder: {', '.join(uids)}",
        })
        for uid in uids:  # no file of these studies may be written from other folders either
            yield uid, study.StudyGroup(uid, rejected_folders={directory})


class MergeGroupsFn(beam.CombineFn):
    """Merges StudyGroups of one study found in several folders (directory mode).

    Inputs are never changed (runners may reuse them): the accumulator is a fresh group that
    the inputs are merged into.
    """

    def create_accumulator(self):
        return None

    def add_input(self, merged, group):
        return (merged or study.StudyGroup(group.study_uid)).merge(group)

    def merge_accumulators(self, groups):
        merged = None
        for group in groups:
            if group is not None:
                merged = (merged or study.StudyGroup(group.study_uid)).merge(group)
        return merged

    def extract_output(self, merged):
        return merged


class GroupStudies(beam.PTransform):
    """Partials keyed by study (or folder) -> one StudyGroup per study, plus folder rejections and
    their counts (directory mode; empty in study mode)."""

    def __init__(self, group_by: str = "study"):
        super().__init__()
        self.group_by = group_by

    def expand(self, partials):
        shuffled = partials | "Shuffle" >> beam.GroupByKey()
        if self.group_by == "study":  # one study per key: its merged group, in one step
            return shuffled | "Merge" >> beam.FlatMap(lambda item: merge_partials(item)[1].values()), None, None
        merged = shuffled | "Merge" >> beam.Map(merge_partials)
        guarded = merged | "Guard" >> beam.ParDo(DirectoryGuardDoFn()).with_outputs(
            DirectoryGuardDoFn.REJECTED, COUNTS, main="ok")
        groups = (guarded.ok
                  | "MergeSplitStudies" >> beam.CombinePerKey(MergeGroupsFn())
                  | "DropKey" >> beam.Values())
        return groups, guarded[DirectoryGuardDoFn.REJECTED], guarded[COUNTS]
