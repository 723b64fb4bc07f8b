"""A loopback HTTP proxy that adds a fixed delay to every request and counts requests and bytes.

Put in front of the GCS emulator it makes loopback behave like object storage at cloud latency:
what costs round trips shows up in the wall time. Used by ``run_benchmark`` case (e).

    python -m benchmarks.latency_proxy --upstream http://127.0.0.1:9023 --delay-ms 20

prints its URL; GET <url>/_proxy/counts returns the counts so far (``?reset=1`` resets them).
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

CONTROL_PATH = "/_proxy/counts"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
               "trailer", "content-length"}


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.response_bytes = 0
        self.by_method: dict[str, int] = {}

    def add(self, method: str, body_bytes: int) -> None:
        with self.lock:
            self.requests += 1
            self.response_bytes += body_bytes
            self.by_method[method] = self.by_method.get(method, 0) + 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "response_bytes": self.response_bytes,
                    "by_method": dict(self.by_method)}

    def reset(self) -> None:
        with self.lock:
            self.requests = self.response_bytes = 0
            self.by_method = {}


def _handler(upstream_host: str, upstream_port: int, delay: float, counts: Counts, upstream_slots: int):
    # The emulator serves one request at a time with a listen backlog of 5: more concurrent
    # connections than that overflow it (SYN retries of 1 s). The delay overlaps; the forwarding
    # waits for a slot.
    slots = threading.BoundedSemaphore(upstream_slots)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep client connections open, as a real endpoint does
        disable_nagle_algorithm = True  # else headers and body in two segments meet delayed ACKs: +40 ms
        wbufsize = -1  # buffered: a response leaves in one write at flush

        def log_message(self, format, *args):  # noqa: A002 - quiet
            pass

        def _forward(self):
            if self.path.startswith(CONTROL_PATH):
                return self._control()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            time.sleep(delay)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream = http.client.HTTPConnection(upstream_host, upstream_port, timeout=60)
            try:
                with slots:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.wfile.flush()
                counts.add(self.command, len(data))
            finally:
                upstream.close()

        def _control(self):
            """Counts as JSON (not counted themselves); ``/_proxy/counts?reset=1`` also resets them."""
            data = json.dumps(counts.snapshot()).encode()
            if "reset=1" in self.path:
                counts.reset()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops concurrent connects (1 s SYN retries)


class LatencyProxy:
    """``with LatencyProxy(upstream_url, delay_ms=20) as proxy: ... proxy.url ... proxy.counts``"""

    def __init__(self, upstream_url: str, delay_ms: float = 20.0, port: int = 0, upstream_slots: int = 4):
        parsed = urlparse(upstream_url)
        self.counts = Counts()
        self.server = _Server(
            ("127.0.0.1", port), _handler(parsed.hostname, parsed.port or 80, delay_ms / 1000.0, self.counts, upstream_slots))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LatencyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the emulator")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if urlparse(args.upstream).hostname not in ("127.0.0.1", "localhost"):
        parser.error("the upstream must be on loopback")
    with LatencyProxy(args.upstream, args.delay_ms, args.port) as proxy:
        print(proxy.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print(proxy.counts.snapshot())


if __name__ == "__main__":
    main()
