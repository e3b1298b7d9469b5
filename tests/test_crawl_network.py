"""The crawler against a real local server that behaves like hostile hosts: every failure gets its reason.

Nothing here reads the test's clock to judge speed: the work is bounded by counting the requests the server saw
(attempts per id) and by the reasons and details recorded, and the few time facts (a retry waited at least the
Retry-After, retries are spread by jitter) come from the server's own request log. Waits on threads and processes
have a generous limit against hangs only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from crawl import fetch as fetch_module
from crawl.__main__ import main as crawl_main
from crawl.crawler import FAILURE_REASONS, CrawlConfig, crawl, format_summary, safe_stem
from crawl.fetch import FetchConfig, Fetcher, FetchFailed, parse_retry_after
from crawl.manifest import read_data_dir
from tests import crawl_samples as samples
from tests.http_server import (
    ScriptedServer,
    endless_chunked,
    huge_length,
    redirect,
    sequence,
    short_body,
    stall,
    static,
    status,
    together,
    trickle,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT, DEADLINE, RETRIES, BACKOFF = 0.5, 1.0, 1, 0.1
GOOD = samples.jpeg(75, 50, seed=1)
HANG_LIMIT = 120.0  # seconds; only a hang (an attempt nothing cuts) comes near it: a limit, never a speed check
UNRESOLVABLE = "no-such-host.invalid"  # RFC 6761: .invalid never resolves; a stub resolver answers it here

UNSAFE_IDS = ["../../x", "a/b", "a b", "a_b", "..", "/abs/path", "c:\\win\\f", "ü/é", "x" * 300, "."]

# id -> (expected failure reason, expected attempts); retryable failures use every attempt.
EXPECTED_FAILURES = {
    "not_found": ("http_404", 1),
    "always_503": ("http_503", RETRIES + 1),
    "trickling": ("timeout", RETRIES + 1),
    "endless_slow": ("timeout", RETRIES + 1),
    "stalled_always": ("timeout", RETRIES + 1),
    "short_body": ("incomplete", RETRIES + 1),
    "two_gigabytes": ("too_large", 1),
    "endless_fast": ("too_large", 1),
    "redirect_loop": ("redirects", 1),
    "redirect_to_file": ("bad_scheme", 1),
    "ftp": ("bad_scheme", 1),
    "html": ("not_image", 1),
    "empty": ("empty", 1),
    "truncated_jpeg": ("truncated", 1),
    "corrupt_jpeg": ("corrupt", 1),
    "bomb": ("too_many_pixels", 1),
    "refused_port": ("connection", RETRIES + 1),
    "unresolvable": ("connection", RETRIES + 1),
    "always_408": ("http_408", RETRIES + 1),
    "no_host": ("bad_url", 1),
    "unparsable": ("bad_url", 1),
}
EXPECTED_STORED = ["good", "flaky_500", "rate_limited", "stalled_first", "redirected", "once_408", "dup_a", "dup_b"]


def _run_or_fail(what: str, function: Callable[[], object], abort: Callable[[], None]):
    """`function()` on a thread, its result or exception passed on; past HANG_LIMIT, `abort()` and fail."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as exc:  # re-raised on the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_LIMIT)
    if thread.is_alive():
        abort()
        pytest.fail(f"{what} still running after {HANG_LIMIT:g} s: nothing cut a hanging download")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until true; fail naming `what` after HANG_LIMIT."""
    done = threading.Event()
    for _ in range(int(HANG_LIMIT / 0.01)):
        if condition():
            return
        done.wait(0.01)
    pytest.fail(f"{what}: not seen within {HANG_LIMIT:g} s")


def _get(fetcher: Fetcher, url: str):
    return _run_or_fail(f"get({url})", lambda: fetcher.get(url), fetcher.abort_all)


@pytest.fixture(scope="module")
def refused_url():
    """A URL on a 127.0.0.1 port held by a bound socket that never listens: every connection there is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/x.jpg"


