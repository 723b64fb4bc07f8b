"""Fault plans for the injecting proxy (``benchmarks.latency_proxy.LatencyProxy(fault=...)``): what
the store or PACS answers instead of forwarding a request."""
from __future__ import annotations

import random
import threading
import time
from urllib.parse import quote


class Faults:
    """Random 503/429/dropped connections, outages (every request 503) and permanent 403s."""

    def __init__(self, seed=19, p503=0.0, p429=0.0, pdrop=0.0, forbidden=(), outage=None, only=None):
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.p503, self.p429, self.pdrop = p503, p429, pdrop
        self.forbidden = tuple(forbidden)
        self.outage = outage  # (start after s, length s, period s) from the first request
        self.only = only  # faults only for requests whose target holds this (e.g. "/metadata")
        self.first = None
        self.injected = 0
        self.denied = 0  # 403s answered

    def __call__(self, method, target):
        if self.only is not None and self.only not in target:
            return None
        with self.lock:
            now = time.monotonic()
            self.first = self.first or now
            if any(name in target for name in self.forbidden):
                self.denied += 1
                return 403
            if self.outage:
                start, length, period = self.outage
                if (now - self.first - start) % period < length and now - self.first >= start:
                    self.injected += 1
                    return 503
            draw = self.random.random()
            if draw < self.p503:
                self.injected += 1
                return 503
            if draw < self.p503 + self.p429:
                self.injected += 1
                return 429
            if draw < self.p503 + self.p429 + self.pdrop:
                self.injected += 1
                return "drop"
            return None


class ObjectFaults:
    """Downloads of some objects always answer 503 (an outage of their part of the store), of
    others 403 (permanent); listing and the start-up check pass."""

    def __init__(self, unavailable=(), forbidden=()):
        self.unavailable = tuple(quote(name, safe="") for name in unavailable)
        self.forbidden = tuple(quote(name, safe="") for name in forbidden)
        self.injected = 0

    def __call__(self, method, target):
        if "/download/" not in target:
            return None
        if any(f"/o/{name}?" in target for name in self.forbidden):
            return 403
        if any(f"/o/{name}?" in target for name in self.unavailable):
            self.injected += 1
            return 503
        return None
