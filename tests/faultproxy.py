"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the test S3 server, for tests and benchmarks
(never in the product path).

Clients are pointed at the proxy's endpoint; it forwards each request unchanged (the Host header
too, so signatures made for the proxy's address still verify) and, for the methods it is told to
disturb, draws one fault per request from a seeded generator: a connection reset (RST, nothing
answered), an HTTP 500 InternalError or 503 SlowDown, a truncated body (the headers promise the
whole object, half of it comes, then the connection closes), a latency spike, or a stall longer
than the client's read timeout. `counts` says what was injected.

A `Hold` freezes storage at one moment instead, for kill tests: the first request matching it is
held before anything reaches the server, or after half its body was forwarded (an upload cut off
mid-way), or answered in full; from then on every request waits. `held` is set at that moment, so
a test can kill the client there; on exit the held connections are dropped, never completed.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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


HOLD_PHASES = ("before", "partway", "after")


@dataclass(frozen=True)
class Hold:
    """Freeze storage at the first `method` request whose key path matches `path` (a regex, searched):
    `before` it reaches the server, `partway` (headers and half the body forwarded, then nothing),
    or `after` the server answered it."""

    method: str
    path: str
    phase: str = "before"

    def __post_init__(self) -> None:
        if self.phase not in HOLD_PHASES:
            raise ValueError(f"phase {self.phase!r} not in {HOLD_PHASES}")

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.path, path.split("?", 1)[0]) is not None


class FaultProxy:
    """`every`: instead of drawing, every `every`-th disturbed request gets the next fault kind of
    `faults` with a nonzero rate, in turn (counts that do not depend on thread timing, for tests)."""

    def __init__(self, upstream: str, faults: Faults = Faults(), *, seed: int = 0,
                 methods: tuple[str, ...] = ("GET",), every: int | None = None, hold: Hold | None = None) -> None:
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
        self.hold = hold
        self.held = threading.Event()  # storage is frozen at the hold's moment
        self.held_request: str | None = None
        self._released = threading.Event()
        self.cut_uploads: list[socket.socket] = []

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
        self._released.set()  # held requests end without reaching the server
        for sock in self.cut_uploads:  # the server sees the upload's connection drop
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def take_hold(self, method: str, path: str) -> bool:
        """Whether this request is the one to hold (at most one is)."""
        with self._lock:
            if self.hold is None or self.held_request is not None or not self.hold.matches(method, path):
                return False
            self.held_request = f"{method} {path}"
            return True

    def freeze(self) -> None:
        """Storage stops here: hold every later request until exit."""
        self.held.set()
        self._released.wait()

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
        if self.owner.held.is_set():  # frozen: nothing more reaches the server
            self.owner.freeze()
            self._reset()
            return
        holding = self.owner.take_hold(self.command, self.path)
        if holding and self.owner.hold.phase != "after":
            if self.owner.hold.phase == "partway":
                self._forward_partly(body or b"")
            self.owner.freeze()
            self._reset()
            return
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
        if holding:  # answered in full; the client may go on, storage does not
            self.wfile.flush()
            self.owner.freeze()

    def _forward_partly(self, body: bytes) -> None:
        """Send the request line, the headers (the whole length declared) and half the body to the
        server, as a client killed mid-upload leaves it; the socket closes when the hold ends."""
        head = [f"{self.command} {self.path} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in (*_HOP_BY_HOP, "expect")]
        sock = socket.create_connection(self.owner.upstream, timeout=60)
        self.owner.cut_uploads.append(sock)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body[: len(body) // 2])

    def _reset(self) -> None:
        """Close with a TCP reset, as a dropped connection looks to the client."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxyProcess:
    """The proxy in a process of its own (`python -m tests.faultproxy`), so that a benchmark measuring
    its own memory or CPU measures the client alone. `counts` and `requests` are read at exit."""

    def __init__(self, upstream: str, faults: Faults, *, seed: int = 0, methods: tuple[str, ...] = ("GET",)) -> None:
        self.args = {"upstream": upstream, "faults": dataclasses.asdict(faults), "seed": seed, "methods": methods}
        self.counts: Counter = Counter()
        self.requests = 0
        self.endpoint_url = ""
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> FaultProxyProcess:
        repo = Path(__file__).resolve().parents[1]
        self._process = subprocess.Popen([sys.executable, "-m", "tests.faultproxy", json.dumps(self.args)], cwd=repo,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint_url = self._process.stdout.readline().strip()
        if not self.endpoint_url.startswith("http://"):
            raise RuntimeError(f"the proxy process did not start (said {self.endpoint_url!r})")
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self._process.communicate(timeout=60)  # closing stdin stops it; it answers with its counts
        final = json.loads(out)
        self.counts, self.requests = Counter(final["counts"]), final["requests"]


def _serve(args: dict) -> None:
    """The process side of FaultProxyProcess: print the endpoint, serve until stdin closes, print counts."""
    faults = Faults(**args["faults"])
    with FaultProxy(args["upstream"], faults, seed=args["seed"], methods=tuple(args["methods"])) as proxy:
        print(proxy.endpoint_url, flush=True)
        sys.stdin.read()
    print(json.dumps({"counts": dict(proxy.counts), "requests": proxy.requests}), flush=True)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
