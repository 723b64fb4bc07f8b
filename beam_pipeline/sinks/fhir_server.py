"""Writing to a FHIR server (``--fhir-server``): one transaction Bundle per study, DELETEs for what
is gone, under the project's one retry policy (``sources.retry``) and an AIMD bound on requests in
flight per worker.

Every answer becomes a :class:`Posted`: ``ok``; ``refused`` (a permanent 4xx, with the server's
OperationOutcome text: one error line, the run goes on); or ``unavailable`` (429, 5xx, 409 from
concurrent writes of a shared resource, or no answer, still after ``--retry-deadline``: exit 4).
"""
from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from beam_pipeline.codes import SourceUnavailable
from beam_pipeline.sinks.auth import Auth, AuthError, TokenSource
from beam_pipeline.sources.dicomweb import safe_url
from beam_pipeline.sources.retry import (
    THROTTLE_STATUSES,
    TRANSIENT_STATUSES,
    AdaptiveLimit,
    RetryBudget,
    RetryPolicy,
    TransientFailure,
    retry_after,
    retrying,
)

# HAPI answers 409 when two transactions create the same shared resource (a Device of many
# studies) at once: the second one succeeds when sent again, and fewer in flight conflict less.
SINK_TRANSIENT_STATUSES = TRANSIENT_STATUSES | {409}
SINK_THROTTLE_STATUSES = THROTTLE_STATUSES | {409}
DEFAULT_REQUESTS = 4       # transactions in flight per worker process
DETAIL_CHARS = 500         # of the server's diagnostics in an error line
DELETES_PER_BUNDLE = 500
# Reverse of the bundles' entry order: referencing resources are deleted before what they reference.
DELETE_ORDER = ("ImagingStudy", "Observation", "Device", "Endpoint", "ServiceRequest", "Encounter", "Patient")


