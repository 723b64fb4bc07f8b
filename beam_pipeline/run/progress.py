"""Progress of a long run on the console, honest on every runner.

Beam metrics cannot be read while the in-process runner works and are not served mid-run by
every portable job service, so the workers report instead: each DoFn instance that moves work
keeps a ``ProgressBeacon`` and rewrites one small JSON file of its cumulative counts at most every
``interval`` seconds into a hidden folder of the output (``.progress-<run>``; local or object
store). The launcher's ``ProgressReporter`` sums those files every ``interval`` seconds and prints
one line on stderr: counts and rates only, never paths or identifiers. The folder is removed at
the end. Counts are best-effort (a retried bundle counts twice); summary.json is the record.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.run.layout import PROGRESS_PREFIX
from beam_pipeline.sources.files import is_remote

DEFAULT_INTERVAL = 10.0


@dataclass(frozen=True)
class ProgressSettings:
    folder: str
    interval: float = DEFAULT_INTERVAL


def new_settings(output_dir: str, run_id: str, interval: float = DEFAULT_INTERVAL) -> ProgressSettings:
    return ProgressSettings(FileSystems.join(output_dir, PROGRESS_PREFIX + run_id), interval)


class ProgressBeacon:
    """One DoFn instance's cumulative counts, written to its own file now and then."""

    def __init__(self, settings: ProgressSettings | None):
        self.settings = settings
        self.counts: Counter = Counter()
        self.path = None if settings is None else FileSystems.join(settings.folder, uuid.uuid4().hex + ".json")
        self.written_at = 0.0
        self.written: Counter = Counter()

    def add(self, counts: dict, force: bool = False) -> None:
        if self.settings is None:
            return
        self.counts.update(counts)
        now = time.monotonic()
        if force or now - self.written_at >= self.settings.interval:
            self.written_at = now
            self._write()

    def flush(self) -> None:
        """Write now if anything changed since the last write (at the end of a bundle)."""
        if self.settings is not None and self.counts != self.written:
            self._write()

    def _write(self) -> None:
        self.written = Counter(self.counts)
        data = json.dumps(self.counts).encode("utf-8")
        try:
            if is_remote(self.path):
                with FileSystems.create(self.path) as out:
                    out.write(data)
                return
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            temp = self.path + ".tmp"
            with open(temp, "wb") as out:
                out.write(data)
            os.replace(temp, self.path)  # the reporter never reads half a file
        except OSError:
            pass  # progress is best-effort: a full disk shows up where the output is written


def read_counts(folder: str) -> Counter:
    """The sum of every beacon's last counts."""
    total: Counter = Counter()
    try:
        matches = FileSystems.match([FileSystems.join(folder, "*.json")])[0].metadata_list
    except OSError:  # nothing written yet (the folder does not exist), or a listing hiccup
        return total
    for meta in matches:
        try:
            with FileSystems.open(meta.path) as handle:
                total.update(json.loads(handle.read()))
        except (OSError, ValueError):
            continue  # replaced or removed while reading
    return total


def listing_complete(counts: Counter) -> bool:
    """A DICOMweb listing says so (``listing_done``); a file listing is complete when every part
    the top of the listing announced (``listing_parts``, itself included) is listed."""
    parts = counts.get("listing_parts", 0)
    return bool(counts.get("listing_done")) or (parts > 0 and counts.get("parts_listed", 0) >= parts)


def describe(counts: Counter, elapsed: float, previous: tuple[float, int] | None) -> str:
    """One line: what is done, how fast, and (once listing is complete) about how long is left."""
    read, listed = counts.get("files_read", 0), counts.get("files_listed", 0)
    unchanged = counts.get("unchanged", 0)  # a --since run's files (studies) not read again
    listing_done = listing_complete(counts)
    parts = [f"{read:,} of {listed - unchanged:,}{'' if listing_done else '+'} files read"]
    if counts.get("studies_listed"):
        parts = [f"{counts.get('studies_fetched', 0):,} of {counts['studies_listed'] - unchanged:,} studies fetched"]
    if unchanged:
        parts.append(f"{unchanged:,} unchanged")
    parts.append(f"{counts.get('instances_read', 0):,} instances")
    parts.append(f"{counts.get('studies_written', 0):,} studies written")
    done = counts.get("studies_fetched", 0) if counts.get("studies_listed") else read
    total = (counts.get("studies_listed") or listed) - unchanged
    rate = done / elapsed if elapsed > 0 else 0.0
    if previous is not None and elapsed > previous[0]:
        rate = max(0.0, (done - previous[1]) / (elapsed - previous[0]))
    unit = "studies" if counts.get("studies_listed") else "files"
    parts.append(f"{rate:,.0f} {unit}/s")
    if (listing_done or counts.get("studies_listed")) and rate > 0 and total > done:
        parts.append(f"about {_duration((total - done) / rate)} left")
    return f"progress ({_duration(elapsed)}): " + ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressReporter:
    """Prints a progress line every ``interval`` seconds while the run goes on (a thread)."""

    def __init__(self, settings: ProgressSettings, stream=None):
        self.settings = settings
        self.stream = stream or sys.stderr
        self.redraw = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.started = time.monotonic()
        self.previous = None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join(timeout=5)
        if self.redraw:
            self.stream.write("\n")
        remove(self.settings.folder)

    def _loop(self) -> None:
        while not self.stopped.wait(self.settings.interval):
            elapsed = time.monotonic() - self.started
            counts = read_counts(self.settings.folder)
            line = describe(counts, elapsed, self.previous)
            done = counts.get("studies_fetched", 0) if counts.get("studies_listed") else counts.get("files_read", 0)
            self.previous = (elapsed, done)
            if self.redraw:  # an interactive terminal: one line, redrawn
                self.stream.write("\r\x1b[K" + line)
            else:            # a log file or CI: plain lines
                self.stream.write(line + "\n")
            self.stream.flush()


def remove(folder: str) -> None:
    try:
        if is_remote(folder):
            matches = FileSystems.match([FileSystems.join(folder, "*")])[0].metadata_list
            if matches:
                FileSystems.delete([m.path for m in matches])
        elif os.path.isdir(folder):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    except OSError:  # best-effort clean-up of a hidden folder; the next run removes stale ones
        pass
