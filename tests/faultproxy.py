"""A fault-injecting HTTP proxy for S3 tests: forwards to moto's server, failing chosen requests on a schedule.

moto injects no faults by itself. Point s3fs's ``endpoint_url`` at ``FaultProxy.endpoint`` (path-style, since
the endpoint is an IP) and add rules: each rule sees every request (method, unquoted path with query) and may
answer it with a fault instead of forwarding it:

- ``"503"``: a real S3 ``SlowDown`` error document with status 503 (botocore and s3fs retry it);
- ``"reset"``: the connection is dropped before the request reaches moto;
- ``"reset_after"``: the request IS applied by moto, then the connection is dropped (the client never learns
  that its PUT landed: the nastiest case for idempotence);
- ``"403"``: ``AccessDenied`` (permanent; nobody should retry it).

Rules are deterministic (counters, not randomness), so a failing test fails the same way every time.
"""

from __future__ import annotations

import http.client
import json
import logging
import multiprocessing
import multiprocessing.process
import socket
import struct
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

Fault = str  # "503" | "reset" | "reset_after" | "403"
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}


class Rule:
    """Decides a request's fault (None: forward it). ``observe`` sees the status of every forwarded request."""

    def __call__(self, method: str, path: str) -> Fault | None:  # pragma: no cover - interface
        """The fault to inject for this request, or None to forward it."""

    def observe(self, method: str, path: str, status: int) -> None:
        """See the status of a forwarded request (rules that arm themselves on success override this)."""