class FhirServerError(Exception):
    """The server cannot be used at all (not FHIR, unreachable past the deadline, credentials
    refused); one line, no secret. ``transient``: it did not answer (worth running again later)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class ServerConfig:
    """Where and how to write (pickled to the workers)."""

    url: str
    auth: Auth = field(default_factory=Auth)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_in_flight: int = DEFAULT_REQUESTS
    connect_timeout: float = 10.0
    read_timeout: float = 300.0   # one study's transaction may be large
    verify: bool | str = True

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FhirServerError(f"--fhir-server must be an http(s) URL of a FHIR base, got {safe_url(self.url)!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise FhirServerError("--fhir-server must not carry credentials, a query or a fragment")

    @property
    def base(self) -> str:
        return self.url.rstrip("/")


@dataclass
class Posted:
    """What the server made of one request."""

    status: str                 # "ok" | "refused" | "unavailable"
    http_status: int | None = None
    detail: str = ""
    body: dict | None = None


def diagnostics(body, status: int) -> str:
    """The text of an OperationOutcome (its issues' diagnostics, else details.text), else the status."""
    texts = []
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or ():
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            if text:
                texts.append(str(text))
    text = "; ".join(texts) if texts else f"HTTP {status} without an OperationOutcome"
    return text[:DETAIL_CHARS]


class FhirClient:
    """One worker's connection: a pooled session, its token source, the in-flight bound and the
    retry budget, shared by the worker's threads."""

    def __init__(self, config: ServerConfig, budget: RetryBudget | None = None):
        self.config = config
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=0, pool_maxsize=max(config.max_in_flight, 1) + 2)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.verify = config.verify
        self.tokens = TokenSource(config.auth, self.session, config.retry)
        self.limit = AdaptiveLimit(max(config.max_in_flight, 1))
        self.budget = budget
        self.what = f"the FHIR server {safe_url(config.base)}"
        # A request gave up after a whole --retry-deadline: the server is down. Until it answers
        # again, each request gets one attempt, so a dead server costs one deadline, not one per study.
        self.down = False

    def _send(self, method: str, url: str, body: bytes | None):
        """One request under the retry policy; a 401 is sent once more with fresh credentials."""
        headers = {"Accept": "application/fhir+json"}
        if body is not None:
            headers["Content-Type"] = "application/fhir+json"
        timeout = (self.config.connect_timeout, self.config.read_timeout)

        def attempt():
            for _ in range(2):
                sent = self.tokens.header()
                if sent:
                    headers["Authorization"] = sent
                with self.limit.slot() as slot:
                    try:
                        response = self.session.request(method, url, data=body, headers=headers, timeout=timeout)
                    except requests.exceptions.SSLError:
                        raise
                    except (requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError) as exc:
                        raise TransientFailure(f"no answer from {self.what} ({type(exc).__name__})") from None
                    slot["throttled"] = response.status_code in SINK_THROTTLE_STATUSES
                if response.status_code == 401 and self.tokens.refused(sent):
                    continue
                break
            if response.status_code in SINK_TRANSIENT_STATUSES:
                raise TransientFailure(f"{self.what} answered HTTP {response.status_code}",
                                       retry_after(response.headers.get("Retry-After")), response.status_code)
            return response

        if self.down:
            try:
                return attempt()
            except TransientFailure as failure:
                raise SourceUnavailable(errno.EAGAIN, f"{failure.problem}; it gave no usable answer for a whole "
                                        f"--retry-deadline before, so one attempt per request until it answers") from None
        return retrying(attempt, self.config.retry, self.budget)

    def _posted(self, method: str, url: str, body: bytes | None) -> Posted:
        try:
            response = self._send(method, url, body)
        except SourceUnavailable as exc:
            self.down = True
            return Posted("unavailable", detail=exc.strerror or "FHIR server unavailable")
        except AuthError as exc:
            return Posted("unavailable", detail=str(exc))
        self.down = False
        try:
            parsed = response.json() if response.content else None
        except ValueError:
            parsed = None
        if 200 <= response.status_code < 300:
            return Posted("ok", response.status_code, body=parsed)
        return Posted("refused", response.status_code,
                      f"HTTP {response.status_code}: {diagnostics(parsed, response.status_code)}", parsed)

    def transaction(self, bundle: bytes) -> Posted:
        """POST one transaction Bundle to the base."""
        return self._posted("POST", self.config.base, bundle)

    def delete(self, keys) -> list[tuple[str, Posted]]:
        """DELETE ``Type/id`` keys: in transactions of up to DELETES_PER_BUNDLE; a refused
        transaction is sent again one key at a time (referencing types first), so one refused
        deletion costs one line. Returns (key or "", Posted) of what was not ok."""
        rank = {name: index for index, name in enumerate(DELETE_ORDER)}
        ordered = sorted(set(keys), key=lambda key: (rank.get(key.split("/", 1)[0], len(rank)), key))
        failed = []
        for start in range(0, len(ordered), DELETES_PER_BUNDLE):
            chunk = ordered[start:start + DELETES_PER_BUNDLE]
            bundle = {"resourceType": "Bundle", "type": "transaction",
                      "entry": [{"request": {"method": "DELETE", "url": key}} for key in chunk]}
            posted = self.transaction(json.dumps(bundle).encode("utf-8"))
            if posted.status == "ok":
                continue
            if posted.status == "unavailable":
                failed += [(key, posted) for key in chunk]
                continue
            for key in chunk:
                one = self._posted("DELETE", f"{self.config.base}/{key}", None)
                if one.status != "ok":
                    failed.append((key, one))
        return failed

    def check(self) -> None:
        """The start-up check: credentials can be had and ``/metadata`` is a CapabilityStatement;
        transient answers retried up to the deadline, then ``FhirServerError``."""
        try:
            self.tokens.header()
        except AuthError as exc:
            raise FhirServerError(str(exc)) from None
        except SourceUnavailable as exc:
            raise FhirServerError(f"no token: {exc.strerror}", transient=True) from None
        posted = self._posted("GET", self.config.base + "/metadata", None)
        if posted.status == "unavailable":
            raise FhirServerError(posted.detail, transient=True)
        if posted.status == "refused":
            raise FhirServerError(f"{self.what} refused /metadata: HTTP {posted.http_status}"
                                  + (" (check the credentials)" if posted.http_status in (401, 403) else ""))
        if not isinstance(posted.body, dict) or posted.body.get("resourceType") != "CapabilityStatement":
            raise FhirServerError(f"{self.what} is not a FHIR server: /metadata is no CapabilityStatement")


def entry_count(posted: Posted) -> int:
    body = posted.body
    return len(body.get("entry") or ()) if isinstance(body, dict) else 0
