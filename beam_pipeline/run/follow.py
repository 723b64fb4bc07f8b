"""``--follow``: keep converting an archive as it grows, as a loop of bounded Beam runs (cycles);
``mode_of`` picks this loop or the streaming pipeline of ``stream.py`` (``--follow-mode``).

Each cycle is an incremental run (``--since`` the previous cycle) into ``OUTPUT/cycles/NNNNNNNN``:
it lists the input (folder, gs:// prefix, or the DICOMweb server's QIDO-RS search), reads only new
and changed files or studies, and with ``--fhir-server`` sends the Bundles the server does not have
yet once a study has not changed for ``--stable-after`` seconds (see ``fhir_sink``). A file still
being written is read again once its size or modification time changes, so its study waits.

The newest complete cycle (its ``summary.json`` written last) is the state: on start the loop
resumes from it and removes cycles that did not finish (a stop, a crash); their Bundles are sent
again, which changes nothing on the server (PUT by id). SIGTERM or SIGINT stops the loop after the
cycle in progress; a second one ends the process at once (the cycle is then discarded on restart).
``OUTPUT/follow.json`` names the newest cycle and its summary. Without ``--fhir-server`` each
cycle's changes are kept as NDJSON per window in ``OUTPUT/windows/NNNNNNNN/``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass

from beam_pipeline.run import output
from beam_pipeline.run.layout import DELTA_DIR, MANIFEST_NAME, STATE_HEADER_NAME, SUMMARY_NAME
from beam_pipeline.run.pipeline import execute
from beam_pipeline.run.settings import Settings
from beam_pipeline.run.state import StateError
from beam_pipeline.sinks.auth import AuthError
from beam_pipeline.sinks.fhir_server import FhirClient, FhirServerError
from beam_pipeline.sources import files as inputs

_LOG = logging.getLogger(__name__)
STREAMING_RUNNERS = ("prismrunner", "flinkrunner", "portablerunner")  # Dataflow: no shared local --output

DEFAULT_STABLE_AFTER = 30.0
DEFAULT_POLL_INTERVAL = 10.0
CYCLES_DIR = "cycles"
WINDOWS_DIR = "windows"  # without --fhir-server: what each cycle added or changed, for a loader to take
STATUS_NAME = "follow.json"
MODES = ("auto", "stream", "cycles")
MAX_FAILED_CYCLES = 5  # cycles failing one after the other (not a transient server fault): stop, exit 3


@dataclass(frozen=True)
class FollowSettings:
    """One cycle's settings (``run.output`` is the follow folder) and the time between cycles."""

    run: Settings
    poll_interval: float = DEFAULT_POLL_INTERVAL
    mode: str = "cycles"  # "stream": run/stream.py's streaming pipeline instead of the loop


def mode_of(requested: str, settings: Settings, beam_args: list[str], error) -> str:
    """"stream" or "cycles" for ``--follow-mode``: auto streams on a streaming runner (Prism, Flink)
    grouped by study, and loops cycles otherwise (the in-process runner is batch only;
    ``--group-by directory`` is followed by cycles)."""
    streams = streaming_runner(beam_args)
    fits = settings.group_by == "study"
    if requested == "stream":
        if not streams:
            error("--follow-mode stream needs a streaming runner whose workers share the local --output: "
                  "--runner PrismRunner (or FlinkRunner); Dataflow follows in cycles")
        if not fits:
            error("--follow-mode stream groups by study: use --follow-mode cycles for --group-by directory")
        return "stream"
    if requested == "cycles" or not (streams and fits):
        return "cycles"
    return "stream"


