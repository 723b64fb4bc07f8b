"""``--fhir-server``: every study's transaction Bundle (PUT by id) written to a FHIR server, and the
deletions of a ``--since`` run, with the server's answers as error lines and counts.

What the server holds of each study is kept in the state (``_state/fhir-server-*.jsonl``): the hash
of the Bundle it acknowledged, and since when the study's current Bundle has been unchanged. A
later run (``--since``, every cycle of ``--follow``) sends only Bundles the server does not have,
and with ``stable_after`` only once a study's Bundle has not changed for that long: a study still
receiving instances waits (a session window per StudyInstanceUID, measured between runs). Sending
the same Bundle again changes nothing on the server (PUT by id), so a lost acknowledgement (a run
stopped before its state was written) costs a repeated request, never a duplicate.
"""
from __future__ import annotations

import hashlib
import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import apache_beam as beam
import orjson
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared

from beam_pipeline.codes import SHARED_TYPES, Reason
from beam_pipeline.run import output
from beam_pipeline.run.layout import BUNDLE_NAME, SINK_STATE_NAME
from beam_pipeline.sinks.fhir_server import FhirClient, Posted, ServerConfig, entry_count
from beam_pipeline.sources.retry import DEFAULT_RETRY_BUDGET, RetryBudget

COUNTS, ERRORS, STATE = "counts", "errors", "state"
SHARED_PER_BUNDLE = 200      # shared resources per preloading transaction
RETRY_REFUSED_AFTER = 3600.0  # seconds before a refused, unchanged Bundle is sent again
_UID_SYSTEM = "urn:dicom:uid"
COUNTED = {"ok": "written", "refused": "refused", "unavailable": "unavailable"}


# ---------------------------------------------------------------------------------------------
# What to do with one study (pure)


@dataclass(frozen=True)
class SinkEntry:
    """What the server holds of one study: ``posted`` the hash of the Bundle it acknowledged;
    ``hash`` the current Bundle's, unchanged since ``since``; ``refused`` the server's answer to
    the current Bundle, sent at ``tried``."""

    uid: str
    hash: str
    since: float
    posted: str | None = None
    refused: str | None = None
    tried: float | None = None


def entry_line(entry: SinkEntry) -> str:
    return orjson.dumps(asdict(entry), option=orjson.OPT_SORT_KEYS).decode("utf-8")


def read_entry_line(line: str) -> SinkEntry | None:
    """An entry, or None for a damaged line (its study is then sent again: harmless)."""
    try:
        return SinkEntry(**orjson.loads(line))
    except (ValueError, TypeError):
        return None


