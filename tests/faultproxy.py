"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the test S3 server, for tests and benchmarks
(never in the product path).

Clients are pointed at the proxy's endpoint; it forwards each request unchanged (the Host header
too, so signatures made for the proxy's address still verify) and, for the methods it is told to
disturb, draws one fault per request from a seeded generator: a connection reset (RST, nothing
answered), an HTTP 500 InternalError or 503 SlowDown, a truncated body (the headers promise the
whole object, half of it comes, then the connection closes), a latency spike, or a stall longer
than the client's read timeout. `counts` says what was injected.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("reset", "error_500", "slowdown_503", "truncate", "latency", "stall")
_S3_ERROR = {"error_500": (500, "InternalError", "We encountered an internal error. Please try again."),
             "slowdown_503": (503, "SlowDown", "Please reduce your request rate.")}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass(frozen=True)
class Faults:
    """The probability of each fault per disturbed request (they add up to at most 1)."""

    reset: float = 0.0
    error_500: float = 0.0
    slowdown_503: float = 0.0
    truncate: float = 0.0
    latency: float = 0.0
    stall: float = 0.0
    latency_s: float = 0.3
    stall_s: float = 5.0  # longer than the client's read timeout

    def draw(self, rng: random.Random) -> str | None:
        x, edge = rng.random(), 0.0
        for kind in KINDS:
            edge += getattr(self, kind)
            if x < edge:
                return kind
        return None


class FaultProxy:
    """`every`: instead of drawing, every `every`-th disturbed request gets the next fault kind of
    `faults` with a nonzero rate, in turn (counts that do not depend on thread timing, for tests)."""

    def __init__(self, upstream: str, faults: Faults, *, seed: int = 0, methods: tuple[str, ...] = ("GET",),
                 every: int | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults, self.methods = faults, methods
        self.counts: Counter = Counter()
        self.requests = 0
        self.every = every
        self._disturbed = 0
        self._cycle = [kind for kind in KINDS if getattr(faults, kind) > 0]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def draw(self, method: str) -> str | None:
        with self._lock:
            self.requests += 1
            if method not in self.methods:
                return None
            if self.every:
                self._disturbed += 1
                turn, due = divmod(self._disturbed, self.every)
                kind = self._cycle[(turn - 1) % len(self._cycle)] if due == 0 and self._cycle else None
            else:
                kind = self.faults.draw(self._rng)
            if kind:
                self.counts[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        kind = self.owner.draw(self.command)
        if kind == "reset":
            self._reset()
            return
        if kind == "stall":
            time.sleep(self.owner.faults.stall_s)
            self._reset()
            return
        if kind in _S3_ERROR:
            status, code, message = _S3_ERROR[kind]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                       f"</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if kind == "latency":
            time.sleep(self.owner.faults.latency_s)
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            declared = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
            self.send_header("Content-Length", declared or "0")
            self.end_headers()
            if self.command == "HEAD":
                return
            if kind == "truncate" and len(payload) > 1:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(payload)
        finally:
            upstream.close()

    def _reset(self) -> None:
        """Close with a TCP reset, as a dropped connection looks to the client."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
