"""The conversion without Beam: the same ``core`` steps in one process (benchmarks, quick checks)."""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from beam_pipeline import core, fhir_build
from beam_pipeline.config import ConversionConfig
from beam_pipeline.study import StudyGroup


@dataclass
class ConversionResult:
    lines: dict = field(default_factory=dict)    # resource type -> NDJSON lines (Devices once each)
    errors: list = field(default_factory=list)   # error dicts, as the errors output holds them
    counts: Counter = field(default_factory=Counter)

    @property
    def resources(self) -> dict:
        """resource type -> resource dicts (parsed back from the lines)."""
        import orjson

        return {name: [orjson.loads(line) for line in lines] for name, lines in self.lines.items()}

    @property
    def outcomes(self) -> Counter:
        return Counter({k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("outcome:") and v})

    @property
    def notes(self) -> Counter:
        return Counter({k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("note:") and v})


def convert_files(paths, config: ConversionConfig | None = None, validate: bool | str = True,
                  use_fast_reader: bool = True) -> ConversionResult:
    """Read, group by StudyInstanceUID and build, exactly as the pipeline does in study mode."""
    from terminologies import Terminologies

    config = config or ConversionConfig()
    reader, keys, terms = core.FileReader(use_fast_reader), core.instance_keys(), Terminologies.load()
    mode = {True: "sampled", False: "none"}.get(validate, validate)
    validator = None if mode == "none" else fhir_build.Validator(full=mode == "full")
    result = ConversionResult()
    groups: dict[str, StudyGroup] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            result.counts["files_matched"] += 1
            outcome = core.process_file(path, reader)
            result.counts.update(outcome.counts)
            if outcome.error is not None:
                result.errors.append(outcome.error)
            elif outcome.result.record is not None:
                record = outcome.result.record
                uid = record["StudyInstanceUID"]
                groups.setdefault(uid, StudyGroup(uid)).add(record, keys)
    devices: dict[str, list] = {}
    for uid in sorted(groups):
        outcome = core.process_study(groups[uid], config, terms, validator)
        result.counts.update(outcome.counts)
        if outcome.error is not None:
            result.errors.append(outcome.error)
        for resource_type, lines in outcome.lines.items():
            result.lines.setdefault(resource_type, []).extend(lines)
        for device_id, line in outcome.devices:
            devices.setdefault(device_id, []).append(line)
    if devices:
        result.lines["Device"] = [core.pick_device(devices[k]) for k in sorted(devices)]
        result.counts["lines:Device"] = len(devices)
    return result