class EveryNth(Rule):
    """Every n-th request of each method in ``methods`` (whose path ``when`` accepts) fails, cycling ``kinds``."""

    def __init__(
        self,
        n: int,
        *,
        methods: tuple[str, ...] = ("GET", "PUT"),
        kinds: tuple[Fault, ...] = ("503", "reset"),
        when: Callable[[str], bool] = lambda _path: True,
    ) -> None:
        self.n, self.methods, self.kinds, self.when = n, methods, kinds, when
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str) -> Fault | None:
        if method not in self.methods or not self.when(path):
            return None
        with self._lock:
            self.seen[method] += 1
            k = self.seen[method]
        if k % self.n:
            return None
        return self.kinds[(k // self.n - 1) % len(self.kinds)]


class Burst(Rule):
    """The first ``count`` requests matching ``method`` and ``when`` fail with ``kind`` (outlasting client retries)."""

    def __init__(self, method: str, when: Callable[[str], bool], count: int, kind: Fault = "503") -> None:
        self.method, self.when, self.left, self.kind = method, when, count, kind
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str) -> Fault | None:
        if method != self.method or not self.when(path):
            return None
        with self._lock:
            if self.left <= 0:
                return None
            self.left -= 1
        return self.kind


class DenyWritesAfter(Rule):
    """Once a request matching ``trigger`` has succeeded, every write under ``prefix`` gets 403 until ``heal()``."""

    def __init__(self, trigger: Callable[[str, str], bool], prefix: str) -> None:
        self.trigger, self.prefix = trigger, prefix
        self.armed = False

    def __call__(self, method: str, path: str) -> Fault | None:
        if self.armed and method in ("PUT", "POST", "DELETE") and path.startswith(self.prefix):
            return "403"
        return None

    def observe(self, method: str, path: str, status: int) -> None:
        if status < 300 and self.trigger(method, path):
            self.armed = True

    def heal(self) -> None:
        self.trigger = lambda _method, _path: False
        self.armed = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:  # noqa: ARG002 - socketserver's signature
        log.debug("proxy: connection from %s ended with an error", client_address)


CONTROL = "/__faultproxy__/"  # the proxy's own endpoints: state (counters as JSON), heal


class FaultProxy:
    """An HTTP server on 127.0.0.1 that forwards to ``upstream`` unless a rule injects a fault.

    It serves from a forked child process (the rules, closures included, are inherited, not pickled): delta-rs
    holds the GIL while it waits on the network, so a server thread in the test's process would never answer it.
    The counters (``requests``, ``by_path``, ``injected``, ``events``) and ``heal`` reach the child over HTTP.
    """

    def __init__(self, upstream: str, rules: list[Rule] | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = list(rules or [])
        self._requests: Counter[str] = Counter()  # by method
        self._by_path: Counter[tuple[str, str]] = Counter()  # by (method, unquoted path)
        self._injected: Counter[tuple[str, Fault]] = Counter()  # by (method, fault)
        self._events: list[tuple[str, str, Fault]] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self._child: multiprocessing.process.BaseProcess | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._child = multiprocessing.get_context("fork").Process(target=self._server.serve_forever, daemon=True)
        self._child.start()
        return self

    def stop(self) -> None:
        if self._child is not None:
            self._child.terminate()
            self._child.join(timeout=10)
        self._server.server_close()

    def _control(self, name: str) -> dict:
        with urllib.request.urlopen(self.endpoint + CONTROL + name, timeout=30) as resp:
            return json.loads(resp.read())

    def heal(self) -> None:
        """Lift every ``DenyWritesAfter`` rule (in the serving process)."""
        self._control("heal")

    @property
    def requests(self) -> Counter[str]:
        return Counter(self._control("state")["requests"])

    @property
    def by_path(self) -> Counter[tuple[str, str]]:
        return Counter({(m, p): n for m, p, n in self._control("state")["by_path"]})

    @property
    def injected(self) -> Counter[tuple[str, Fault]]:
        return Counter({(m, f): n for m, f, n in self._control("state")["injected"]})

    @property
    def events(self) -> list[tuple[str, str, Fault]]:
        return [tuple(e) for e in self._control("state")["events"]]  # type: ignore[misc]

    def state(self) -> bytes:
        """The counters as JSON (answered by the serving process)."""
        with self._lock:
            return json.dumps(
                {
                    "requests": dict(self._requests),
                    "by_path": [[m, p, n] for (m, p), n in self._by_path.items()],
                    "injected": [[m, f, n] for (m, f), n in self._injected.items()],
                    "events": self._events,
                }
            ).encode()

    def heal_rules(self) -> None:
        for rule in self.rules:
            if isinstance(rule, DenyWritesAfter):
                rule.heal()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def decide(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self._requests[method] += 1
            self._by_path[(method, path)] += 1
        for rule in self.rules:
            fault = rule(method, path)
            if fault is not None:
                with self._lock:
                    self._injected[(method, fault)] += 1
                    self._events.append((method, path, fault))
                return fault
        return None

    def observe(self, method: str, path: str, status: int) -> None:
        for rule in self.rules:
            rule.observe(method, path, status)

    def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            send = {k: v for k, v in headers if k.lower() not in _HOP and k.lower() != "content-length"}
            if body or method in ("PUT", "POST"):
                send["Content-Length"] = str(len(body))
            conn.request(method, path, body=body or None, headers=send)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("proxy: " + format, *args)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends a TCP RST, the way a broken load balancer or NAT drops a connection.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _error(self, fault: Fault) -> None:
        status, code, message = _ERRORS[fault]
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>fault-proxy</RequestId><HostId>fault-proxy</HostId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        path = unquote(self.path)
        if path.startswith(CONTROL):
            if path == CONTROL + "heal":
                proxy.heal_rules()
            data = proxy.state()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        fault = proxy.decide(self.command, path)
        if fault == "reset":
            self._reset()
            return
        if fault in _ERRORS:
            self._error(fault)
            return
        status, headers, data = proxy.forward(self.command, self.path, list(self.headers.items()), body)
        proxy.observe(self.command, path, status)
        if fault == "reset_after":
            self._reset()
            return
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() not in ("content-length", "date", "server"):
                self.send_header(k, v)
        # HEAD answers carry the object's length and no body.
        length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
