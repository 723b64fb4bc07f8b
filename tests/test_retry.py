"""The retry policy and the AIMD limit of requests in flight, as plain objects (no server)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from beam_pipeline.codes import SourceUnavailable
from beam_pipeline.sources.retry import AdaptiveLimit, RetryBudget, RetryPolicy, TransientFailure, retrying

FAST = RetryPolicy(deadline=5.0, initial=0.001, maximum=0.01)


def test_the_limit_halves_on_throttling_down_to_one():
    limit = AdaptiveLimit(64)
    seen = []
    for _ in range(8):
        limit.on_throttle(limit.epoch)
        seen.append(limit.limit)
    assert seen == [32, 16, 8, 4, 2, 1, 1, 1]


def test_one_window_of_throttled_replies_halves_once():
    limit = AdaptiveLimit(16)
    epoch = limit.epoch  # 16 requests sent in one window, all answered 429
    for _ in range(16):
        limit.on_throttle(epoch)
    assert limit.limit == 8


def test_the_limit_grows_by_one_per_window_of_successes_up_to_the_cap():
    limit = AdaptiveLimit(8)
    limit.on_throttle(limit.epoch)
    limit.on_throttle(limit.epoch)
    assert limit.limit == 2
    grown = []
    for _ in range(2 + 3 + 4 + 5 + 6 + 7 + 20):
        limit.on_success(limit.epoch)
        grown.append(limit.limit)
    assert grown[1] == 3 and grown[4] == 4 and grown[8] == 5  # one more after `limit` successes
    assert max(grown) == limit.limit == 8


def test_replies_from_before_a_decrease_change_nothing():
    limit = AdaptiveLimit(4)
    old = limit.epoch
    limit.on_throttle(old)
    for _ in range(10):
        limit.on_success(old)
    assert limit.limit == 2


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError):
        AdaptiveLimit(0)


def test_threads_never_exceed_the_limit_and_a_throttle_shrinks_it():
    limit = AdaptiveLimit(8)
    lock = threading.Lock()
    now = [0]
    observed = []

    full = threading.Event()  # the first requests wait until 8 are in flight, however slow the machine

    def request(index):
        with limit.slot() as outcome:
            with lock:
                now[0] += 1
                observed.append((index, now[0], limit.limit))
                if now[0] == 8:
                    full.set()
            assert full.wait(60)
            time.sleep(0.002)
            with lock:
                now[0] -= 1
            outcome["throttled"] = index == 50  # one 429 halfway

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(request, range(100)))
    assert all(in_flight <= cap for _, in_flight, cap in observed)
    assert limit.max_in_flight == 8
    assert limit.in_flight == 0
    assert min(cap for _, _, cap in observed) == 4


def test_an_error_neither_grows_nor_shrinks_the_limit():
    limit = AdaptiveLimit(4)
    with pytest.raises(RuntimeError), limit.slot():
        raise RuntimeError("a reader bug")
    assert (limit.limit, limit.in_flight, limit.successes) == (4, 0, 0)


def test_retrying_gives_the_result_after_transient_failures():
    answers = iter([TransientFailure("HTTP 503"), TransientFailure("HTTP 429", retry_after=0.01), "ok"])

    def attempt():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    started = time.monotonic()
    assert retrying(attempt, FAST) == "ok"
    assert time.monotonic() - started >= 0.01  # Retry-After honoured


def test_retrying_past_the_deadline_is_unavailable_naming_the_problem():
    def attempt():
        raise TransientFailure("object storage answered HTTP 503")

    with pytest.raises(SourceUnavailable, match="HTTP 503, still after 0.05 s"):
        retrying(attempt, RetryPolicy(deadline=0.05, initial=0.001, maximum=0.01))


def test_a_permanent_failure_is_not_retried():
    calls = []

    def attempt():
        calls.append(1)
        raise PermissionError("HTTP 403")

    with pytest.raises(PermissionError):
        retrying(attempt, FAST)
    assert len(calls) == 1


def test_a_spent_budget_fails_at_once():
    budget = RetryBudget(0.0)
    calls = []

    def attempt():
        calls.append(1)
        raise TransientFailure("HTTP 503")

    with pytest.raises(SourceUnavailable):
        retrying(attempt, FAST, budget)
    assert len(calls) == 1