def streaming_runner(beam_args: list[str]) -> bool:
    """Whether the named runner streams with workers that share the local --output."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    return runner is not None and runner.lower() in STREAMING_RUNNERS


class Stop:
    """Set by the first SIGTERM/SIGINT; the handlers are then reset, so a second one acts at once."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = {}

    def install(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        _LOG.warning("stopping after the cycle in progress (signal %d; send it again to stop at once)", signum)
        self.event.set()
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def complete(folder: str) -> bool:
    """A cycle that finished: its state header and its summary (written last) are there."""
    return os.path.isfile(os.path.join(folder, SUMMARY_NAME)) and os.path.isfile(os.path.join(folder, STATE_HEADER_NAME))


def resume(cycles: str) -> tuple[str | None, int]:
    """(the newest complete cycle or None, the next cycle's number); every other cycle is removed."""
    names = sorted(name for name in os.listdir(cycles) if name.isdigit())
    newest = next((name for name in reversed(names) if complete(os.path.join(cycles, name))), None)
    for name in names:
        if name != newest:
            shutil.rmtree(os.path.join(cycles, name), ignore_errors=True)
    return (os.path.join(cycles, newest) if newest else None), (int(names[-1]) + 1 if names else 1)


def write_status(root: str, document: dict) -> None:
    temp = os.path.join(root, f".{STATUS_NAME}.tmp")
    with open(temp, "w", encoding="utf-8") as out:
        json.dump(document, out, indent=2)
        out.write("\n")
    os.replace(temp, os.path.join(root, STATUS_NAME))


def cycle_line(number: int, summary: dict) -> str:
    sink = summary.get("fhir_server") or {}
    parts = [f"cycle {number}: {summary['files_matched']} files, {summary['studies']['written']} studies"]
    if summary.get("incremental"):
        parts.append("rebuilt " + str(summary["incremental"].get("studies_rebuilt", 0)))
    if sink:
        parts.append("fhir-server " + ", ".join(f"{k} {v}" for k, v in sink.items()))
    if summary["errors_by_reason"]:
        parts.append("errors " + ", ".join(f"{k} {v}" for k, v in summary["errors_by_reason"].items()))
    return "; ".join(parts) + f" ({summary['seconds']} s)"


def changed(delta: str) -> bool:
    """A ``_delta/`` with changed resources or deletions."""
    if any(name.endswith(".ndjson") for name in os.listdir(delta)):
        return True
    try:
        with open(os.path.join(delta, "deletions.json"), encoding="utf-8") as handle:
            return bool(json.load(handle).get("entry"))
    except (OSError, ValueError):
        return False


def keep_window(folder: str, root: str, number: int) -> str | None:
    """Without a FHIR server: what the cycle in ``folder`` changed, kept as
    ``OUTPUT/windows/NNNNNNNN/`` (a loader takes it and removes it): its ``_delta/`` (changed
    resources, deletions and their manifest), or for the first cycle its whole snapshot (the
    resource files and manifest.json, hard-linked); None for a cycle that changed nothing. URLs in
    the manifests stay valid relative to the window's folder."""
    window = os.path.join(root, WINDOWS_DIR, f"{number:08d}")
    delta = os.path.join(folder, DELTA_DIR)
    if os.path.isdir(delta):
        if not changed(delta):
            return None
        os.makedirs(window, exist_ok=True)
        os.replace(delta, os.path.join(window, DELTA_DIR))
        return window
    os.makedirs(window, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".ndjson") or name == MANIFEST_NAME:
            source, target = os.path.join(folder, name), os.path.join(window, name)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    return window


def check_folders(settings: Settings) -> None:
    """The follow folder is local (its state is plain files) and not inside the watched folder."""
    root = settings.output
    if "://" in root:
        raise output.OutputError("--follow keeps its state in a local --output folder (the input may be gs://)")
    if settings.input is not None and "://" not in settings.input:
        inside = os.path.realpath(root) + os.sep
        if inside.startswith(os.path.realpath(inputs.group_root(settings.input)) + os.sep):
            raise output.OutputError("--follow: put --output beside the --input folder, not inside it")


def check_server(settings: Settings) -> None:
    """Refused credentials or no FHIR server: stop now (exit 2). A server that is down is only
    warned about: its studies wait in the state until it is back."""
    try:
        FhirClient(settings.fhir_server).check()
    except FhirServerError as exc:
        if not exc.transient:
            raise
        _LOG.warning("%s; its studies wait until it answers", exc)


def follow(settings: FollowSettings, new_pipeline, stop: Stop | None = None, max_cycles: int | None = None) -> dict:
    """Run cycles until stopped (or ``max_cycles``); returns the last cycle's summary."""
    base = settings.run
    root = base.output
    check_folders(base)
    cycles = os.path.join(root, CYCLES_DIR)
    os.makedirs(cycles, exist_ok=True)
    stop = stop or Stop().install()
    previous, number = resume(cycles)
    if base.fhir_server is not None:
        check_server(base)
    summary: dict = {}
    failures = 0
    try:
        while not stop.event.is_set() and (max_cycles is None or max_cycles > 0):
            started = time.monotonic()
            folder = os.path.join(cycles, f"{number:08d}")
            cycle = dataclasses.replace(base, output=folder, since=previous, run_id=uuid.uuid4().hex[:12],
                                        progress=None)
            try:
                summary = execute(new_pipeline, cycle)
            except StateError as exc:  # e.g. a new converter version: start over (the server keeps what it has)
                _LOG.warning("cannot continue from %s (%s): the next cycle reads everything", previous, exc)
                shutil.rmtree(folder, ignore_errors=True)
                previous = None
                continue
            except (FhirServerError, AuthError):
                raise
            except Exception as exc:  # a failed cycle: discarded, tried again (its studies are not lost)
                failures += 1
                shutil.rmtree(folder, ignore_errors=True)
                if failures >= MAX_FAILED_CYCLES:
                    raise
                _LOG.error("cycle %d failed (%s: %s); trying again", number, type(exc).__name__,
                           str(exc).strip().splitlines()[-1:] or "")
                stop.event.wait(settings.poll_interval)
                continue
            failures = 0
            if base.fhir_server is None:
                keep_window(folder, root, number)
            write_status(root, {"cycle": number, "folder": os.path.relpath(folder, root),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary})
            print(cycle_line(number, summary), flush=True)
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            previous, number = folder, number + 1
            if max_cycles is not None:
                max_cycles -= 1
            stop.event.wait(max(0.0, settings.poll_interval - (time.monotonic() - started)))
    finally:
        stop.restore()
    return summary
