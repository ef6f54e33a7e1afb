"""A faulty HTTP proxy in front of the S3 server, to test storage under the failures spot nodes see.

    proxy = FaultyProxy(upstream="http://127.0.0.1:5000").start()   # proxy.url is the endpoint
    proxy.fail("PUT", count=2, status=503)    # the next 2 PUTs answer 503 SlowDown-style errors
    proxy.delay("GET", count=1, seconds=3)    # the next GET stalls (read timeout on the client)
    proxy.drop("PUT", count=1)                # the next PUT's connection closes without a reply
    proxy.down()  ... proxy.up()              # everything answers 503 until up() is called
    proxy.stop()

Rules match a method ("PUT", "GET", "HEAD", "DELETE", "POST" or "*") and are used up in the
order they were added. `proxy.log` lists (method, path, outcome) for every request seen.
Requests are forwarded byte for byte, Host header included, so SigV4 signatures stay valid.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "expect", "te"}
_SET_BY_US = {"content-length", "server", "date"}
_ERROR_CODES = {500: "InternalError", 503: "ServiceUnavailable"}


@dataclass
class _Rule:
    method: str
    kind: str  # fail | delay | drop
    count: int
    status: int = 503
    seconds: float = 0.0


class FaultyProxy:
    """Forwards HTTP to `upstream`, injecting the faults it was told to."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlparse(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._rules: list[_Rule] = []
        self._down = False
        self._lock = threading.Lock()
        self.log: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str = "*", count: int = 1, status: int = 503) -> None:
        self._add(_Rule(method.upper(), "fail", count, status=status))

    def delay(self, method: str = "*", count: int = 1, seconds: float = 2.0) -> None:
        self._add(_Rule(method.upper(), "delay", count, seconds=seconds))

    def drop(self, method: str = "*", count: int = 1) -> None:
        self._add(_Rule(method.upper(), "drop", count))

    def down(self) -> None:
        self._down = True

    def up(self) -> None:
        self._down = False

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
        self._down = False

    def outcomes(self, outcome: str, method: str = "*") -> int:
        """How many requests (of `method`) ended with `outcome` (forwarded, fail-503, delay, drop, down)."""
        return sum(1 for m, _, o in self.log if o == outcome and method in ("*", m))

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _take(self, method: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.method in ("*", method) and rule.count > 0:
                    rule.count -= 1
                    return rule
        return None


class _Handler(BaseHTTPRequestHandler):
    owner: FaultyProxy
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue handled for the client

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr noise
        pass

    def _handle(self) -> None:
        body = self._read_body()
        owner, method = self.owner, self.command
        if owner._down:
            owner.log.append((method, self.path, "down"))
            return self._error(503)
        rule = owner._take(method)
        if rule is not None and rule.kind == "fail":
            owner.log.append((method, self.path, f"fail-{rule.status}"))
            return self._error(rule.status)
        if rule is not None and rule.kind == "drop":
            owner.log.append((method, self.path, "drop"))
            self.close_connection = True
            self.connection.close()
            return None
        if rule is not None and rule.kind == "delay":
            owner.log.append((method, self.path, "delay"))
            time.sleep(rule.seconds)
        else:
            owner.log.append((method, self.path, "forwarded"))
        self._forward(body)
        return None

    def _safely(self) -> None:
        try:
            self._handle()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (read timeout) before we answered

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safely

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _error(self, status: int) -> None:
        code = _ERROR_CODES.get(status, "InternalError")
        body = f"<Error><Code>{code}</Code><Message>injected by FaultyProxy</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in _HOP_BY_HOP | _SET_BY_US:
                    self.send_header(name, value)
            # HEAD keeps the upstream Content-Length (size of the object), with no body.
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()
