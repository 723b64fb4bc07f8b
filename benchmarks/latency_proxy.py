"""A loopback HTTP proxy that adds a fixed delay to every request and counts requests and bytes.

Put in front of the GCS emulator it makes loopback behave like object storage at cloud latency:
what costs round trips shows up in the wall time. Used by ``run_benchmark`` case (e) and the gs://
tests.

    python -m benchmarks.latency_proxy --upstream http://127.0.0.1:9023 --delay-ms 20

prints its URL; GET <url>/_proxy/counts returns the counts so far (``?reset=1`` resets them).

One asyncio loop serves every client connection (HTTP/1.1 keep-alive, as a real endpoint does)
and forwards over kept-alive upstream connections, so the proxy costs little CPU per request: on a
two-core machine it shares a core with the emulator, and must not be what limits the benchmark.
Bodies are re-framed with Content-Length (chunked ones are joined).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
from urllib.parse import parse_qsl, urlencode, urlparse

CONTROL_PATH = "/_proxy/counts"
_LIST_PATH = re.compile(rb"^(/storage/v1/b/[^/?]+/o)(\?.*)?$")  # objects.list of the JSON API
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te",
               b"trailer", b"content-length"}
_NO_BODY_STATUSES = (204, 304)


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


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """First line and headers of a request or response; None at a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return lines[0], headers


