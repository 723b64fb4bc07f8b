"""The conversion without Beam: the same ``core`` steps in one process (benchmarks, quick checks)."""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES
from beam_pipeline.fhir import build as fhir_build
from beam_pipeline.fhir import keywords
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.fhir.study import StudyGroup
from beam_pipeline.run import core
from beam_pipeline.sources import files as inputs
from beam_pipeline.sources.retry import AdaptiveLimit


@dataclass
class ConversionResult:
    lines: dict = field(default_factory=dict)    # resource type -> NDJSON lines (shared ones once each)
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
                  use_fast_reader: bool = True, read_concurrency: int = 1,
                  max_header_bytes: int = MAX_HEADER_BYTES) -> ConversionResult:
    """Read, group by StudyInstanceUID and build, exactly as the pipeline does in study mode.
    ``read_concurrency`` > 1 keeps that many header reads of object-storage paths in flight."""
    from terminologies import Terminologies

    config = config or ConversionConfig()
    reader = core.FileReader(use_fast_reader, inputs.InputOpener(limit=AdaptiveLimit(read_concurrency)),
                             max_header_bytes)
    keys, terms = keywords.instance_keys(), Terminologies.load()
    mode = {True: "sampled", False: "none"}.get(validate, validate)
    validator = None if mode == "none" else fhir_build.Validator(full=mode == "full")
    parts = fhir_build.MappedParts()
    result = ConversionResult()
    groups: dict[str, StudyGroup] = {}
    pool = ThreadPoolExecutor(read_concurrency) if read_concurrency > 1 else None
    with warnings.catch_warnings(), pool or contextlib.nullcontext():
        warnings.simplefilter("ignore")
        for path, outcome in _read(paths, reader, pool):
            result.counts["files_matched"] += 1
            result.counts.update(outcome.counts)
            if outcome.error is not None:
                result.errors.append(outcome.error)
            elif outcome.result.record is not None:
                record = outcome.result.record
                uid = record["StudyInstanceUID"]
                groups.setdefault(uid, StudyGroup(uid)).add(record, keys)
    shared: dict[str, list] = {}
    for uid in sorted(groups):
        outcome = core.process_study(groups[uid], config, terms, validator, parts)
        result.counts.update(outcome.counts)
        if outcome.error is not None:
            result.errors.append(outcome.error)
        for resource_type, lines in outcome.lines.items():
            result.lines.setdefault(resource_type, []).extend(lines)
        for key, line in outcome.shared:
            shared.setdefault(key, []).append(line)
    for key in sorted(shared):
        resource_type = core.shared_type(key)
        result.lines.setdefault(resource_type, []).append(core.pick_shared(shared[key]))
        result.counts[f"lines:{resource_type}"] += 1
    return result


def _read(paths, reader: core.FileReader, pool, batch_size: int = 200):
    """(path, FileOutcome) in input order; remote paths in batches with reads in flight."""
    batch = []
    for path in paths:
        batch.append((path, None))
        if len(batch) == batch_size:
            yield from _read_batch(batch, reader, pool)
            batch = []
    yield from _read_batch(batch, reader, pool)


def _read_batch(batch, reader, pool):
    remote = pool is not None and any(isinstance(p, str) and inputs.is_remote(p) for p, _ in batch)
    for (path, _), outcome in zip(batch, core.process_files(batch, reader, pool if remote else None)):
        yield path, outcome
