"""Google Cloud Storage access for header reading: ranged reads, concurrent reads, access checks.

On object storage a header read is bound by round trips, not by the CPU. So:

* one ranged GET of the first ``header.FIRST_READ`` bytes per object, no metadata request first
  (the object's size comes back in that response's ``Content-Range``); a further range only when
  the header reader asks for more (it grows its window by doubling, as on local disk, so the bytes
  fetched per file equal those read locally);
* several header reads in flight per worker (``core.process_files`` with a bounded thread pool);
* before any work, :func:`check_input` / :func:`check_output` find a missing credential, bucket or
  permission within seconds and say so in one line, instead of retrying for minutes.

Ranged GETs go over kept-alive connections, one per reading thread; the checks use an
``AuthorizedSession``. ``STORAGE_EMULATOR_HOST`` (an emulator, no credentials) and
``API_ENDPOINT_OVERRIDE`` are honoured like google-cloud-storage does.
"""
from __future__ import annotations

import contextlib
import errno
import http.client
import io
import logging
import os
import threading
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import quote, urlsplit

from beam_pipeline.codes import SourceUnavailable
from beam_pipeline.sources.retry import (  # noqa: F401  (the policy's names, as callers know them here)
    DEFAULT_RETRY_BUDGET,
    DEFAULT_RETRY_DEADLINE,
    THROTTLE_STATUSES,
    TRANSIENT_STATUSES,
    AdaptiveLimit,
    RetryBudget,
    RetryPolicy,
    TransientFailure,
    requests_attempt,
    retry_after,
    retrying,
)

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"  # read input, write output
READ_TIMEOUT = 60.0     # per socket operation of a ranged GET
CHECK_TIMEOUT = 8.0     # per request of an access check
CHECK_DEADLINE = 25.0   # all access checks together, credential lookup included: under 30 s
class GcsAccessError(Exception):
    """A check of --input or --output failed; the message is one line for the console."""