def _stub_resolver(real: Callable, calls: list[str]) -> Callable:
    """getaddrinfo that answers names under .invalid with "does not resolve" itself (no DNS query leaves)."""

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.rstrip(".").endswith(".invalid"):
            calls.append(name)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    return getaddrinfo


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, refused_url):
    """One crawl over a list mixing good images, every format, unsafe ids and every hostile behaviour."""
    server = ScriptedServer()
    r = server.route
    urls = {
        "good": r("/good.jpg", static(GOOD)),
        "flaky_500": r("/flaky.jpg", sequence(status(500), static(samples.jpeg(seed=2)))),
        "once_408": r("/408-once.jpg", sequence(status(408), static(samples.jpeg(seed=7)))),
        "always_408": r("/408.jpg", status(408)),
        "rate_limited": r("/429.jpg", sequence(status(429, {"Retry-After": "1"}), static(samples.jpeg(seed=3)))),
        "stalled_first": r("/stalled-first.jpg", sequence(stall(), static(samples.jpeg(seed=4)))),
        "redirected": r("/r1", redirect("/r2", 301)),
        "not_found": r("/missing.jpg", status(404)),
        "always_503": r("/503.jpg", status(503)),
        "trickling": r("/trickle.jpg", trickle(samples.jpeg(seed=5), interval=0.05)),
        "endless_slow": r("/endless-slow", endless_chunked(b"\0" * 512, interval=0.05)),
        "stalled_always": r("/stall.jpg", stall()),
        "short_body": r("/short.jpg", short_body(GOOD[:500], claimed=len(GOOD))),
        "two_gigabytes": r("/2gb.jpg", huge_length(2_000_000_000)),
        "endless_fast": r("/endless-fast", endless_chunked()),
        "redirect_loop": r("/loop", redirect("/loop")),
        "redirect_to_file": r("/to-file", redirect("file:///etc/passwd")),
        "ftp": "ftp://127.0.0.1/image.jpg",
        "html": r("/page.jpg", static(samples.HTML, "text/html")),
        "empty": r("/empty.jpg", static(b"")),
        "truncated_jpeg": r("/truncated.jpg", static(samples.truncated_jpeg())),
        "corrupt_jpeg": r("/corrupt.jpg", static(samples.corrupt_jpeg())),
        "bomb": r("/bomb.png", static(samples.bomb_png(), "image/png")),
        "refused_port": refused_url,
        "unresolvable": f"http://{UNRESOLVABLE}/x.jpg",
        "no_host": "http:///x.jpg",
        "unparsable": "http://[::1/x.jpg",
        "dup_a": r("/dup-a.jpg", static(GOOD)),
        "dup_b": r("/dup-b.jpg", static(GOOD)),
    }
    r("/r2", redirect(server.url("/r3"), 307))
    r("/r3", static(samples.jpeg(seed=6)))
    for name, (factory, content_type, _, _) in samples.FORMATS.items():
        urls[f"format_{name}"] = r(f"/formats/{name}", static(factory(), content_type))
    for k, unsafe in enumerate(UNSAFE_IDS):
        urls[unsafe] = r(f"/unsafe/{k}.jpg", static(samples.jpeg(seed=100 + k)))

    root = tmp_path_factory.mktemp("hostile")
    list_path = root / "list.csv"
    frame = pd.DataFrame({"id": list(urls), "url": list(urls.values()), "sport": [k % 2 for k in range(len(urls))]})
    frame.to_csv(list_path, index=False)
    out_dir = root / "out"
    config = CrawlConfig(
        list_path=list_path,
        out_dir=out_dir,
        workers=16,
        timeout=TIMEOUT,
        deadline=DEADLINE,
        retries=RETRIES,
        backoff=BACKOFF,
        max_bytes=1_000_000,
        progress="off",
    )
    resolved: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", _stub_resolver(socket.getaddrinfo, resolved))
        summary = _run_or_fail("the hostile crawl", lambda: crawl(config), server.close)
    yield {"server": server, "out": out_dir, "summary": summary, "urls": urls, "root": root, "resolved": resolved}
    server.close()


def _failed(hostile) -> dict[str, dict]:
    frame = pd.read_csv(hostile["out"] / "failed.csv", dtype=str, keep_default_na=False)
    return {row["id"]: row for row in frame.to_dict("records")}


def _manifest(hostile) -> dict[str, dict]:
    frame = pd.read_csv(hostile["out"] / "manifest.csv", dtype=str, keep_default_na=False)
    return {row["id"]: row for row in frame.to_dict("records")}


