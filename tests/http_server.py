"""A real threaded HTTP server on 127.0.0.1 with scripted behaviours, for testing the crawler against hostile hosts.

Each path is routed to a behaviour: a function `(handler, hit)` that writes the whole response itself, where `hit`
counts the requests to that path (0 for the first). Factories below build the usual ones: a static body, a
status, a stall, a trickle, a short body, a huge Content-Length, an endless chunked body, a redirect, and
`sequence(...)` to answer differently per hit. Every request is logged with its time.

    with ScriptedServer() as server:
        server.route("/a.jpg", static(jpeg_bytes))
        server.route("/flaky.jpg", sequence(status(500), static(jpeg_bytes)))
        url = server.url("/a.jpg")
"""

from __future__ import annotations

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
        self.log: list[tuple[float, str]] = []
        self.closing = threading.Event()
        self._hits: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
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

            def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.closing = self.closing
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
    """Announce an enormous Content-Length, send a few bytes, then hold the connection open."""

    def behave(handler: BaseHTTPRequestHandler, hit: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(claimed))
        handler.end_headers()
        handler.wfile.write(b"\xff\xd8\xff" + b"\0" * 1000)
        handler.wfile.flush()
        _wait(handler, hold)
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
