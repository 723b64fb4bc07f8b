"""``--follow`` as one streaming Beam pipeline: watch the input, a session window per study, write.

The watcher (a splittable DoFn) lists the input folder or gs:// prefix every ``--poll-interval``
and emits the files that are new or changed (size and modification time; gs://: generation),
stamped with the time it saw them as their event time, and moves the watermark to that time
(with ``--dicomweb``: the QIDO-RS search, studies whose series and instance counts changed).
Each file's header is read with the batch path's reader (``core``), then keyed: an instance by
its StudyInstanceUID, anything else (an error, a skipped file) by its path. A stateful DoFn per
key is the session window: every element pushes the key's event-time timer to its time plus
``--stable-after``; when the watermark passes it (no new instance for that long), the study is
built from all its instances (the ones of earlier windows from the state, so a late instance
makes a new version) with the batch mapping (``core.process_study``), then sent to the FHIR
server as one transaction, or written as NDJSON in its own window folder, and committed.

State is plain files under OUTPUT (``state/``): per study its files' records and the hash of the
Bundle the server acknowledged; per non-instance file its stamp. A window is committed after it
was written, so a crash in between writes it again on restart (PUT by id: no new version on the
server); a file seen but not committed is read again on restart: nothing is lost. SIGTERM makes
the launcher write ``OUTPUT/stop``: the watcher stops listing and lets the watermark go to the
end, every open window closes and is written, and the pipeline finishes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import threading
import time
import typing
from collections import Counter

import apache_beam as beam
import orjson
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from beam_pipeline.codes import Reason
from beam_pipeline.fhir import keywords
from beam_pipeline.fhir.study import StudyGroup
from beam_pipeline.run import core, state
from beam_pipeline.run.fhir_sink import COUNTED, bundle_hash, refused_error
from beam_pipeline.run.follow import check_folders, check_server
from beam_pipeline.run.pipeline import conversion_config
from beam_pipeline.run.settings import Settings
from beam_pipeline.sources import files as inputs

_LOG = logging.getLogger(__name__)

STATE_DIR = "state"      # committed: studies/ (records, what the server has) and files/ (non-instances)
WINDOWS_DIR = "windows"  # one folder per closed window: a study's NDJSON (or errors), for a loader to take
STATE_SUFFIX = ".json"    # one sealed JSON line per study or non-instance file (``dump``)
STOP_NAME = "stop"       # written on SIGTERM: the watcher stops, open windows close, the pipeline ends
_END = 2 ** 62           # the watcher's restriction: polls [0, _END), never all claimed until stopped
STUDY, FILE = "study", "file"
QIDO = "qido:"  # the "path" of a PACS study: its StudyInstanceUID behind this prefix
WINDOW_ERRORS, WINDOW_SUMMARY = "errors.jsonl", "summary.json"
LEDGER_NAME = "windows.jsonl"  # one line per closed window: its name and counts
MAX_RETRY_WAIT = 300.0  # seconds: the longest wait before a study the server did not take is sent again
HEARTBEAT_NAME = "watch.json"  # rewritten after every listing: when, how many listed and new (for monitoring)


# ---------------------------------------------------------------------------------------------
# State: plain files, each written whole (temp + rename)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def state_path(root: str, kind: str, name: str) -> str:
    digest = _digest(name)
    return os.path.join(root, STATE_DIR, kind, digest[:2], digest + STATE_SUFFIX)


def write_whole(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(temp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


def dump(entry: dict) -> bytes:
    """An entry as one sealed JSON line of plain values (the nightly state's encoding, no pickle):
    paths as state keys, records' tuples and dose reports tagged (``state.plain_value``)."""
    files = {state.source_key(path): [stamp, records] for path, (stamp, records) in entry["files"].items()}
    return state.seal({**entry, "files": files}, default=state.plain_value).encode("utf-8")


def load(path: str) -> dict | None:
    """The entry of ``path``; None when there is none or it is damaged (its files are read again)."""
    try:
        with open(path, encoding="utf-8") as handle:
            body = state.typed_value(state.unseal(handle.read(), "follow"))
    except (OSError, UnicodeDecodeError, state.StateError):
        return None
    body["files"] = {state.key_path(key): (stamp, records) for key, (stamp, records) in body["files"].items()}
    return body


def difference(new, old) -> dict:
    """``new - old`` per count, negatives kept (a file that moved from one outcome to another)."""
    keys = set(new) | set(old)
    return {key: new.get(key, 0) - old.get(key, 0) for key in sorted(keys) if new.get(key, 0) != old.get(key, 0)}


def committed(root: str) -> dict:
    """path -> stamp of every file whose outcome is committed, except the files of studies the
    server did not acknowledge (unavailable): those are read again, so their study is sent again."""
    seen = {}
    base = os.path.join(root, STATE_DIR)
    for kind in (STUDY, FILE):
        for folder, _, names in os.walk(os.path.join(base, kind)):
            for name in names:
                if not name.endswith(STATE_SUFFIX):
                    continue
                entry = load(os.path.join(folder, name))
                if entry is None or entry.get("pending"):
                    continue
                for path, (stamp, _) in entry["files"].items():
                    seen[path] = stamp
    return seen


# ---------------------------------------------------------------------------------------------
# The watcher


class _Polls(beam.transforms.core.RestrictionProvider):
    def initial_restriction(self, element):
        return OffsetRange(0, _END)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element, restriction):
        return 1

    def truncate(self, element, restriction):  # a drain (Dataflow): stop polling
        return None


