"""The conversion without Beam: the same pure steps in one process (benchmarks, quick checks)."""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from beam_pipeline import fhir_build, header
from beam_pipeline.fields import default_spec
from beam_pipeline.study import StudyGroup

_SKIPPED = {header.NOT_DICOM: "skipped_not_dicom", header.DICOMDIR: "skipped_dicomdir"}


@dataclass
class ConversionResult:
    resources: dict = field(default_factory=dict)   # resource type -> list of resource dicts
    errors: list = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


def convert_files(paths, config: fhir_build.ConversionConfig | None = None, validate: bool | str = True,
                  use_fast_reader: bool = True) -> ConversionResult:
    """Read, group by StudyInstanceUID and build, exactly as the pipeline does in study mode."""
    from terminologies import Terminologies
    from beam_pipeline.pipeline import instance_keys

    config = config or fhir_build.ConversionConfig()
    spec, keys, terms = default_spec(), instance_keys(), Terminologies.load()
    mode = {True: "sampled", False: "none"}.get(validate, validate)
    validator = None if mode == "none" else fhir_build.Validator(full=mode == "full")
    result = ConversionResult()
    groups: dict[str, StudyGroup] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            with open(path, "rb") as fp:
                read = header.read_header(fp, spec, use_fast=use_fast_reader)
            if read.kind == header.INSTANCE:
                uid = read.record["StudyInstanceUID"]
                groups.setdefault(uid, StudyGroup(uid)).add(read.record, keys)
            elif read.kind == header.ERROR:
                result.outcomes["error"] += 1
                result.errors.append({"reason": read.reason, "path": path, "detail": read.detail})
            else:
                result.outcomes[_SKIPPED[read.kind]] += 1
    devices: dict[str, dict] = {}
    for uid in sorted(groups):
        group = groups[uid]
        built = fhir_build.build_study(group, config, terms)
        if built.rejection is None and validator is not None:
            built.rejection = validator.problem(built.resources)
        if built.rejection is not None:
            result.outcomes["rejected_with_study"] += group.files
            result.errors.append({"reason": built.rejection[0], "study_uid": uid, "files": group.files,
                                  "detail": built.rejection[1]})
            continue
        result.outcomes["converted"] += len(group.instances)
        result.outcomes["duplicate"] += group.duplicates
        result.notes.update(built.notes)
        for resource_type, resource in built.resources:
            if resource_type == "Device":
                devices[resource["id"]] = resource
            else:
                result.resources.setdefault(resource_type, []).append(resource)
    if devices:
        result.resources["Device"] = [devices[k] for k in sorted(devices)]
    return result
