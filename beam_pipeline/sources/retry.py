"""One retry policy for every network call of the sources (gs:// reads, list pages and access
checks; DICOMweb QIDO and WADO), and the bound on requests in flight that shrinks under throttling.

A call is written as an *attempt* that returns its result or raises :class:`TransientFailure`;
:func:`retrying` repeats it with google-api-core's exponential backoff with jitter, at least the
server's ``Retry-After``, until the policy's deadline, and then raises ``SourceUnavailable`` (the
file or study becomes an error ``unavailable``, a reason worth another run). Permanent answers
(400, 401, 403, 404, ...) are the attempt's result or its own exception, never retried.
"""
from __future__ import annotations

import errno
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from beam_pipeline.codes import SourceUnavailable

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
THROTTLE_STATUSES = frozenset({429, 503})  # the server asks for less load: fewer requests in flight
DEFAULT_RETRY_DEADLINE = 180.0  # seconds one request may keep retrying transient answers
DEFAULT_RETRY_BUDGET = 1800.0   # seconds of retry sleeps per fetcher (worker) in all: a dead endpoint ends the run


@dataclass(frozen=True)
class RetryPolicy:
    """How transient answers (408, 429, 5xx, resets, timeouts) are retried: exponential backoff
    with jitter (google-api-core's sleep generator), at least ``Retry-After`` when the server
    names it, until ``deadline`` seconds after the first attempt. Permanent answers (400, 401,
    403, 404) are never retried."""

    deadline: float = DEFAULT_RETRY_DEADLINE
    initial: float = 0.2
    maximum: float = 10.0
    budget: float = DEFAULT_RETRY_BUDGET

    def sleeps(self):
        from google.api_core.retry import exponential_sleep_generator

        return exponential_sleep_generator(self.initial, self.maximum)


class RetryBudget:
    """Seconds of retry sleeps left to one worker's fetcher; once spent, transient failures fail at
    once (as ``unavailable``), so a dead endpoint costs one budget, not a deadline per file."""

    def __init__(self, seconds: float):
        self.left = seconds
        self._lock = threading.Lock()

    def take(self, seconds: float) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= seconds
            return True


class TransientFailure(Exception):
    """One attempt met a transient answer; ``problem`` says which, for the final message."""

    def __init__(self, problem: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.retry_after = retry_after
        self.status = status


def retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds form; an HTTP date counts as absent)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def retrying(attempt, policy: RetryPolicy | None = None, budget: RetryBudget | None = None):
    """``attempt()``'s result, calling it again while it raises :class:`TransientFailure`; past the
    policy's deadline (or with the budget spent) ``SourceUnavailable`` naming the last problem."""
    policy = policy or RetryPolicy()
    give_up = time.monotonic() + policy.deadline
    sleeps = policy.sleeps()
    while True:
        try:
            return attempt()
        except TransientFailure as failure:
            pause = max(next(sleeps), failure.retry_after or 0.0)
            if time.monotonic() + pause > give_up or (budget is not None and not budget.take(pause)):
                raise SourceUnavailable(errno.EAGAIN, f"{failure.problem}, still after {policy.deadline:g} s "
                                        "of retries") from None
            time.sleep(pause)


def checked(response, what: str):
    """A ``requests`` response, or :class:`TransientFailure` when its status is transient."""
    status = response.status_code
    if status in TRANSIENT_STATUSES:
        raise TransientFailure(f"{what} answered HTTP {status}", retry_after(response.headers.get("Retry-After")),
                               status)
    return response


def requests_attempt(send, what: str, network_errors: bool = True):
    """An attempt for :func:`retrying` of a ``requests`` call: transient statuses and (with
    ``network_errors``) dropped connections, timeouts and bodies broken off are transient; a TLS
    verification failure or a malformed request is not."""
    import requests

    def attempt():
        try:
            response = send()
        except requests.exceptions.SSLError:
            raise
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if not network_errors:
                raise
            raise TransientFailure(f"no answer from {what} ({type(exc).__name__})") from exc
        return checked(response, what)

    return attempt


class AdaptiveLimit:
    """AIMD bound on requests in flight: halved when the server throttles (429/503), grown by one
    per window of successes (as TCP's congestion avoidance: one more after ``limit`` successes),
    never below 1 nor above ``cap`` (the configured concurrency).

    Replies to requests sent before the last decrease change nothing: one burst of 429s answering
    one window of requests is one signal, not one per request, and the successes of that window
    say nothing about the smaller one.
    """

    def __init__(self, cap: int):
        if cap < 1:
            raise ValueError("the cap must be at least 1")
        self.cap = cap
        self.limit = cap
        self.in_flight = 0
        self.epoch = 0        # bumped at each decrease
        self.successes = 0    # since the last change of the limit
        self.max_in_flight = 0
        self._changed = threading.Condition()

    # pure state changes (the caller holds the lock, or a test calls them directly)

    def on_success(self, epoch: int) -> None:
        if epoch != self.epoch:
            return
        self.successes += 1
        if self.successes >= self.limit and self.limit < self.cap:
            self.limit += 1
            self.successes = 0

    def on_throttle(self, epoch: int) -> None:
        if epoch == self.epoch:
            self.limit = max(1, self.limit // 2)
            self.epoch += 1
            self.successes = 0

    # thread-safe use

    def acquire(self) -> int:
        """Wait for a free slot; returns the epoch to hand back to :meth:`release`."""
        with self._changed:
            while self.in_flight >= self.limit:
                self._changed.wait()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.epoch

    def release(self, epoch: int, throttled: bool | None) -> None:
        """``throttled``: True for a 429/503, False for a success, None for neither (an error)."""
        with self._changed:
            self.in_flight -= 1
            if throttled:
                self.on_throttle(epoch)
            elif throttled is False:
                self.on_success(epoch)
            self._changed.notify_all()

    @contextmanager
    def slot(self):
        """``with limit.slot() as outcome: ...; outcome["throttled"] = ...``; an exception counts as neither."""
        epoch = self.acquire()
        outcome = {"throttled": None}
        try:
            yield outcome
        finally:
            self.release(epoch, outcome["throttled"])