@pytest.mark.parametrize("item_id", sorted(EXPECTED_FAILURES))
def test_each_hostile_behaviour_fails_with_its_reason(hostile, item_id):
    reason, attempts = EXPECTED_FAILURES[item_id]
    row = _failed(hostile)[item_id]
    assert (row["reason"], int(row["attempts"])) == (reason, attempts), row["detail"]
    assert row["url"] == hostile["urls"][item_id]
    assert row["reason"] in FAILURE_REASONS or row["reason"].startswith("http_")


def test_hanging_hosts_cost_a_bounded_number_of_cut_attempts(hostile):
    """Stalled, trickling and endless servers would each hold a worker forever: each gets RETRIES + 1 attempts,
    every one cut (by the deadline, as the trickles never go quiet for --timeout; by the read timeout for the
    stall), and the crawl completes."""
    server, failed = hostile["server"], _failed(hostile)
    assert hostile["summary"]["status"] == "completed"
    assert hostile["summary"]["stored"] + hostile["summary"]["failed"] == len(hostile["urls"])
    by_deadline, by_timeout = f"attempt took longer than the {DEADLINE:g} s deadline", f"no data for {TIMEOUT:g} s"
    cut = {
        "trickling": ("/trickle.jpg", {by_deadline}, DEADLINE),
        "endless_slow": ("/endless-slow", {by_deadline}, DEADLINE),
        "stalled_always": ("/stall.jpg", {by_timeout, by_deadline}, TIMEOUT),  # whichever fires first
    }
    for item_id, (path, details, limit) in cut.items():
        assert failed[item_id]["detail"] in details, item_id
        times = server.times(path)
        assert len(times) == RETRIES + 1, item_id
        # The server saw the retry only after the first attempt was held for about its limit (half of it here,
        # to allow for the time the first request took to arrive): attempts end by being cut, not at once.
        assert times[1] - times[0] >= limit / 2, (item_id, times)


def test_retries_happen_only_where_they_should(hostile):
    server = hostile["server"]
    assert server.hits("/flaky.jpg") == 2  # 500 then 200
    assert server.hits("/stalled-first.jpg") == 2  # stalled, then answered
    assert server.hits("/missing.jpg") == 1  # no retry on 404
    assert server.hits("/503.jpg") == RETRIES + 1
    assert server.hits("/short.jpg") == RETRIES + 1
    assert server.hits("/2gb.jpg") == 1
    assert server.hits("/loop") == 6  # the first request and 5 redirects
    assert server.hits("/page.jpg") == 1
    assert server.hits("/408-once.jpg") == 2  # 408 is retried like 429 and 5xx
    assert server.hits("/408.jpg") == RETRIES + 1


def test_unresolvable_host_is_a_connection_failure(hostile):
    row = _failed(hostile)["unresolvable"]
    assert row["detail"] == "Name or service not known"
    assert hostile["resolved"] == [UNRESOLVABLE] * (RETRIES + 1)  # asked once per attempt, answered by the stub


def test_url_without_a_host_or_unparsable_is_bad_url(hostile):
    failed = _failed(hostile)
    assert failed["no_host"]["detail"] == "no host in 'http:///x.jpg'"
    assert failed["unparsable"]["detail"] == "'http://[::1/x.jpg': Invalid IPv6 URL"


def test_retry_after_is_honoured(hostile):
    first, second = hostile["server"].times("/429.jpg")
    assert second - first >= 1.0


