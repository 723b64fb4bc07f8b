"""Credentials for a FHIR server: a bearer token (from a file, re-read when it changes, or from an
environment variable), or OAuth2 client credentials against a token endpoint as SMART Backend
Services does (``grant_type=client_credentials``; the client authenticates with its secret, HTTP
basic), the access token renewed before it expires and once more after a 401.

No token or secret ever appears in a repr, a message or an exception: messages name the endpoint
(without query or user info) and the HTTP status only.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from beam_pipeline.sources.dicomweb import safe_url
from beam_pipeline.sources.retry import RetryPolicy, requests_attempt, retrying

TOKEN_ENV = "FHIR_SERVER_TOKEN"          # a bearer token
CLIENT_SECRET_ENV = "FHIR_CLIENT_SECRET"  # the OAuth2 client's secret
RENEW_MARGIN = 60.0    # seconds before expiry a token is renewed (at most a fifth of its lifetime)
DEFAULT_LIFETIME = 300.0  # a token answer without expires_in: renewed after this many seconds


class AuthError(Exception):
    """Credentials that cannot be had (a missing file, a refused client); one line, no secret."""


@dataclass(frozen=True)
class Auth:
    """How to authenticate (pickled to the workers; secrets never shown in a repr). ``token_file``
    is read again on the worker when it changes (a token rotated by an agent on the host)."""

    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scope: str | None = None

    @property
    def kind(self) -> str:
        if self.token_url:
            return "client-credentials"
        return "bearer" if self.token or self.token_file else "none"

    @classmethod
    def from_options(cls, token_file=None, token_url=None, client_id=None, client_secret_file=None, scope=None,
                     environ=os.environ) -> "Auth":
        """The options' credentials; the token from ``token_file`` or $FHIR_SERVER_TOKEN, the client
        secret from ``client_secret_file`` or $FHIR_CLIENT_SECRET. ``AuthError`` for a contradiction."""
        env_token = environ.get(TOKEN_ENV) or None
        if token_url:
            if token_file or env_token:
                raise AuthError(f"give either a bearer token (--fhir-token-file or {TOKEN_ENV}) or "
                                "--fhir-token-url, not both")
            parts = urlsplit(token_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
                raise AuthError("--fhir-token-url must be an http(s) URL without credentials")
            if not client_id:
                raise AuthError("--fhir-token-url needs --fhir-client-id")
            secret = _read_secret(client_secret_file, "--fhir-client-secret-file") if client_secret_file \
                else environ.get(CLIENT_SECRET_ENV)
            if not secret:
                raise AuthError(f"--fhir-token-url needs the client's secret in --fhir-client-secret-file or "
                                f"{CLIENT_SECRET_ENV}")
            return cls(token_url=token_url, client_id=client_id, client_secret=secret, scope=scope)
        if client_id or client_secret_file or scope:
            raise AuthError("--fhir-client-id, --fhir-client-secret-file and --fhir-scope need --fhir-token-url")
        if token_file:
            if env_token:
                raise AuthError(f"give either --fhir-token-file or {TOKEN_ENV}, not both")
            return cls(token=_read_secret(token_file, "--fhir-token-file"), token_file=token_file)
        return cls(token=env_token)


def _read_secret(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.read().strip()
    except OSError as exc:
        raise AuthError(f"{option} {path}: {exc.strerror or type(exc).__name__}") from None
    if not value:
        raise AuthError(f"{option} {path} is empty")
    return value


class TokenSource:
    """The current ``Authorization`` header value for one worker, thread-safe: the static token
    (the file's newest), or an OAuth2 access token fetched and renewed before it expires."""

    def __init__(self, auth: Auth, session=None, policy: RetryPolicy | None = None, timeout: float = 30.0):
        self.auth = auth
        self.session = session
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._token = auth.token
        self._file_stamp = self._stamp()
        self._expires = 0.0
        self._renew_at = 0.0
        self.fetched = 0  # tokens fetched from the endpoint (for tests and the hostile pass)

    def _stamp(self):
        if not self.auth.token_file:
            return None
        try:
            info = os.stat(self.auth.token_file)
        except OSError:
            return None
        return info.st_size, info.st_mtime_ns

    def header(self) -> str | None:
        with self._lock:
            if self.auth.kind == "client-credentials":
                if self._token is None or time.time() >= self._renew_at:
                    self._fetch()
            elif self.auth.token_file:
                stamp = self._stamp()
                if stamp is not None and stamp != self._file_stamp:
                    try:
                        self._token = _read_secret(self.auth.token_file, "--fhir-token-file")
                        self._file_stamp = stamp
                    except AuthError:
                        pass  # being rewritten: keep the last token, read it again next time
            return f"Bearer {self._token}" if self._token else None

    def refused(self, sent: str | None) -> bool:
        """After a 401 for the header ``sent``: True when a different one may now be tried (the
        endpoint's token is dropped, the file is read again)."""
        with self._lock:
            if self.auth.kind == "client-credentials":
                if sent == (f"Bearer {self._token}" if self._token else None):
                    self._token = None
                return True
            if self.auth.token_file:
                self._file_stamp = None  # read the file again
                return True
            return False

    def _fetch(self) -> None:
        import requests

        session = self.session or requests.Session()
        data = {"grant_type": "client_credentials"}
        if self.auth.scope:
            data["scope"] = self.auth.scope
        where = f"the token endpoint {safe_url(self.auth.token_url)}"
        send = lambda: session.post(self.auth.token_url, data=data, auth=(self.auth.client_id, self.auth.client_secret),  # noqa: E731
                                    headers={"Accept": "application/json"}, timeout=self.timeout)
        response = retrying(requests_attempt(send, where), self.policy)
        if response.status_code != 200:
            raise AuthError(f"{where} answered HTTP {response.status_code}: the client's credentials or scope "
                            "were refused")
        try:
            body = response.json()
            token = body["access_token"]
            lifetime = float(body.get("expires_in") or DEFAULT_LIFETIME)
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"{where} answered without an access_token") from None
        now = time.time()
        self._token = str(token)
        self._expires = now + lifetime
        self._renew_at = now + lifetime - min(RENEW_MARGIN, lifetime / 5)
        self.fetched += 1