def split_path(path: str) -> tuple[str, str]:
    """gs://bucket/some/name -> ("bucket", "some/name")."""
    if not path.startswith("gs://"):
        raise ValueError(f"not a gs:// path: {path}")
    bucket, _, name = path[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {path}")
    return bucket, name


def endpoint() -> str:
    """The JSON API root the storage client library would use."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        return emulator if "://" in emulator else "http://" + emulator
    return os.environ.get("API_ENDPOINT_OVERRIDE") or DEFAULT_ENDPOINT


def credentials():
    """Anonymous for an emulator, else Application Default Credentials (raises if there are none)."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    import google.auth

    found, _ = google.auth.default(scopes=[STORAGE_SCOPE])
    return found


def open_session():
    """An authorized requests session (for the access checks: few requests, clear errors)."""
    from google.auth.transport.requests import AuthorizedSession

    return AuthorizedSession(credentials(), refresh_timeout=CHECK_TIMEOUT)


def _total_size(content_range: str | None) -> int | None:
    """'bytes 0-16383/52000' -> 52000; '*' or a missing header -> None."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


class RangeFetcher:
    """Fetches byte ranges of objects; thread-safe, one kept-alive connection per thread.

    Plain ``http.client`` rather than requests: per ranged GET it costs about a quarter of the
    client CPU, and at tens of requests in flight the client's CPU is what bounds a worker. The
    credentials (anonymous for an emulator) are applied and refreshed by google-auth.
    """

    def __init__(self, creds=None, base_url: str | None = None, policy: RetryPolicy | None = None,
                 limit: AdaptiveLimit | None = None):
        self.credentials = creds if creds is not None else credentials()
        self.policy = policy or RetryPolicy()
        self.budget = RetryBudget(self.policy.budget)
        self.limit = limit  # requests in flight, shrinking under 429/503 (None: bounded by the caller's threads)
        self.base_url = (base_url or endpoint()).rstrip("/")
        parsed = urlsplit(self.base_url)
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port or (443 if self._https else 80)
        self._path_prefix = parsed.path.rstrip("/")
        self._local = threading.local()
        self._auth_request = None
        self.requests = 0  # counted for tests and the benchmark; approximate under threads

    def fetch(self, bucket: str, name: str, start: int, length: int) -> tuple[bytes, int | None]:
        """Bytes [start, start + length) (fewer at the end of the object) and the object's size;
        transient answers retried under the policy (``SourceUnavailable`` past its deadline)."""
        path = f"{self._path_prefix}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}?alt=media"
        return retrying(lambda: self._fetch_once(path, start, length), self.policy, self.budget)

    def _fetch_once(self, path: str, start: int, length: int) -> tuple[bytes, int | None]:
        headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        with (self.limit.slot() if self.limit is not None else contextlib.nullcontext({})) as outcome:
            self.requests += 1
            try:
                self._authorize(path, headers)
                status, content_range, data, wait = self._get(path, headers)
            except (OSError, http.client.HTTPException) as exc:  # dropped keep-alive, reset, timeout
                self._local.connection = None
                raise TransientFailure(f"no answer from object storage ({type(exc).__name__})") from None
            outcome["throttled"] = status in THROTTLE_STATUSES
        if status in (200, 206):
            size = _total_size(content_range)
            if status == 200:  # the whole object: the server ignored the range
                size = len(data)
                data = data[start:start + length]
            return data, size
        if status == 416:  # the range starts at or past the end: empty object or read past it
            return b"", _total_size(content_range)
        if status == 404:
            raise FileNotFoundError(errno.ENOENT, "object does not exist (deleted after listing?)")
        if status in (401, 403):
            raise PermissionError(errno.EACCES, f"no permission to read the object (HTTP {status})")
        if status in TRANSIENT_STATUSES:
            raise TransientFailure(f"object storage answered HTTP {status}", wait, status)
        raise OSError(errno.EIO, f"object storage answered HTTP {status}")

    def _authorize(self, path: str, headers: dict) -> None:
        if self._auth_request is None:
            from google.auth.transport.requests import Request

            self._auth_request = Request()
        self.credentials.before_request(self._auth_request, "GET", self.base_url + path, headers)

    def _get(self, path: str, headers: dict) -> tuple[int, str | None, bytes, float | None]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.will_close:
            self._local.connection = None
            connection.close()
        return response.status, response.getheader("Content-Range"), data, retry_after(response.getheader("Retry-After"))

    def _connect(self) -> http.client.HTTPConnection:
        proxy = None if urllib.request.proxy_bypass(self._host or "") else \
            urllib.request.getproxies().get("https" if self._https else "http")
        host, port = self._host, self._port
        if proxy:
            proxied = urlsplit(proxy if "://" in proxy else "http://" + proxy)
            host, port = proxied.hostname, proxied.port or 80
        if self._https:
            import ssl

            import certifi

            context = ssl.create_default_context(cafile=certifi.where())
            connection = http.client.HTTPSConnection(host, port, timeout=READ_TIMEOUT, context=context)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=READ_TIMEOUT)
        if proxy:
            connection.set_tunnel(self._host, self._port)
        return connection


class RangedObject(io.RawIOBase):
    """A read-only, seekable view of one object, fetched in ranges into one cached window.

    The header readers read from the start and grow their window by doubling; each read past the
    cached window fetches at least as much again, so a header costs one request, or a few when it is
    long. A read that jumps past the window (a reader seeking over a large value it does not need)
    starts a new window there instead of fetching what lies between, so skipping a 512 MiB private
    element costs one request, not 512 MiB. ``read_header(fp, spec)`` works on it unchanged (it
    also seeks to the end for the size).
    """

    def __init__(self, fetcher: RangeFetcher, path: str, first_read: int, size: int | None = None):
        super().__init__()
        self.fetcher = fetcher
        self.path = path
        self.bucket, self.name = split_path(path)
        self.first_read = max(first_read, 1)
        self.size = size
        self.cache = b""   # the object's bytes from offset self.start
        self.start = 0
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        elif whence == io.SEEK_END:
            self.pos = self._size() + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if self.pos < 0:
            raise ValueError("negative seek position")
        return self.pos

    def read(self, size: int = -1) -> bytes:
        end = self._size() if size is None or size < 0 else self.pos + size
        if not self.start <= self.pos <= self.start + len(self.cache):
            self.cache, self.start = b"", self.pos  # a jump: fetch from here, not what lies between
        if end > self.start + len(self.cache):
            self._extend_to(end)
        data = self.cache[self.pos - self.start:end - self.start]
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def _size(self) -> int:
        if self.size is None:
            self._extend_to(self.start + len(self.cache) + self.first_read)
        return self.size if self.size is not None else self.start + len(self.cache)

    def _extend_to(self, end: int) -> None:
        have = self.start + len(self.cache)
        if self.size is not None:
            end = min(end, self.size)
            if end <= have:
                return
        want = max(end - have, len(self.cache), self.first_read)  # doubling, like the header readers
        data, size = self.fetcher.fetch(self.bucket, self.name, have, want)
        if size is not None:
            self.size = size
        elif len(data) < want:  # no size reported: a short answer marks the end
            self.size = have + len(data)
        self.cache += data


def open_ranged(fetcher: RangeFetcher, path: str, first_read: int | None = None,
                size: int | None = None) -> RangedObject:
    if first_read is None:
        from beam_pipeline.dicom.header import FIRST_READ

        first_read = FIRST_READ
    return RangedObject(fetcher, path, first_read, size)


# ---------------------------------------------------------------------------------------------
# Listing


LIST_PAGE_SIZE = 1000
LIST_TIMEOUT = 60.0  # per list page


def _json_get(session, url: str, params: dict | None = None, policy: RetryPolicy | None = None):
    """A GET of the JSON API, transient answers and dropped connections retried under the policy
    (``SourceUnavailable`` past its deadline); a refusal raises PermissionError."""
    what = f"gs://{url.split('/b/', 1)[-1].split('/', 1)[0]}"
    response = retrying(requests_attempt(
        lambda: session.request("GET", url, params=params, timeout=(CHECK_TIMEOUT, LIST_TIMEOUT)), what), policy)
    if response.status_code in (401, 403):
        raise PermissionError(errno.EACCES, f"no permission to list {url.split('/b/', 1)[-1]} (HTTP {response.status_code})")
    return response


def list_objects(bucket: str, prefix: str, session=None, policy: RetryPolicy | None = None,
                 delimiter: str | None = None) -> Iterator[tuple[str, int | None, str | None]]:
    """(gs:// path, size, generation) of every object whose name starts with ``prefix``, page by
    page; with a ``delimiter`` the objects directly under the prefix, then (path, None, None) of each sub-prefix
    (ending in the delimiter). A page still failing past the policy's deadline raises
    ``SourceUnavailable``."""
    session = session or open_session()
    url = f"{endpoint().rstrip('/')}/storage/v1/b/{quote(bucket, safe='')}/o"
    params = {"prefix": prefix, "maxResults": str(LIST_PAGE_SIZE), "fields": "items(name,size,generation),nextPageToken"}
    if delimiter:
        params.update(delimiter=delimiter, fields="items(name,size,generation),prefixes,nextPageToken")
    while True:
        response = _json_get(session, url, params, policy)
        if response.status_code != 200:
            raise OSError(errno.EIO, f"listing gs://{bucket} answered HTTP {response.status_code}")
        page = response.json()
        for item in page.get("items", ()):
            size = item.get("size")
            generation = item.get("generation")
            yield (f"gs://{bucket}/{item['name']}", int(size) if size is not None else None,
                   str(generation) if generation is not None else None)
        for sub_prefix in page.get("prefixes", ()):
            yield f"gs://{bucket}/{sub_prefix}", None, None
        token = page.get("nextPageToken")
        if not token:
            return
        params = {**params, "pageToken": token}


def object_exists(path: str, session=None) -> bool:
    """Whether ``path`` names one object (rather than a prefix of some)."""
    bucket, name = split_path(path)
    if not name:
        return False
    session = session or open_session()
    url = f"{endpoint().rstrip('/')}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
    response = _json_get(session, url, {"fields": "name"})
    if response.status_code not in (200, 404):
        raise OSError(errno.EIO, f"looking up {path} answered HTTP {response.status_code}")
    return response.status_code == 200


# ---------------------------------------------------------------------------------------------
# Access checks before any work


@dataclass(frozen=True)
class _Probe:
    session: object
    base_url: str
    policy: RetryPolicy = RetryPolicy()


def _probe_session(policy: RetryPolicy | None = None) -> _Probe:
    auth_log = logging.getLogger("google.auth")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)  # its warnings of each place it looked: our one line says it
    try:
        session = open_session()
    except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
        raise GcsAccessError(
            "no Google Cloud credentials found (run `gcloud auth application-default login`, or set "
            f"GOOGLE_APPLICATION_CREDENTIALS): {type(exc).__name__}") from None
    finally:
        auth_log.setLevel(level)
    return _Probe(session, endpoint().rstrip("/"), policy or RetryPolicy())


def _request(probe: _Probe, what: str, method: str, url: str, **kwargs):
    """One request of an access check: transient answers (an outage at start-up) retried under the
    policy; no answer at all (refused, unresolvable, timed out) fails at once with one line."""
    send = lambda: probe.session.request(method, url, timeout=(CHECK_TIMEOUT, CHECK_TIMEOUT), **kwargs)  # noqa: E731
    try:
        return retrying(requests_attempt(send, probe.base_url, network_errors=False), probe.policy)
    except SourceUnavailable as exc:
        raise GcsAccessError(f"{what}: {exc.strerror}") from None
    except Exception as exc:  # connection refused, DNS, timeout, token refresh without network
        name = type(exc).__name__
        if "Timeout" in name:
            raise GcsAccessError(f"{what}: no answer from {probe.base_url} within {CHECK_TIMEOUT:.0f} s") from None
        if "RefreshError" in name or "TransportError" in name:
            raise GcsAccessError(f"{what}: the Google Cloud credentials could not be used ({name})") from None
        raise GcsAccessError(f"{what}: cannot connect to {probe.base_url} ({name})") from None


def _explain(what: str, bucket: str, response) -> GcsAccessError:
    status = response.status_code
    if status == 404:
        return GcsAccessError(f"{what}: bucket gs://{bucket} does not exist")
    if status == 401:
        return GcsAccessError(f"{what}: not authenticated for gs://{bucket} (HTTP 401; check the credentials)")
    if status == 403:
        return GcsAccessError(f"{what}: permission denied on gs://{bucket} (HTTP 403)")
    return GcsAccessError(f"{what}: gs://{bucket} answered HTTP {status}")


def fixed_prefix(path: str) -> str:
    """The object name prefix before any glob character."""
    _, name = split_path(path)
    for index, char in enumerate(name):
        if char in "*?[":
            return name[:index]
    return name


def check_input(path: str, policy: RetryPolicy | None = None, option: str = "--input") -> None:
    """Raise GcsAccessError unless objects under ``path`` (a gs:// prefix or glob) can be listed;
    transient answers (an outage at start-up) are retried under the policy, permanent ones are not.
    ``option`` names the path in the message (``--since`` is read like an input)."""
    what = f"{option} {path}"
    bucket, _ = split_path(path)
    probe = _probe_session(policy)
    url = f"{probe.base_url}/storage/v1/b/{quote(bucket, safe='')}/o"
    response = _request(probe, what, "GET", url,
                        params={"prefix": fixed_prefix(path), "maxResults": "1", "fields": "items/name"})
    if response.status_code != 200:
        raise _explain(what, bucket, response)


def check_output(path: str, policy: RetryPolicy | None = None) -> None:
    """Raise GcsAccessError unless a small object can be written under ``path`` and deleted again."""
    what = f"--output {path}"
    bucket, name = split_path(path)
    probe = _probe_session(policy)
    prefix = name.strip("/")
    probe_name = f"{prefix}/.dicom2fhir-write-check-{uuid.uuid4().hex}" if prefix else \
        f".dicom2fhir-write-check-{uuid.uuid4().hex}"
    upload = f"{probe.base_url}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
    response = _request(probe, what, "POST", upload, params={"uploadType": "media", "name": probe_name},
                        data=b"write check", headers={"Content-Type": "application/octet-stream"})
    if response.status_code not in (200, 201):
        raise _explain(what, bucket, response)
    delete = f"{probe.base_url}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(probe_name, safe='')}"
    response = _request(probe, what, "DELETE", delete)
    if response.status_code not in (200, 204, 404):
        raise GcsAccessError(f"{what}: can write but not delete objects in gs://{bucket} "
                             f"(HTTP {response.status_code}); the output step replaces files")


def check_access(input_path: str | None, output_path: str | None, deadline: float | None = None,
                 policy: RetryPolicy | None = None, since_path: str | None = None) -> None:
    """Check whichever of input and output are on gs://; raises GcsAccessError on the first problem,
    or when the checks together take longer than ``deadline`` seconds (a credential lookup or token
    refresh retrying against an unreachable server must not hold the run)."""
    def check_since(path, retry_policy):
        check_input(path, retry_policy, "--since")

    checks = [(check, path) for check, path in ((check_input, input_path), (check_since, since_path),
                                                (check_output, output_path))
              if path and path.startswith("gs://")]
    if not checks:
        return
    policy = policy or RetryPolicy()
    if deadline is None:  # no answer at all within CHECK_DEADLINE; transient answers get the retry deadline
        deadline = CHECK_DEADLINE + 2 * policy.deadline
    failure: list[BaseException] = []

    def run_checks():
        try:
            for check, path in checks:
                check(path, policy)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run_checks, name="gcs-access-check", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise GcsAccessError(f"no answer from Google Cloud Storage ({endpoint()}) within {deadline:.0f} s "
                             "while checking --input/--since/--output access")
    if failure:
        raise failure[0]
