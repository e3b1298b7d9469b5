"""Download one URL defensively: http(s) only, bounded redirects, size, time and retries.

One `Fetcher` is shared by all worker threads. It holds a `requests.Session` whose connection pool is sized to
the number of workers, and a watchdog thread that enforces the per-attempt deadline: when an attempt runs past it,
the watchdog shuts down that attempt's socket, which wakes the blocked read at once. Socket timeouts alone cannot
do this (a server sending one byte per second never trips a 10 s read timeout), and checking the clock between
chunks would still wait out one full read timeout.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import itertools
import os
import random
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ALLOWED_SCHEMES = ("http", "https")
USER_AGENT = "crawl/1.0 (image dataset crawler; python-requests)"
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """Network limits for one download (see `python -m crawl --help`)."""

    timeout: float = 10.0  # connect and read (between bytes) timeout, seconds
    deadline: float = 30.0  # wall-clock limit of one attempt, seconds
    retries: int = 3  # further attempts after the first, for retryable failures
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    backoff: float = 0.5  # the n-th retry waits a random time up to backoff * 2**(n-1) ...
    backoff_cap: float = 30.0  # ... but never more than this
    retry_after_cap: float = 60.0  # a server's Retry-After is honoured up to this many seconds


@dataclass(frozen=True)
class Download:
    """A successful download: the body, the URL after redirects, its content type and the attempts it took."""

    data: bytes
    final_url: str
    content_type: str | None
    attempts: int


class FetchFailed(Exception):
    """The URL could not be downloaded; `reason` is one of crawl.crawler.FAILURE_REASONS."""

    def __init__(self, reason: str, detail: str, attempts: int):
        super().__init__(f"{reason}: {detail} (after {attempts} attempt(s))")
        self.reason = reason
        self.detail = detail
        self.attempts = attempts


class Interrupted(Exception):
    """The crawl is stopping (Ctrl-C); the download was abandoned."""


class _AttemptError(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------------------------
# Deadline watchdog


class _Attempt:
    """One download attempt as the watchdog sees it: its deadline and the pooled connection it is using."""

    __slots__ = ("deadline", "conn", "expired", "done")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.conn = None
        self.expired = False
        self.done = False


_current = threading.local()  # the attempt running on this thread, so the connection pool can bind connections


def _shutdown(conn) -> bool:
    sock = getattr(conn, "sock", None)
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    return True


class _Watchdog:
    """Cuts the connection of any attempt that outlives its deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Attempt]] = []
        self._active: set[_Attempt] = set()
        self._seq = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self, deadline: float) -> _Attempt:
        attempt = _Attempt(deadline)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="crawl-deadline-watchdog", daemon=True)
                self._thread.start()
            # Wake the watchdog only if this deadline comes first; attempts normally arrive in deadline order,
            # and a wake-up per download costs a thread switch.
            if not self._heap or deadline < self._heap[0][0]:
                self._cond.notify()
            heapq.heappush(self._heap, (deadline, next(self._seq), attempt))
            self._active.add(attempt)
        return attempt

    def finish(self, attempt: _Attempt) -> None:
        with self._cond:
            attempt.done = True
            attempt.conn = None
            self._active.discard(attempt)

    def bind(self, attempt: _Attempt, conn) -> None:
        with self._cond:
            if not attempt.done:
                attempt.conn = conn
                conn._crawl_attempt = attempt  # lets _put_conn unbind it when the pool takes it back
                conn._crawl_watchdog = self
                if attempt.expired:
                    _shutdown(conn)

    def unbind(self, conn) -> None:
        """The pool took `conn` back: from now on it may serve another attempt, so never cut it for this one."""
        with self._cond:
            attempt = getattr(conn, "_crawl_attempt", None)
            if attempt is not None and attempt.conn is conn:
                attempt.conn = None
            conn._crawl_attempt = None

    def abort_all(self) -> None:
        """Expire every running attempt now (Ctrl-C)."""
        with self._cond:
            for attempt in list(self._active):
                attempt.expired = True
                if attempt.conn is not None:
                    _shutdown(attempt.conn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    deadline, _, attempt = heapq.heappop(self._heap)
                    if attempt.done:
                        continue
                    attempt.expired = True
                    if attempt.conn is None or not _shutdown(attempt.conn):
                        # Still connecting (the connect timeout bounds that) or between redirects: look again soon.
                        heapq.heappush(self._heap, (now + 0.05, next(self._seq), attempt))
                        break
                wait = (self._heap[0][0] - now) if self._heap else None
                self._cond.wait(timeout=None if wait is None else max(wait, 0.001))


class _WatchedPoolMixin:
    """Connection pool that tells the watchdog which connection the current thread's attempt is using."""

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)
        attempt = getattr(_current, "attempt", None)
        watchdog = getattr(_current, "watchdog", None)
        if attempt is not None and watchdog is not None:
            watchdog.bind(attempt, conn)
        return conn

    def _put_conn(self, conn):
        if conn is not None:
            watchdog = getattr(conn, "_crawl_watchdog", None)
            if watchdog is not None:
                watchdog.unbind(conn)
        return super()._put_conn(conn)