def bundle_hash(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()[:32]


def study_uid(bundle: dict) -> str:
    """The StudyInstanceUID of a study's Bundle (its ImagingStudy's DICOM identifier), else its id."""
    for entry in bundle.get("entry", ()):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "ImagingStudy":
            for identifier in resource.get("identifier", ()):
                if identifier.get("system") == _UID_SYSTEM:
                    return identifier.get("value", "").removeprefix("urn:oid:")
    return bundle.get("id", "")


def decide(uid: str, digest: str, previous: SinkEntry | None, now: float, stable_after: float,
           retry_refused_after: float = RETRY_REFUSED_AFTER) -> tuple[str, SinkEntry]:
    """("unchanged" | "deferred" | "refused-before" | "post", the entry to keep if nothing is sent)."""
    if previous is not None and previous.posted == digest:
        return "unchanged", SinkEntry(uid, digest, previous.since, digest)
    same = previous is not None and previous.hash == digest
    since = previous.since if same else now
    kept = SinkEntry(uid, digest, since, previous.posted if previous else None,
                     previous.refused if same else None, previous.tried if same else None)
    if now - since < stable_after:
        return "deferred", kept
    if kept.refused is not None and kept.tried is not None and now - kept.tried < retry_refused_after:
        return "refused-before", kept
    return "post", kept


def after_post(kept: SinkEntry, digest: str, posted: Posted, now: float) -> SinkEntry:
    if posted.status == "ok":
        return SinkEntry(kept.uid, digest, kept.since, digest)
    if posted.status == "refused":
        return SinkEntry(kept.uid, digest, kept.since, kept.posted, posted.detail, now)
    return SinkEntry(kept.uid, digest, kept.since, kept.posted)


def refused_error(uid: str, detail: str) -> dict:
    return {"reason": str(Reason.FHIR_SERVER_REFUSED), "study_uid": uid, "detail": detail}


# ---------------------------------------------------------------------------------------------
# Beam


class SharedClient:
    """A worker process's client (session, token, in-flight bound, retry budget) and thread pool."""

    def __init__(self, config: ServerConfig):
        self.client = FhirClient(config, RetryBudget(DEFAULT_RETRY_BUDGET))
        self.pool = ThreadPoolExecutor(max(config.max_in_flight, 1), "fhir-server")


class DecideDoFn(beam.DoFn):
    """(uid, {"now": [Bundle line], "before": [entry]}) -> (uid, line, hash, entry) to send (main
    output); the state line, counts and repeated refusal of the studies not sent now."""

    def __init__(self, now: float, stable_after: float):
        self.now = now
        self.stable_after = stable_after

    def process(self, item):
        uid, joined = item
        lines, before = list(joined["now"]), [e for e in joined["before"] if e is not None]
        if not lines:  # gone or rejected now: the deletions (--since) take care of the server
            return
        digest = bundle_hash(lines[0])
        action, kept = decide(uid, digest, before[0] if before else None, self.now, self.stable_after)
        if action == "post":
            yield uid, lines[0], digest, kept
            return
        counts = Counter({f"fhir_server:studies_{action.replace('-', '_')}": 1})
        if action == "refused-before":  # the error stays in every snapshot's errors until sent again
            counts[f"error:{Reason.FHIR_SERVER_REFUSED}"] += 1
            yield beam.pvalue.TaggedOutput(ERRORS, refused_error(uid, kept.refused))
        yield beam.pvalue.TaggedOutput(STATE, (SINK_STATE_NAME, entry_line(kept)))
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


def shared_entries(send) -> list[tuple[str, str]]:
    """("Type/id", resource JSON) of the shared resources (Devices, Patients, ...) in a Bundle to send."""
    bundle = orjson.loads(send[1])
    return [(entry["request"]["url"], orjson.dumps(entry["resource"]).decode("utf-8"))
            for entry in bundle.get("entry", ()) if entry["request"]["url"].split("/", 1)[0] in SHARED_TYPES]


@beam.typehints.with_output_types(int)
class PreloadSharedDoFn(beam.DoFn):
    """Batches of shared resources -> one transaction of PUTs each, before the studies' Bundles: many
    studies creating one new Patient or Device at once make the server refuse all but one (HAPI:
    409, sent again). Only an optimization: what fails here is sent again inside the studies'
    Bundles, so it is counted, never an error line."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.shared_client = shared.Shared()

    def setup(self):
        self.shared = self.shared_client.acquire(lambda: SharedClient(self.config))

    def process(self, batch):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": orjson.loads(line), "request": {"method": "PUT", "url": key}} for key, line in batch]}
        posted = self.shared.client.transaction(orjson.dumps(bundle))
        yield beam.pvalue.TaggedOutput(COUNTS, Counter({f"fhir_server:shared_preloaded{'' if posted.status == 'ok' else '_failed'}": len(batch)}))
        yield len(batch)

    def teardown(self):
        self.shared = None


@beam.typehints.with_output_types(int)
class PostStudiesDoFn(beam.DoFn):
    """Batches of (uid, Bundle line, hash, entry) -> the server's answers: error lines, counts and
    state lines; the main output counts what was handled (a signal for the deletions to wait for)."""

    def __init__(self, config: ServerConfig, now: float):
        self.config = config
        self.now = now
        self.shared_client = shared.Shared()

    def setup(self):
        self.shared = self.shared_client.acquire(lambda: SharedClient(self.config))

    def process(self, sends, preloaded=()):
        counts = Counter()
        answers = self.shared.pool.map(lambda send: self.shared.client.transaction(send[1].encode("utf-8")), sends)
        for (uid, _, digest, kept), posted in zip(sends, answers):
            counts[f"fhir_server:studies_{COUNTED[posted.status]}"] += 1
            if posted.status == "ok":
                counts["fhir_server:resources_written"] += entry_count(posted)
            elif posted.status == "refused":
                counts[f"error:{Reason.FHIR_SERVER_REFUSED}"] += 1
                yield beam.pvalue.TaggedOutput(ERRORS, refused_error(uid, posted.detail))
            else:
                counts[f"error:{Reason.UNAVAILABLE}"] += 1
                yield beam.pvalue.TaggedOutput(ERRORS, {"reason": str(Reason.UNAVAILABLE), "study_uid": uid,
                                                        "detail": posted.detail})
            yield beam.pvalue.TaggedOutput(STATE, (SINK_STATE_NAME, entry_line(after_post(kept, digest, posted, self.now))))
        yield beam.pvalue.TaggedOutput(COUNTS, +counts)
        yield len(sends)

    def teardown(self):
        self.shared = None


class DeleteDoFn(beam.DoFn):
    """All deleted ``Type/id`` keys (one list) -> DELETEs, once every study's Bundle is handled."""

    def __init__(self, config: ServerConfig):
        self.config = config

    def process(self, keys, handled):
        counts = Counter()
        if keys:
            failed = FhirClient(self.config, RetryBudget(DEFAULT_RETRY_BUDGET)).delete(keys)
            counts["fhir_server:deletions_sent"] += len(set(keys))
            for key, posted in failed:
                reason = Reason.FHIR_SERVER_REFUSED if posted.status == "refused" else Reason.UNAVAILABLE
                counts[f"fhir_server:deletions_{posted.status}"] += 1
                counts[f"error:{reason}"] += 1
                yield beam.pvalue.TaggedOutput(ERRORS, {"reason": str(reason), "resource": key, "detail": posted.detail})
        yield beam.pvalue.TaggedOutput(COUNTS, +counts)


def previous_shards(since: str | None) -> list[str]:
    """The sink state files of a previous run (none: every study is new to the server)."""
    if since is None:
        return []
    matched = FileSystems.match([output.shard_pattern(since, SINK_STATE_NAME)])[0].metadata_list
    return sorted(m.path for m in matched)


class WriteToFhirServer(beam.PTransform):
    """(resource type, line) of the studies (their Bundles are taken) and, with ``--since``, the
    deleted keys -> (errors, counts, state lines)."""

    def __init__(self, config: ServerConfig, previous: list[str], now: float, stable_after: float = 0.0,
                 deleted=None):
        super().__init__()
        self.config = config
        self.previous = previous
        self.now = now
        self.stable_after = stable_after
        self.deleted = deleted

    def expand(self, studies):
        pipeline = studies.pipeline
        bundles = (studies
                   | "Bundles" >> beam.FlatMap(lambda item: [item[1]] if item[0] == BUNDLE_NAME else [])
                   | "ByStudy" >> beam.Map(lambda line: (study_uid(orjson.loads(line)), line)))
        if self.previous:
            before = (pipeline
                      | "PreviousShards" >> beam.Create(self.previous)
                      | "PreviousLines" >> beam.io.ReadAllFromText()
                      | "PreviousEntries" >> beam.Map(read_entry_line)
                      | "Known" >> beam.Filter(lambda entry: entry is not None)
                      | "ByUid" >> beam.Map(lambda entry: (entry.uid, entry)))
        else:
            before = pipeline | "NoPrevious" >> beam.Create([]).with_output_types(
                typing.Tuple[str, typing.Any])
        decided = ({"now": bundles, "before": before}
                   | "Join" >> beam.CoGroupByKey()
                   | "Decide" >> beam.ParDo(DecideDoFn(self.now, self.stable_after))
                   .with_outputs(ERRORS, COUNTS, STATE, main="send"))
        preloaded = (decided.send
                     | "SharedEntries" >> beam.FlatMap(shared_entries)
                     | "SharedOnce" >> beam.CombinePerKey(min)
                     | "SharedBatches" >> beam.BatchElements(min_batch_size=1, max_batch_size=SHARED_PER_BUNDLE)
                     | "PreloadShared" >> beam.ParDo(PreloadSharedDoFn(self.config)).with_outputs(COUNTS, main="done"))
        posted = (decided.send
                  | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=max(8, 4 * self.config.max_in_flight))
                  | "Post" >> beam.ParDo(PostStudiesDoFn(self.config, self.now),
                                         preloaded=beam.pvalue.AsList(preloaded.done))
                  .with_outputs(ERRORS, COUNTS, STATE, main="handled"))
        errors = [decided[ERRORS], posted[ERRORS]]
        counts = [decided[COUNTS], preloaded[COUNTS], posted[COUNTS]]
        if self.deleted is not None:
            deleted = (self.deleted
                       | "AllDeleted" >> beam.combiners.ToList()
                       | "Delete" >> beam.ParDo(DeleteDoFn(self.config),
                                                handled=beam.pvalue.AsList(posted.handled))
                       .with_outputs(ERRORS, COUNTS, main="none"))
            errors.append(deleted[ERRORS])
            counts.append(deleted[COUNTS])
        return (errors | "SinkErrors" >> beam.Flatten(), counts | "SinkCounts" >> beam.Flatten(),
                (decided[STATE], posted[STATE]) | "SinkState" >> beam.Flatten())