def test_stored_images_and_manifest(hostile):
    out = hostile["out"]
    manifest = _manifest(hostile)
    expected = EXPECTED_STORED + [f"format_{n}" for n in samples.FORMATS] + UNSAFE_IDS
    assert sorted(manifest) == sorted(expected)
    assert set(manifest).isdisjoint(_failed(hostile))
    data_dir = read_data_dir(out)
    assert data_dir.classes == ["sport"]
    assert list(data_dir.items["id"]) == list(hostile["urls"])  # list.csv keeps every id in input order
    assert data_dir.missing_ids == list(_failed(hostile))
    for item_id, row in manifest.items():
        path = out / row["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
        assert row["path"] == f"images/{safe_stem(item_id, row['url'])}{path.suffix}"
    # JPEGs that need no change are stored byte for byte.
    assert (out / manifest["good"]["path"]).read_bytes() == GOOD
    assert (out / manifest["format_progressive_jpeg"]["path"]).read_bytes() == samples.progressive_jpeg()
    rotated = manifest["format_exif_rotated_jpeg"]
    assert (rotated["width"], rotated["height"]) == ("40", "80")
    summary = json.loads((out / "crawl.json").read_text())
    assert summary == hostile["summary"]
    assert summary["stored"] == summary["downloaded"] == len(manifest) and summary["already_stored"] == 0
    assert summary["failed"] == len(EXPECTED_FAILURES)
    by_reason = Counter(reason for reason, _ in EXPECTED_FAILURES.values())
    assert list(summary["failed_by_reason"].items()) == sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    assert summary["bytes"] == summary["downloaded_bytes"]
    assert summary["bytes"] == sum((out / r["path"]).stat().st_size for r in manifest.values())
    # images_per_second comes from the unrounded seconds; `seconds` is rounded to 3 decimals.
    rate = summary["downloaded"] / summary["seconds"]
    assert summary["images_per_second"] == pytest.approx(rate, abs=0.005 + rate * 0.0006 / summary["seconds"])


def test_byte_identical_images_are_grouped(hostile):
    # The 16-bit PNG and the BMP hold the same picture, and both are converted to the same stored bytes.
    assert hostile["summary"]["duplicates"] == [["good", "dup_a", "dup_b"], ["format_rgb16_png", "format_bmp"]]
    assert hostile["summary"]["duplicate_groups"] == 2


def test_unsafe_ids_stay_inside_out_dir_and_do_not_collide(hostile):
    out = hostile["out"].resolve()
    manifest = _manifest(hostile)
    paths = [manifest[i]["path"] for i in UNSAFE_IDS]
    assert len(set(paths)) == len(paths)
    for rel in paths:
        resolved = (out / rel).resolve()
        assert resolved.parent == out / "images" and resolved.is_file()
        assert not Path(rel).name.startswith(".")
    # Nothing was written next to the output directory (where "../../x" would have pointed).
    assert sorted(p.name for p in hostile["root"].iterdir()) == ["list.csv", "out"]
    assert not list((out / "images").glob(".*"))  # no temporary files left


def test_stored_files_decode_with_tensorflow_and_opencv(hostile):
    """The contract for train/predict: tf.io.decode_image(channels=3) and cv2.imread give the recorded size."""
    tf = pytest.importorskip("tensorflow")
    out = hostile["out"]
    for item_id, row in _manifest(hostile).items():
        path = out / row["path"]
        size = (int(row["height"]), int(row["width"]), 3)
        decoded = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False).numpy()
        bgr = cv2.imread(str(path))
        assert decoded.shape == size, item_id
        assert bgr is not None and bgr.shape == size, item_id
        # Same pixels from both decoders (JPEG decoders may differ by rounding only).
        assert np.abs(decoded.astype(int) - bgr[:, :, ::-1].astype(int)).mean() < 2.0, item_id


# ---------------------------------------------------------------------------------------------------------------
# The downloader on its own


def _fetcher(**overrides) -> Fetcher:
    settings = dict(timeout=TIMEOUT, deadline=DEADLINE, retries=RETRIES, backoff=BACKOFF)
    settings.update(overrides)
    return Fetcher(FetchConfig(**settings), pool_size=8)


def test_pool_is_sized_to_the_workers(tmp_path):
    fetcher = Fetcher(FetchConfig(), pool_size=24)
    assert fetcher.session.get_adapter("http://x/")._pool_maxsize == 24
    assert fetcher.session.get_adapter("https://x/")._pool_maxsize == 24
    fetcher.close()


def test_deadline_cuts_a_trickle_despite_a_long_read_timeout(http_server):
    """A 30 s read timeout never trips on a byte every 0.2 s (the body would take hours): the deadline cuts each
    attempt, so the server sees the retry."""
    url = http_server.route("/t", trickle(b"x" * 100_000, interval=0.2))
    fetcher = _fetcher(timeout=30.0, deadline=0.6, retries=1, backoff=0.01)
    with pytest.raises(FetchFailed) as info:
        _get(fetcher, url)
    assert (info.value.reason, info.value.detail) == ("timeout", "attempt took longer than the 0.6 s deadline")
    assert info.value.attempts == 2 and http_server.hits("/t") == 2
    first, second = http_server.times("/t")
    assert second - first >= 0.3  # the first attempt was held for about its deadline before it was cut
    fetcher.close()