def _header(headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


async def _read_body(reader: asyncio.StreamReader, headers, until_close: bool = False) -> bytes:
    if (_header(headers, b"transfer-encoding") or b"").lower().endswith(b"chunked"):
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = _header(headers, b"content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read() if until_close else b""


class _Upstream:
    """Kept-alive connections to the emulator, at most ``slots`` busy at a time."""

    def __init__(self, host: str, port: int, slots: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(slots)

    async def exchange(self, method: bytes, target: bytes, headers, body: bytes):
        async with self.slots:
            for attempt in range(2):  # a kept-alive connection the emulator closed: one new try
                reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
                try:
                    lines = [method + b" " + target + b" HTTP/1.1"]
                    lines += [k + b": " + v for k, v in headers if k not in _HOP_BY_HOP]
                    lines.append(b"Content-Length: " + str(len(body)).encode())
                    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
                    await writer.drain()
                    head = await _read_head(reader)
                    if head is None:
                        raise ConnectionResetError("upstream closed the connection")
                    status_line, response_headers = head
                    status = int(status_line.split(b" ", 2)[1])
                    closes = (status_line.startswith(b"HTTP/1.0")
                              or (_header(response_headers, b"connection") or b"").lower() == b"close")
                    no_length = (_header(response_headers, b"content-length") is None
                                 and _header(response_headers, b"transfer-encoding") is None)
                    if method == b"HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200:
                        data = b""
                    else:
                        data = await _read_body(reader, response_headers, until_close=no_length)
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()
                    if attempt:
                        raise
                    continue
                if closes or no_length:
                    writer.close()
                else:
                    self.idle.append((reader, writer))
                return status_line, response_headers, data
        raise AssertionError("unreachable")


class LatencyProxy:
    """``with LatencyProxy(upstream_url, delay_ms=20) as proxy: ... proxy.url ... proxy.counts``

    ``upstream_slots`` bounds the requests forwarded at once (the Python emulator serves one at a
    time with a small listen backlog); the delays of all requests overlap.
    """

    def __init__(self, upstream_url: str, delay_ms: float = 20.0, port: int = 0, upstream_slots: int = 4,
                 fault=None, throttle_above: int | None = None, list_page_size: int | None = None):
        parsed = urlparse(upstream_url)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.delay = delay_ms / 1000.0
        self.slots = upstream_slots
        self.port = port
        self.counts = Counts()
        # fault(method, target) -> None (forward), an HTTP status int to answer instead (with
        # Retry-After: 1 for 429/503), or "drop" to close the connection without an answer
        self.fault = fault
        # a throttling store: a request arriving while more than this many are in flight is
        # answered 429 (no Retry-After); ``arrivals`` keeps the number in flight at each arrival
        self.throttle_above = throttle_above
        self.in_flight = 0
        self.arrivals: list[int] = []
        self.throttled = 0
        self._writers: set = set()
        # The Python emulator answers a listing in one response; with a page size the proxy pages it
        # as GCS does (maxResults, nextPageToken), one delayed request per page, from one upstream
        # listing per query (kept until the proxy ends).
        self.list_page_size = list_page_size
        self._listings: dict[bytes, tuple[list, list]] = {}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="latency-proxy")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        upstream = _Upstream(self.upstream_host, self.upstream_port, self.slots)

        async def start():
            self._server = await asyncio.start_server(
                lambda r, w: self._serve(r, w, upstream), "127.0.0.1", self.port, backlog=1024)
            self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
            self._started.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: _Upstream) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                request_line, headers = head
                method, target, _ = request_line.split(b" ", 2)
                body = await _read_body(reader, headers)
                if target.startswith(CONTROL_PATH.encode()):
                    data = json.dumps(self.counts.snapshot()).encode()
                    if b"reset=1" in target:
                        self.counts.reset()
                    status_line, response_headers = b"HTTP/1.1 200 OK", [(b"content-type", b"application/json")]
                else:
                    self.in_flight += 1
                    self.arrivals.append(self.in_flight)
                    try:
                        await asyncio.sleep(self.delay)
                        injected = self.fault(method.decode(), target.decode("latin-1")) if self.fault else None
                        if self.throttle_above is not None and self.arrivals[-1] > self.throttle_above \
                                and injected is None:
                            self.throttled += 1
                            injected = "throttle"
                        if injected == "drop":
                            break
                        if injected == "throttle":
                            status_line, response_headers = b"HTTP/1.1 429 Too Many Requests", []
                            data = b'{"error": {"code": 429}}'
                        elif injected is not None:
                            status_line = b"HTTP/1.1 %d Injected" % injected
                            response_headers = [(b"retry-after", b"1")] if injected in (429, 503) else []
                            data = b'{"error": {"code": %d}}' % injected
                        elif self.list_page_size and method == b"GET" and _LIST_PATH.match(target):
                            status_line, response_headers, data = await self._list_page(upstream, target, headers)
                        else:
                            status_line, response_headers, data = await upstream.exchange(method, target, headers, body)
                    finally:
                        self.in_flight -= 1
                    self.counts.add(method.decode(), len(data))
                lines = [b"HTTP/1.1" + status_line[status_line.index(b" "):]]
                lines += [k + b": " + v for k, v in response_headers if k not in _HOP_BY_HOP]
                lines.append(b"Content-Length: " + str(len(data)).encode())
                writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if method == b"HEAD" else data))
                await writer.drain()
                if (_header(headers, b"connection") or b"").lower() == b"close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away or sent something unparseable: drop the connection
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _list_page(self, upstream: _Upstream, target: bytes, headers):
        match = _LIST_PATH.match(target)
        path, query = match.group(1), (match.group(2) or b"?")[1:]
        params = [(k, v) for k, v in parse_qsl(query.decode()) if k not in ("pageToken", "maxResults", "fields")]
        asked = dict(parse_qsl(query.decode()))
        key = path + b"?" + urlencode(sorted(params)).encode()
        if key not in self._listings:
            status_line, response_headers, data = await upstream.exchange(b"GET", key, headers, b"")
            if int(status_line.split(b" ", 2)[1]) != 200:
                return status_line, response_headers, data
            listing = json.loads(data)
            self._listings[key] = (listing.get("items") or [], listing.get("prefixes") or [])
        items, prefixes = self._listings[key]
        size = min(int(asked.get("maxResults", self.list_page_size)), self.list_page_size)
        offset = int(asked.get("pageToken", "0"))
        page = {"kind": "storage#objects", "items": items[offset:offset + size]}
        if offset == 0 and prefixes:
            page["prefixes"] = prefixes
        if offset + size < len(items):
            page["nextPageToken"] = str(offset + size)
        return b"HTTP/1.1 200 OK", [(b"content-type", b"application/json")], json.dumps(page).encode()

    def __enter__(self) -> "LatencyProxy":
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the latency proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            # kept-alive client connections: end them here (their handlers see the end and return),
            # not at interpreter exit with the loop gone
            for writer in list(self._writers):
                writer.transport.abort()
            served = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if served:
                await asyncio.wait(served, timeout=2)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the emulator")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--list-page-size", type=int, default=None,
                        help="page object listings as GCS does, this many objects a page (the emulator does not)")
    parser.add_argument("--upstream-slots", type=int, default=4,
                        help="requests forwarded at once (default 4, for the one-at-a-time Python emulator)")
    args = parser.parse_args()
    if urlparse(args.upstream).hostname not in ("127.0.0.1", "localhost"):
        parser.error("the upstream must be on loopback")
    with LatencyProxy(args.upstream, args.delay_ms, args.port, args.upstream_slots,
                      list_page_size=args.list_page_size) as proxy:
        print(proxy.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print(proxy.counts.snapshot())


if __name__ == "__main__":
    main()