class WatchDoFn(beam.DoFn):
    """(nothing) -> (path, size, stamp) of each new or changed file (with ``source``: ("qido:" +
    StudyInstanceUID, None, stamp) of each new or changed study of the PACS), its event time the
    time it was listed; the watermark follows the listings. Ends (the watermark to the end) once
    ``OUTPUT/stop`` exists."""

    def __init__(self, input_path: str | None, root: str, poll_interval: float, retry_deadline: float | None = None,
                 source=None):
        self.input_path = input_path
        self.root = root
        self.poll_interval = poll_interval
        self.retry_deadline = retry_deadline
        self.source = source

    def setup(self):
        self.seen = committed(self.root)  # a new instance after a restart: what is committed
        self.polls = 0
        self.pattern = None if self.source is not None else inputs.resolve_pattern(self.input_path)

    def listed(self):
        """(path, size, stamp) of the input now; a study's stamp (its series and instance counts)
        may be unknown (None): such a study is fetched once, then again only after a restart."""
        if self.source is not None:
            from beam_pipeline.sources import dicomweb

            for uid, stamp in dicomweb.list_stamped_studies(self.source.connection, self.source.query):
                yield QIDO + uid, None, stamp
            return
        for path, size, version in inputs.list_files(self.pattern, retry_deadline=self.retry_deadline):
            stamp = inputs.stamp(path, size, version)
            if stamp is not None:  # gone since it was listed, or no regular file
                yield path, size, stamp

    @beam.DoFn.unbounded_per_element()
    def process(self, element, tracker=beam.DoFn.RestrictionParam(_Polls()),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())):
        from beam_pipeline.sources.dicomweb import DicomWebError

        position = tracker.current_restriction().start
        if os.path.exists(os.path.join(self.root, STOP_NAME)):
            tracker.try_claim(_END - 1)  # all claimed: the restriction is done, the watermark ends
            return
        if not tracker.try_claim(position):
            return
        now = Timestamp(time.time())
        try:
            listed = list(self.listed())
        except (OSError, DicomWebError) as exc:  # still failing past the deadline: the next poll tries again
            _LOG.warning("cannot list the input (%s); trying again", type(exc).__name__)
            listed = []
        new = 0
        for path, size, stamp in listed:
            if path in self.seen and self.seen[path] == stamp:
                continue
            self.seen[path] = stamp
            new += 1
            yield beam.window.TimestampedValue((path, size, stamp), now)
        watermark.set_watermark(now)
        self.polls += 1
        write_whole(os.path.join(self.root, HEARTBEAT_NAME), orjson.dumps(
            {"at": float(now), "polls": self.polls, "listed": len(listed), "new": new}))
        tracker.defer_remainder(Duration(seconds=self.poll_interval))


# ---------------------------------------------------------------------------------------------
# Reading