def _assert_cut_by_half_second_deadline(server: ScriptedServer, path: str) -> None:
    """A 30 s read timeout would let the response hold the worker; the 0.5 s attempt deadline must cut it."""
    fetcher = _fetcher(timeout=30.0, deadline=0.5, retries=1, backoff=0.01)
    with pytest.raises(FetchFailed) as info:
        _get(fetcher, server.url(path))
    assert (info.value.reason, info.value.detail) == ("timeout", "attempt took longer than the 0.5 s deadline")
    assert info.value.attempts == 2 and server.hits(path) == 2
    first, second = server.times(path)
    assert second - first >= 0.25
    fetcher.close()


def test_deadline_cuts_a_stalled_response_despite_a_long_read_timeout(http_server):
    http_server.route("/s", stall())
    _assert_cut_by_half_second_deadline(http_server, "/s")


def test_deadline_cuts_headers_sent_one_byte_at_a_time(http_server):
    def slow_headers(handler, hit):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"x" * 100_000:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            if handler.server.closing.wait(0.05):
                break
        handler.close_connection = True

    http_server.route("/h", slow_headers)
    _assert_cut_by_half_second_deadline(http_server, "/h")


def test_huge_content_length_is_refused_before_reading(http_server):
    """Refused from the header: no retry, and the client hangs up while the server still holds the body back."""
    url = http_server.route("/big", huge_length(2_000_000_000, hold=3600))
    fetcher = _fetcher(deadline=3600.0)
    with pytest.raises(FetchFailed) as info:
        _get(fetcher, url)
    assert (info.value.reason, info.value.attempts) == ("too_large", 1)
    assert info.value.detail == "Content-Length 2000000000 > --max-bytes 20000000"
    _wait_for(lambda: http_server.notes("/big") != [], "the server noticing the client hang up")
    assert http_server.notes("/big") == ["client closed"] and http_server.hits("/big") == 1
    fetcher.close()


def test_body_without_length_is_cut_at_max_bytes(http_server):
    url = http_server.route("/endless", endless_chunked(b"\0" * 10_000))
    fetcher = _fetcher(max_bytes=200_000, deadline=3600.0)
    with pytest.raises(FetchFailed) as info:
        _get(fetcher, url)
    assert (info.value.reason, info.value.attempts) == ("too_large", 1)
    assert info.value.detail == "body longer than --max-bytes 200000 (cut)"
    fetcher.close()


def test_retry_after_is_capped(http_server):
    """Retry-After: 3600 with a 0.3 s cap: the retry comes after at least the cap (by the server's clock), and
    does come (a 3600 s wait would end in the hang limit)."""
    url = http_server.route("/r", sequence(status(503, {"Retry-After": "3600"}), static(GOOD)))
    fetcher = _fetcher(retry_after_cap=0.3)
    download = _get(fetcher, url)
    assert download.data == GOOD and download.attempts == 2
    first, second = http_server.times("/r")
    assert second - first >= 0.3
    fetcher.close()


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