class _WatchedHTTPPool(_WatchedPoolMixin, HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_WatchedPoolMixin, HTTPSConnectionPool):
    pass


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


# ---------------------------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None when absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _exception_chain(exc: BaseException):
    """Every exception reachable from `exc` (args, cause, context, urllib3's `reason`), each once, depth first."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None)):
            if isinstance(nxt, BaseException):
                stack.append(nxt)


def _root_message(exc: BaseException) -> str:
    """The most specific human message in an exception chain (e.g. 'Connection refused')."""
    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    return str(exc)[:300]


def _is_timeout(exc: BaseException) -> bool:
    for e in _exception_chain(exc):
        # urllib3's NewConnectionError (refused, unreachable) subclasses ConnectTimeoutError for history's sake.
        if isinstance(e, urllib3.exceptions.NewConnectionError):
            continue
        if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError, socket.timeout)):
            return True
    return False


class Fetcher:
    """Thread-safe downloader: `get(url)` returns a Download or raises FetchFailed / Interrupted."""

    def __init__(self, config: FetchConfig, pool_size: int, stop: threading.Event | None = None):
        self.config = config
        self.stop = stop or threading.Event()
        self._watchdog = _Watchdog()
        self.session = requests.Session()
        self.adapter = _WatchedAdapter(
            pool_connections=100, pool_maxsize=max(1, pool_size), max_retries=0, pool_block=False
        )
        self.session.mount("http://", self.adapter)
        self.session.mount("https://", self.adapter)
        # Requests go straight to the adapter (`_send`): a Session's per-request merging of settings, cookies and
        # hooks cost as much CPU as the rest of a download, and under the GIL that CPU is what limits 32 workers.
        # What the Session would add is set here once: default headers, proxies from the environment (honouring
        # no_proxy, per URL, only when some are set) and a CA bundle given there.
        self.headers = requests.utils.default_headers()
        self.headers["User-Agent"] = USER_AGENT
        self.headers["Accept"] = "image/*,*/*;q=0.8"
        self.use_proxies = bool(urllib.request.getproxies())
        self.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    def close(self) -> None:
        self._watchdog.close()
        self.session.close()

    def abort_all(self) -> None:
        """Stop: no new attempts, and cut the connections of the running ones."""
        self.stop.set()
        self._watchdog.abort_all()

    def get(self, url: str) -> Download:
        """Download `url` with retries; raise FetchFailed(reason, detail, attempts) when it cannot be done."""
        cfg = self.config
        last: _AttemptError | None = None
        attempts = 0
        for attempt in range(1, cfg.retries + 2):
            if self.stop.is_set():
                raise Interrupted()
            attempts = attempt
            try:
                data, final_url, content_type = self._attempt(url)
                return Download(data=data, final_url=final_url, content_type=content_type, attempts=attempts)
            except _AttemptError as err:
                if self.stop.is_set():
                    raise Interrupted() from None
                last = err
                if not err.retryable or attempt > cfg.retries:
                    break
                if self.stop.wait(self._delay(attempt, err.retry_after)):
                    raise Interrupted() from None
        assert last is not None
        raise FetchFailed(last.reason, last.detail, attempts)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        backoff = random.uniform(0.0, min(cfg.backoff_cap, cfg.backoff * 2 ** (attempt - 1)))  # full jitter
        if retry_after is not None:
            return max(min(retry_after, cfg.retry_after_cap), backoff)
        return backoff

    def _attempt(self, url: str) -> tuple[bytes, str, str | None]:
        attempt = self._watchdog.start(time.monotonic() + self.config.deadline)
        _current.attempt, _current.watchdog = attempt, self._watchdog
        try:
            return self._follow(url, attempt)
        except _AttemptError:
            if attempt.expired:
                raise self._deadline_error() from None
            raise
        except Exception as exc:
            raise self._classify(exc, attempt) from None
        finally:
            _current.attempt = None
            self._watchdog.finish(attempt)

    def _deadline_error(self) -> _AttemptError:
        return _AttemptError("timeout", f"attempt took longer than the {self.config.deadline:g} s deadline", True)

    def _classify(self, exc: Exception, attempt: _Attempt) -> _AttemptError:
        if attempt.expired:
            return self._deadline_error()
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return _AttemptError("timeout", f"no connection within {self.config.timeout:g} s", True)
        if _is_timeout(exc):
            return _AttemptError("timeout", f"no data for {self.config.timeout:g} s", True)
        if isinstance(exc, (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema)):
            return _AttemptError("bad_scheme", str(exc)[:300], False)
        if isinstance(exc, (requests.exceptions.InvalidURL, urllib3.exceptions.LocationParseError, UnicodeError)):
            return _AttemptError("bad_url", str(exc)[:300], False)
        if isinstance(exc, requests.exceptions.ContentDecodingError):
            return _AttemptError("corrupt", f"bad Content-Encoding: {_root_message(exc)}", False)
        if isinstance(exc, requests.exceptions.ChunkedEncodingError):
            return _AttemptError("incomplete", f"connection closed mid-body: {_root_message(exc)}", True)
        if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError, OSError)):
            return _AttemptError("connection", _root_message(exc), True)
        if isinstance(exc, ValueError):  # http.client refuses e.g. control characters in a URL
            return _AttemptError("bad_url", f"{type(exc).__name__}: {exc}"[:300], False)
        # Anything else is unexpected; record it against this URL rather than stop the whole crawl.
        return _AttemptError("connection", f"{type(exc).__name__}: {exc}"[:300], False)

    def _check(self, url: str) -> None:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise _AttemptError("bad_url", f"{url!r}: {exc}", False) from None
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            scheme = parts.scheme or "no"
            raise _AttemptError("bad_scheme", f"{scheme} scheme in {url[:200]!r} (only http/https)", False)
        if not parts.hostname:
            raise _AttemptError("bad_url", f"no host in {url[:200]!r}", False)

    def _follow(self, url: str, attempt: _Attempt) -> tuple[bytes, str, str | None]:
        cfg = self.config
        for _ in range(cfg.max_redirects + 1):  # the first request and up to max_redirects redirects
            self._check(url)
            if attempt.expired:
                raise self._deadline_error()
            response = self._send(url)
            try:
                status = response.status_code
                if status in REDIRECT_STATUSES and response.headers.get("location"):
                    url = urljoin(url, response.headers["location"])
                    continue
                if not 200 <= status < 300:
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    raise _AttemptError(
                        f"http_{status}",
                        f"HTTP {status} {response.reason or ''}".strip(),
                        status in RETRY_STATUSES,
                        retry_after if status in RETRY_STATUSES else None,
                    )
                return self._read_body(response, attempt), url, response.headers.get("content-type")
            finally:
                response.close()
        raise _AttemptError("redirects", f"more than {cfg.max_redirects} redirects (last to {url[:200]})", False)

    def _send(self, url: str) -> requests.Response:
        """One GET, streamed, no redirect followed (requests' exceptions, as Session.get would raise them)."""
        prepared = requests.PreparedRequest()
        prepared.prepare(method="GET", url=url, headers=self.headers)
        proxies = requests.utils.get_environ_proxies(url) if self.use_proxies else {}
        timeout = (self.config.timeout, self.config.timeout)
        # A CA bundle path costs requests a stat per request: pass it only where TLS will use it.
        verify = self.verify if url[:6].lower() == "https:" else True
        return self.adapter.send(prepared, stream=True, timeout=timeout, verify=verify, proxies=proxies)

    def _read_body(self, response: requests.Response, attempt: _Attempt) -> bytes:
        max_bytes = self.config.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = None
            if length is not None and length > max_bytes:
                raise _AttemptError("too_large", f"Content-Length {length} > --max-bytes {max_bytes}", False)
        body = bytearray()
        for chunk in response.iter_content(CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                raise _AttemptError("too_large", f"body longer than --max-bytes {max_bytes} (cut)", False)
            if attempt.expired:
                raise self._deadline_error()
        if attempt.expired:
            # The watchdog cut the socket: a body without Content-Length would look complete, but is not.
            raise self._deadline_error()
        return bytes(body)
