"""A loopback OAuth2 token endpoint (client credentials) and a proxy in front of the HAPI server
that lets through only requests with a live bearer token: HAPI itself has no authorization here."""
from __future__ import annotations

import base64
import contextlib
import http.server
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from runners import free_port


class Tokens:
    """Issued tokens and when they expire; ``static`` ones never do."""

    def __init__(self, lifetime: float = 3600.0, client_id: str = "converter", secret: str = "s3cret-client"):
        self.lifetime = lifetime
        self.client_id, self.secret = client_id, secret
        self.live: dict[str, float] = {}
        self.issued = 0
        self.refused = 0   # requests the proxy refused (401)
        self.lock = threading.Lock()

    def issue(self) -> str:
        token = "tok-" + secrets.token_hex(12)
        with self.lock:
            self.live[token] = time.time() + self.lifetime
            self.issued += 1
        return token

    def add_static(self, token: str) -> None:
        with self.lock:
            self.live[token] = float("inf")

    def valid(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self.lock:
            return self.live.get(header[7:], 0) > time.time()


def _serve(handler_class) -> tuple[http.server.ThreadingHTTPServer, str]:
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler_class)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def token_endpoint(tokens: Tokens):
    """Yields the token URL; answers client_credentials grants of the right client (HTTP basic)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
            expected = "Basic " + base64.b64encode(f"{tokens.client_id}:{tokens.secret}".encode()).decode()
            if form.get("grant_type") != ["client_credentials"] or self.headers.get("Authorization") != expected:
                self._answer(401, {"error": "invalid_client"})
                return
            self._answer(200, {"access_token": tokens.issue(), "token_type": "bearer",
                               "expires_in": tokens.lifetime, "scope": (form.get("scope") or [""])[0]})

        def _answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server, url = _serve(Handler)
    try:
        yield url + "/token"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def auth_proxy(upstream: str, tokens: Tokens):
    """Yields the proxy's base URL (``/fhir`` below it as upstream's); 401 without a live token."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            if not tokens.valid(self.headers.get("Authorization")):
                with tokens.lock:
                    tokens.refused += 1
                self._answer(401, b'{"resourceType":"OperationOutcome","issue":[{"severity":"error",'
                                  b'"code":"login","diagnostics":"no valid bearer token"}]}', {})
                return
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command, headers={
                k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept", "prefer")})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    status, headers, data = response.status, response.headers, response.read()
            except urllib.error.HTTPError as error:
                status, headers, data = error.code, error.headers, error.read()
            self._answer(status, data, {k: v for k, v in headers.items() if k.lower() in ("content-type", "location")})

        def _answer(self, status, data, headers):
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _forward

    server, url = _serve(Handler)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
