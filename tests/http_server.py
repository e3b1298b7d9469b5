"""A real threaded HTTP server on 127.0.0.1 with scripted behaviours, for testing the crawler against hostile hosts.

Each path is routed to a behaviour: a function `(handler, hit)` that writes the whole response itself, where `hit`
counts the requests to that path (0 for the first). Factories below build the usual ones: a static body, a
status, a stall, a trickle, a short body, a huge Content-Length, an endless chunked body, a redirect, and
`sequence(...)` to answer differently per hit, `gated(...)` to hold a request until the test opens a gate, and
`together(...)` to answer only once a given number of requests are in the server at the same time. Every request
is logged with the server's clock, and behaviours can leave notes (`notes(path)`) of what the client did, such as
hanging up before the body was sent.

    with ScriptedServer() as server:
        server.route("/a.jpg", static(jpeg_bytes))
        server.route("/flaky.jpg", sequence(status(500), static(jpeg_bytes)))
        url = server.url("/a.jpg")
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Behaviour = Callable[[BaseHTTPRequestHandler, int], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 makes concurrent connects wait for SYN retransmits
    allow_reuse_address = True


class ScriptedServer:
    """Threaded HTTP/1.1 server on a free 127.0.0.1 port; `route(path, behaviour)` scripts what a path does."""

    def __init__(self) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.log: list[tuple[float, str]] = []  # (time.monotonic() when the request arrived, path)
        self._notes: dict[str, list[str]] = defaultdict(list)
        self.closing = threading.Event()
        self._hits: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # http.server's naming
                path = self.path.split("?", 1)[0]
                with owner._lock:
                    hit = owner._hits[path]
                    owner._hits[path] += 1
                    owner.log.append((time.monotonic(), path))
                behaviour = owner.routes.get(path, status(404))
                try:
                    behaviour(self, hit)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    self.close_connection = True

            def log_message(self, format, *args) -> None:  # keep test output quiet
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.closing = self.closing
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def route(self, path: str, behaviour: Behaviour) -> str:
        """Script `path`; returns its URL."""
        self.routes[path] = behaviour
        return self.url(path)

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits.get(path, 0)

    def times(self, path: str) -> list[float]:
        with self._lock:
            return [t for t, p in self.log if p == path]

    def note(self, path: str, text: str) -> None:
        with self._lock:
            self._notes[path].append(text)

    def notes(self, path: str) -> list[str]:
        """What the behaviours of `path` recorded, one note per request that left one, in order."""
        with self._lock:
            return list(self._notes.get(path, []))

    def close(self) -> None:
        self.closing.set()  # wakes stalled and trickling behaviours
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait(handler: BaseHTTPRequestHandler, seconds: float) -> bool:
    """Sleep unless the server is closing; True if it is."""
    return handler.server.closing.wait(seconds)


def _path(handler: BaseHTTPRequestHandler) -> str:
    return handler.path.split("?", 1)[0]


def _note(handler: BaseHTTPRequestHandler, text: str) -> None:
    handler.server.owner.note(_path(handler), text)


def _hold(handler: BaseHTTPRequestHandler, seconds: float) -> str:
    """Keep the connection open for `seconds`, watching it; returns why the wait ended.

    "client closed" when the client hung up (EOF or reset), "server closing" when the server shuts down, "held"
    when the time ran out with the client still connected.
    """
    end = time.monotonic() + seconds
    sock = handler.connection
    while time.monotonic() < end:
        if handler.server.closing.is_set():
            return "server closing"
        try:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                return "client closed"
        except (ConnectionResetError, OSError):
            return "client closed"
        if readable:  # the client sent more bytes without hanging up: keep holding
            handler.server.closing.wait(0.05)
    return "held"


def static(
    body: bytes, content_type: str = "image/jpeg", code: int = 200, headers: dict | None = None, latency: float = 0.0
) -> Behaviour:
    """Answer with `body` and a correct Content-Length (keep-alive), after `latency` seconds."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        if latency and _wait(handler, latency):
            return
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(body)

    return behave


def status(code: int, headers: dict | None = None, body: bytes = b"") -> Behaviour:
    """An error or other status with an optional small body."""
    return static(body, content_type="text/plain", code=code, headers=headers)


def sequence(*behaviours: Behaviour) -> Behaviour:
    """The n-th request gets behaviours[n]; later ones get the last."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        behaviours[min(hit, len(behaviours) - 1)](handler, hit)

    return behave


def stall(seconds: float = 3600.0) -> Behaviour:
    """Accept and read the request, then send nothing for `seconds` and close."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        _wait(handler, seconds)
        handler.close_connection = True

    return behave


def trickle(body: bytes, interval: float, content_type: str = "image/jpeg") -> Behaviour:
    """Send headers with the true Content-Length, then the body one byte every `interval` seconds."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.flush()
        for k in range(len(body)):
            handler.wfile.write(body[k : k + 1])
            handler.wfile.flush()
            if _wait(handler, interval):
                break
        handler.close_connection = True

    return behave


def short_body(body: bytes, claimed: int, content_type: str = "image/jpeg") -> Behaviour:
    """Claim `claimed` bytes in Content-Length, send `body` (shorter), then close the connection."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(claimed))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()
        handler.close_connection = True

    return behave


def huge_length(claimed: int = 2_000_000_000, hold: float = 30.0) -> Behaviour:
    """Announce an enormous Content-Length, send a few bytes, then hold the connection open.

    Notes how the hold ended: "client closed" (the client hung up without waiting for the body), "held" or
    "server closing".
    """

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(claimed))
        handler.end_headers()
        handler.wfile.write(b"\xff\xd8\xff" + b"\0" * 1000)
        handler.wfile.flush()
        _note(handler, _hold(handler, hold))
        handler.close_connection = True

    return behave


def endless_chunked(chunk: bytes = b"\0" * 65536, interval: float = 0.0, content_type="image/jpeg") -> Behaviour:
    """A chunked body that never ends (until the client goes away or the server closes)."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        while not handler.server.closing.is_set():
            handler.wfile.write(frame)
            handler.wfile.flush()
            if interval and _wait(handler, interval):
                break
        handler.close_connection = True

    return behave


def redirect(location: str, code: int = 302) -> Behaviour:
    """Redirect to `location` (absolute or relative)."""
    return static(b"", content_type="text/plain", code=code, headers={"Location": location})


def gated(gate: threading.Event, behaviour: Behaviour) -> Behaviour:
    """Hold each request, sending nothing, until the test sets `gate` (or the server closes); then `behaviour`."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        while not gate.wait(0.05):
            if handler.server.closing.is_set():
                handler.close_connection = True
                return
        behaviour(handler, hit)

    return behave


def together(barrier: threading.Barrier, behaviour: Behaviour) -> Behaviour:
    """Answer with `behaviour` once `barrier.parties` requests (of every route sharing `barrier`) are in the server.

    Each request notes "together" when the barrier filled, or "alone" (and gets a 503) when the barrier's timeout
    passed first: a client that sends its requests one after the other never fills it.
    """

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            _note(handler, "alone")
            status(503)(handler, hit)
            return
        _note(handler, "together")
        behaviour(handler, hit)

    return behave