class _RecordingStop(threading.Event):
    """A stop event whose waits return at once, recording how long the fetcher asked to wait between attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def test_retry_after_is_honoured_up_to_60_seconds_by_default(http_server):
    url = http_server.route(
        "/ra", sequence(status(503, {"Retry-After": "3600"}), status(429, {"Retry-After": "7"}), static(GOOD))
    )
    stop = _RecordingStop()
    fetcher = Fetcher(FetchConfig(timeout=TIMEOUT), pool_size=2, stop=stop)  # default backoff, caps and retries
    download = _get(fetcher, url)
    assert download.data == GOOD and download.attempts == 3
    assert stop.waits == [60.0, 7.0]  # the backoff (at most 0.5 s, then 1 s) is below both
    fetcher.close()


def test_backoff_doubles_with_full_jitter_up_to_its_cap(http_server, monkeypatch):
    url = http_server.route("/503", status(503))
    bounds = [min(30.0, 0.5 * 2 ** (n - 1)) for n in range(1, 13)]  # 0.5, 1, 2, ... 16, then the 30 s cap
    draws: list[tuple[float, float]] = []
    real_uniform = fetch_module.random.uniform

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return real_uniform(low, high)

    monkeypatch.setattr(fetch_module.random, "uniform", uniform)
    stop = _RecordingStop()
    fetcher = Fetcher(FetchConfig(timeout=TIMEOUT, retries=12, backoff=0.5, backoff_cap=30.0), pool_size=2, stop=stop)
    with pytest.raises(FetchFailed) as info:
        _get(fetcher, url)
    assert (info.value.reason, info.value.attempts) == ("http_503", 13) and http_server.hits("/503") == 13
    assert draws == [(0.0, bound) for bound in bounds]  # full jitter: anywhere from 0 up to the doubling bound
    assert len(stop.waits) == 12 and len(set(stop.waits)) == 12
    assert all(0.0 <= wait <= bound for wait, bound in zip(stop.waits, bounds, strict=True))
    fetcher.close()


def test_retry_gaps_are_spread_by_jitter(tmp_path, http_server):
    """16 ids fail with 503 at once and retry once after a random wait of up to 0.5 s: by the server's clock the
    retries do not come in lockstep (without jitter the gaps would all be equal, within milliseconds)."""
    paths = [f"/busy/{k}.jpg" for k in range(16)]
    list_path = tmp_path / "l.csv"
    list_path.write_text("".join(f"i{k},{http_server.route(path, status(503))}\n" for k, path in enumerate(paths)))
    config = CrawlConfig(
        list_path=list_path, out_dir=tmp_path / "out", workers=16, timeout=5, retries=1, backoff=0.5, progress="off"
    )
    summary = _run_or_fail("the crawl", lambda: crawl(config), http_server.close)
    assert summary["failed_by_reason"] == {"http_503": 16}
    gaps = []
    for path in paths:
        first, second = http_server.times(path)
        gaps.append(second - first)
    assert max(gaps) - min(gaps) > 0.1, gaps


def test_redirect_to_a_relative_location_and_a_final_url(http_server):
    http_server.route("/a", redirect("b/c"))
    http_server.route("/b/c", static(GOOD))
    fetcher = _fetcher()
    download = fetcher.get(http_server.url("/a"))
    assert download.data == GOOD and download.final_url == http_server.url("/b/c")
    fetcher.close()


def test_work_runs_concurrently(tmp_path, http_server):
    """16 workers have 16 requests in the server at once: each is answered only when all 16 are there."""
    barrier = threading.Barrier(16, timeout=HANG_LIMIT)
    paths = [f"/slow/{k}.jpg" for k in range(16)]
    urls = [http_server.route(path, together(barrier, static(samples.jpeg(seed=k)))) for k, path in enumerate(paths)]
    list_path = tmp_path / "l.csv"
    list_path.write_text("".join(f"i{k},{url}\n" for k, url in enumerate(urls)))
    config = CrawlConfig(
        list_path=list_path, out_dir=tmp_path / "out", workers=16, timeout=HANG_LIMIT, retries=0, progress="off"
    )
    summary = _run_or_fail("the crawl", lambda: crawl(config), http_server.close)
    assert [http_server.notes(path) for path in paths] == [["together"]] * 16
    assert summary["stored"] == 16 and summary["failed"] == 0


def _mixed_list(tmp_path: Path, server: ScriptedServer) -> tuple[Path, list[str]]:
    """7 ids: 4 images, 2 not found, 1 HTML page; returns the list and the outcome of each id in order."""
    routes = [
        ("g0", static(samples.jpeg(seed=10)), "stored"),
        ("n0", status(404), "failed"),
        ("g1", static(samples.jpeg(seed=11)), "stored"),
        ("h0", static(samples.HTML, "text/html"), "failed"),
        ("g2", static(samples.jpeg(seed=12)), "stored"),
        ("n1", status(404), "failed"),
        ("g3", static(samples.jpeg(seed=13)), "stored"),
    ]
    list_path = tmp_path / "l.csv"
    list_path.write_text("".join(f"{i},{server.route(f'/m/{i}', behaviour)}\n" for i, behaviour, _ in routes))
    return list_path, [outcome for _, _, outcome in routes]


def test_lines_and_summary_when_not_a_terminal(tmp_path, http_server, capsys):
    """progress auto, stderr not a terminal: a line per update (every 0 s here), then the summary line, whose
    figures are crawl.json's and whose failure breakdown is by count, then name. Results that finish together are
    counted in one update, so a line may cover more than one id: the counts only grow, every line's stored/failed
    split is that of the list's first `done` ids (one worker takes them in order), and the last line is 7/7."""
    list_path, outcomes = _mixed_list(tmp_path, http_server)
    out = tmp_path / "out"
    crawl(
        CrawlConfig(
            list_path=list_path, out_dir=out, workers=1, timeout=5, retries=0, progress="auto", progress_every=0.0
        )
    )
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    done_per_line = [int(re.match(r"crawl: (\d+)/7 ", line).group(1)) for line in lines]
    assert done_per_line == sorted(done_per_line) and done_per_line[-1] == 7, lines
    for k, line in zip(done_per_line, lines, strict=True):
        stored = outcomes[:k].count("stored")
        expected = rf"crawl: {k}/7 \({100 * k / 7:.0f}%\) stored {stored} failed {k - stored}, [\d.]+ img/s, "
        assert re.fullmatch(expected + r"[\d.]+ MB, ETA (\d+s|\?)", line), line
    summary = json.loads((out / "crawl.json").read_text())
    assert captured.out.splitlines() == [format_summary(summary, out)]
    assert captured.out == (
        "crawl completed: stored 4 of 7 (4 downloaded, 0 already stored), failed 3 (http_404 2, not_image 1), "
        f"{summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s, {summary['images_per_second']:.1f} images/s"
        f" -> {out}\n"
    )