@beam.typehints.with_output_types(typing.Tuple[typing.Tuple[str, str], typing.Any])
class ReadDoFn(beam.DoFn):
    """(path, size, stamp) -> ((STUDY, uid) or (FILE, path), (path, stamp, records, errors, counts)):
    a file's header by the batch reader, or a PACS study's metadata (WADO-RS) as the batch fetch."""

    def __init__(self, use_fast_reader: bool, max_header_bytes: int, retry_deadline: float | None, source=None):
        self.use_fast_reader = use_fast_reader
        self.max_header_bytes = max_header_bytes
        self.retry_deadline = retry_deadline
        self.source = source

    def setup(self):
        self.reader = core.FileReader(self.use_fast_reader, inputs.InputOpener(self.retry_deadline),
                                      self.max_header_bytes)
        self.clients = threading.local()
        core.quiet_pydicom()

    def process(self, item):
        path, size, stamp = item
        if self.source is not None:
            yield from self.fetch(path, stamp)
            return
        outcome = core.process_file(path, self.reader, size)
        record = outcome.result.record if outcome.error is None else None
        counts = dict(outcome.counts)
        if record is not None and outcome.counts.get("instances_read"):
            yield (STUDY, record["StudyInstanceUID"]), (path, stamp, [record], [], counts)
        else:
            yield (FILE, os.fsdecode(path)), (path, stamp, [], [outcome.error] if outcome.error else [], counts)

    def fetch(self, path: str, stamp):
        from beam_pipeline.sources import dicomweb
        from beam_pipeline.sources.retry import RetryBudget

        client = getattr(self.clients, "client", None)
        if client is None:
            budget = RetryBudget(self.source.connection.retry.budget)
            client = self.clients.client = self.source.connection.client(budget)
        uid = path[len(QIDO):]
        read = core.process_fetched_study(dicomweb.fetch_study(client, uid), self.reader.spec)
        yield (STUDY, uid), (path, stamp, read.records, read.errors, dict(read.counts))


# ---------------------------------------------------------------------------------------------
# The session window per key, and what is done when it closes