@pytest.mark.parametrize("rows_columns", [(24, 160), (0, 0)], ids=["24x160", "no-size"])
def test_auto_progress_draws_a_bar_on_a_terminal(tmp_path, http_server, rows_columns):
    """`python -m crawl` with stderr on a pseudo-terminal draws a tqdm bar (and no progress lines), also on a
    terminal that reports no size (a bar of a fixed width then)."""
    list_path, _ = _mixed_list(tmp_path, http_server)
    out = tmp_path / "out"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *rows_columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "crawl", str(list_path), str(out), "--workers", "2", "--retries", "0"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    terminal = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], HANG_LIMIT)
            if not ready:
                process.kill()
                pytest.fail(f"python -m crawl wrote nothing for {HANG_LIMIT:g} s")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the crawl closed the terminal's other end
                break
            if not chunk:
                break
            terminal += chunk
        stdout, _ = process.communicate(timeout=HANG_LIMIT)
    finally:
        os.close(master)
    text = terminal.decode("utf-8", "replace")
    assert process.returncode == 0, text
    # tqdm shows the rate as s/img when it is below one image a second.
    assert "100%|" in text and "7/7 [" in text and re.search(r"(img/s|s/img), stored 4 failed 3 0\.0 MB\]", text), text
    assert "crawl: 7/7 (" not in text  # the lines form is for pipes and files
    assert stdout.decode().startswith("crawl completed: stored 4 of 7 (4 downloaded, 0 already stored), failed 3")


def test_progress_bar_on_a_terminal(tmp_path, http_server, capsys):
    lines = [f"i{k},{http_server.route(f'/b/{k}.jpg', static(samples.jpeg(seed=k)))}" for k in range(5)]
    list_path = tmp_path / "l.csv"
    list_path.write_text("\n".join(lines) + "\n")
    crawl(CrawlConfig(list_path=list_path, out_dir=tmp_path / "out", workers=2, timeout=5, progress="bar"))
    err = capsys.readouterr().err
    assert "100%|" in err and "5/5 [" in err and re.search(r"(img/s|s/img), stored 5 failed 0 0\.0 MB\]", err), err


def test_deadline_defaults_to_three_times_the_timeout(tmp_path, http_server, capsys):
    """`--timeout 0.5` without `--deadline`: a body trickling a byte every 0.05 s is cut at 1.5 s."""
    url = http_server.route("/slow.jpg", trickle(b"x" * 100_000, interval=0.05))
    list_path = tmp_path / "l.csv"
    list_path.write_text(f"slow,{url}\n")
    out = tmp_path / "out"
    code = _run_or_fail(
        "python -m crawl",
        lambda: crawl_main([str(list_path), str(out), "--timeout", "0.5", "--retries", "0", "--workers", "1"]),
        http_server.close,
    )
    assert code == 0, capsys.readouterr().err
    failed = pd.read_csv(out / "failed.csv", dtype=str)
    assert failed.loc[0, "reason"] == "timeout"
    assert failed.loc[0, "detail"] == "attempt took longer than the 1.5 s deadline"
    assert json.loads((out / "crawl.json").read_text())["settings"]["deadline"] == pytest.approx(1.5)