class Window:
    """What one closed window writes: lines by file name, counts, and a one-line description."""

    def __init__(self, name: str):
        self.name = name
        self.lines: dict[str, list[str]] = {}
        self.counts = Counter()

    def add(self, file_name: str, line: str) -> None:
        self.lines.setdefault(file_name, []).append(line)

    def error(self, error: dict) -> None:
        """The error line and its OperationOutcome, as the batch run's errors and its Bulk Data error file."""
        plain, outcome = core.error_lines(error)
        self.add(WINDOW_ERRORS, plain[1])
        self.add(f"{outcome[0]}.ndjson", outcome[1])

    def summary(self) -> dict:
        return {"window": self.name, "counts": dict(sorted(self.counts.items()))}

    def record(self, root: str) -> None:
        """One line in ``OUTPUT/windows.jsonl``, the ledger of closed windows (their counts): a
        single write in append mode, whole even with other workers appending."""
        line = orjson.dumps(self.summary(), option=orjson.OPT_SORT_KEYS) + b"\n"
        descriptor = os.open(os.path.join(root, LEDGER_NAME), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)

    def write(self, root: str) -> str:
        """The window's folder, written whole (a temp folder renamed): never half there."""
        final = os.path.join(root, WINDOWS_DIR, self.name)
        temp = os.path.join(root, WINDOWS_DIR, f".{self.name}.tmp")
        os.makedirs(temp, exist_ok=True)
        for file_name, lines in sorted(self.lines.items()):
            with open(os.path.join(temp, file_name), "w", encoding="utf-8") as out:
                out.write("".join(line + "\n" for line in lines))
        with open(os.path.join(temp, WINDOW_SUMMARY), "wb") as out:
            out.write(orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
        if os.path.isdir(final):  # written before a crash, not committed: this is the same window again
            shutil.rmtree(final)
        os.replace(temp, final)
        return final


class SessionDoFn(beam.DoFn):
    """A session window per key with a gap of ``stable_after``: the key's timer is pushed to the
    newest element's time plus the gap; when it fires, the study (or the file's error) is written
    and committed."""

    ITEMS = BagStateSpec("items", beam.coders.PickleCoder())
    UNTIL = ReadModifyWriteStateSpec("until", beam.coders.FloatCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)
    ATTEMPTS = ReadModifyWriteStateSpec("attempts", beam.coders.VarIntCoder())

    def __init__(self, root: str, settings: Settings, retry_wait: float):
        self.root = root
        self.settings = settings
        self.conversion = conversion_config(settings)  # meta.source: the input's root, as a batch run
        self.retry_wait = retry_wait

    def setup(self):
        from beam_pipeline.fhir import build as fhir_build
        from terminologies import Terminologies

        self.terms = Terminologies.load()
        validate = self.settings.validate
        self.validator = None if validate == "none" else fhir_build.Validator(full=validate == "full")
        self.parts = fhir_build.MappedParts()
        self.instance_keys = keywords.instance_keys()
        self.client = None
        if self.settings.fhir_server is not None:
            from beam_pipeline.sinks.fhir_server import FhirClient
            from beam_pipeline.sources.retry import DEFAULT_RETRY_BUDGET, RetryBudget

            self.client = FhirClient(self.settings.fhir_server, RetryBudget(DEFAULT_RETRY_BUDGET))

    def process(self, item, timestamp=beam.DoFn.TimestampParam, items=beam.DoFn.StateParam(ITEMS),
                until=beam.DoFn.StateParam(UNTIL), close=beam.DoFn.TimerParam(CLOSE)):
        items.add(item[1])
        end = max(float(timestamp) + self.settings.stable_after, until.read() or 0.0)
        until.write(end)
        close.set(Timestamp(end))

    @on_timer(CLOSE)
    def closed(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam, items=beam.DoFn.StateParam(ITEMS),
               until=beam.DoFn.StateParam(UNTIL), close=beam.DoFn.TimerParam(CLOSE),
               attempts=beam.DoFn.StateParam(ATTEMPTS)):
        got = list(items.read())
        items.clear()
        until.clear()
        kind, name = key
        window = Window(f"{int(time.time() * 1000):013d}-{_digest(kind + ':' + name)[:12]}")
        if kind == FILE:
            self.close_file(name, got, window)
            return
        retry = self.close_study(name, got, window)
        if not retry:
            attempts.clear()
        elif not os.path.exists(os.path.join(self.root, STOP_NAME)):
            # the server did not answer: this window again after a wait, doubled each time up to
            # MAX_RETRY_WAIT, so a long outage costs a line per study every few minutes
            done = (attempts.read() or 0) + 1
            attempts.write(done)
            for element in got:
                items.add(element)
            end = float(fired) + min(self.retry_wait * 2 ** (done - 1), max(MAX_RETRY_WAIT, self.retry_wait))
            until.write(end)
            close.set(Timestamp(end))

    def close_file(self, name: str, got: list, window: Window) -> None:
        """A file that is no instance (an error, a skipped file), unchanged for the gap: its line.
        Changed since it was read (still being written), it waits for its next reading."""
        path, stamp, _, errors, counts = got[-1]
        if inputs.stamp(path) not in (stamp, None) and not inputs.is_remote(name):
            return
        where = state_path(self.root, FILE, name)
        window.counts.update(difference(counts, (load(where) or {}).get("counts", {})))
        window.counts["files_read"] += 1
        for error in errors:
            window.error(error)
        if errors:
            window.write(self.root)
        write_whole(where, dump({"files": {path: (stamp, None)}, "counts": counts}))
        window.record(self.root)

    def uncommit_file(self, path) -> dict:
        """The counts a file was committed with as a non-instance (none if it was not); forgotten."""
        where = state_path(self.root, FILE, os.fsdecode(path))
        entry = load(where)
        if entry is None:
            return {}
        os.remove(where)
        return entry.get("counts", {})

    def close_study(self, uid: str, got: list, window: Window) -> bool:
        """Build the study from all its instances, send or write it, commit. True: the server did
        not answer (try again)."""
        where = state_path(self.root, STUDY, uid)
        entry = load(where) or {"uid": uid, "files": {}, "sent": None, "version": 0}
        fetch_errors = []
        for path, stamp, records, errors, _ in got:
            entry["files"][path] = (stamp, records)
            fetch_errors += errors
        group = StudyGroup(uid)
        for path in sorted(entry["files"], key=os.fsencode):
            for record in entry["files"][path][1]:
                group.add(record, self.instance_keys)
        for error in fetch_errors:  # a PACS study that could not be fetched (or some of its instances)
            window.error(error)
        if not group.files:  # nothing to build: its error lines, and a fetch again on the next start
            for _, _, _, _, counts in got:
                window.counts.update(counts)
            window.write(self.root)
            entry["pending"] = True
            write_whole(where, dump(entry))
            window.record(self.root)
            return False
        outcome = core.process_study(group, self.conversion, self.terms, self.validator, self.parts)
        entry["pending"] = False
        retry = False
        if outcome.error is not None:
            window.error(outcome.error)
        elif self.client is not None:
            line = outcome.lines["Bundle"][0]
            digest = bundle_hash(line)
            if entry["sent"] == digest:
                window.counts["fhir_server:studies_unchanged"] += 1
            else:
                posted = self.client.transaction(line.encode("utf-8"))
                window.counts[f"fhir_server:studies_{COUNTED[posted.status]}"] += 1
                if posted.status == "ok":
                    entry["sent"] = digest
                elif posted.status == "refused":
                    window.counts[f"error:{Reason.FHIR_SERVER_REFUSED}"] += 1
                    window.error(refused_error(uid, posted.detail))
                else:
                    retry = entry["pending"] = True
                    window.counts[f"error:{Reason.UNAVAILABLE}"] += 1
                    window.error({"reason": str(Reason.UNAVAILABLE), "study_uid": uid, "detail": posted.detail})
        else:
            for resource_type, lines in outcome.lines.items():
                for line in lines:
                    window.add(f"{resource_type}.ndjson", line)
            for key, line in sorted(outcome.shared):
                window.add(f"{key.split('/', 1)[0]}.ndjson", line)
        if not retry:  # what changed since the study's last window: the ledger adds up to the current counts
            window.counts.update(difference(outcome.counts, entry.get("counts", {})))
            for path, *_ in got:  # a file that was an error (or skipped) before and is an instance now
                window.counts.update(difference({}, self.uncommit_file(path)))
            window.counts["files_read"] += len(got)
            entry["counts"] = dict(outcome.counts)
            entry["version"] += 1
            if self.client is None or window.lines:  # with a server: only windows with error lines
                window.write(self.root)
        write_whole(where, dump(entry))
        window.record(self.root)
        print(f"window {window.name}: " + (f"study version {entry['version']}, " if not retry else "to retry, ")
              + ", ".join(f"{k} {v}" for k, v in sorted(window.counts.items()) if not k.startswith("lines:")),
              flush=True)
        return retry


# ---------------------------------------------------------------------------------------------
# The pipeline and its launcher


def build(pipeline: beam.Pipeline, settings: Settings, poll_interval: float) -> None:
    root = os.path.abspath(settings.output)
    retry_wait = max(settings.stable_after, poll_interval, 5.0)
    (pipeline
     | "Start" >> beam.Create([None])
     | "Watch" >> beam.ParDo(WatchDoFn(settings.input, root, poll_interval, settings.retry_deadline,
                                       settings.dicomweb))
     | "Spread" >> beam.Reshuffle()
     | "Read" >> beam.ParDo(ReadDoFn(settings.use_fast_reader, settings.max_header_bytes, settings.retry_deadline,
                                     settings.dicomweb))
     | "Session" >> beam.ParDo(SessionDoFn(root, settings, retry_wait)))


def run(settings: Settings, poll_interval: float, beam_args: list[str]) -> dict:
    """Run the streaming pipeline until SIGTERM/SIGINT (drained) or it ends; {} (no batch summary)."""
    check_folders(settings)
    root = os.path.abspath(settings.output)
    if settings.fhir_server is not None:
        check_server(settings)
    os.makedirs(os.path.join(root, WINDOWS_DIR), exist_ok=True)
    stop_marker = os.path.join(root, STOP_NAME)
    if os.path.exists(stop_marker):
        os.remove(stop_marker)
    options = PipelineOptions([*beam_args, "--streaming"])
    options.view_as(SetupOptions).save_main_session = False
    pipeline = beam.Pipeline(options=options)
    build(pipeline, settings, poll_interval)
    previous = {}

    def drain(signum, frame):
        _LOG.warning("draining: open windows are written, then the pipeline ends (signal %d; again to stop at once)",
                     signum)
        with open(stop_marker, "w", encoding="utf-8") as out:
            out.write(f"{time.time()}\n")
        signal.signal(signum, stop_now)

    def stop_now(signum, frame):  # out through the normal exit, so Beam stops the Prism process it started
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, drain)
    try:
        result = pipeline.run()
        finished = threading.Event()
        failure = []

        def wait():
            try:
                result.wait_until_finish()
            except BaseException as exc:  # re-raised in the main thread
                failure.append(exc)
            finally:
                finished.set()

        threading.Thread(target=wait, name="stream-wait", daemon=True).start()
        while not finished.wait(0.5):  # the main thread stays free for the signal handlers
            pass
        if failure:
            raise failure[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if os.path.exists(stop_marker):
            os.remove(stop_marker)
    return {}

