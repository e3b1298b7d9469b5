"""The crawler against a real local server that behaves like hostile hosts: every failure gets its reason, in time."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from crawl.crawler import FAILURE_REASONS, CrawlConfig, crawl, safe_stem
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
    trickle,
)

TIMEOUT, DEADLINE, RETRIES, BACKOFF = 0.5, 1.0, 1, 0.1
GOOD = samples.jpeg(75, 50, seed=1)

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
}
EXPECTED_STORED = ["good", "flaky_500", "rate_limited", "stalled_first", "redirected", "dup_a", "dup_b"]


def _refused_url() -> str:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.jpg"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One crawl over a list mixing good images, every format, unsafe ids and every hostile behaviour."""
    server = ScriptedServer()
    r = server.route
    urls = {
        "good": r("/good.jpg", static(GOOD)),
        "flaky_500": r("/flaky.jpg", sequence(status(500), static(samples.jpeg(seed=2)))),
        "rate_limited": r("/429.jpg", sequence(status(429, {"Retry-After": "1"}), static(samples.jpeg(seed=3)))),
        "stalled_first": r("/stalled-first.jpg", sequence(stall(), static(samples.jpeg(seed=4)))),
        "redirected": r("/r1", redirect("/r2", 301)),
        "not_found": r("/missing.jpg", status(404)),
        "always_503": r("/503.jpg", status(503)),
        "trickling": r("/trickle.jpg", trickle(samples.jpeg(seed=5), interval=0.1)),
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
        "refused_port": _refused_url(),
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
    start = time.monotonic()
    summary = crawl(
        CrawlConfig(
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
    )
    elapsed = time.monotonic() - start
    yield {"server": server, "out": out_dir, "summary": summary, "elapsed": elapsed, "urls": urls, "root": root}
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


def test_mixed_list_finishes_within_retries_times_deadline(hostile):
    # Stalled, trickling and endless servers would each hold a worker forever; the bound is attempts x deadline
    # plus the backoff between them, plus a little for the rest of the list.
    bound = (RETRIES + 1) * DEADLINE + RETRIES * BACKOFF + 1.5
    assert hostile["elapsed"] < bound
    assert hostile["summary"]["status"] == "completed"


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
    assert summary["stored"] == len(manifest) and summary["failed"] == len(EXPECTED_FAILURES)
    assert summary["failed_by_reason"]["timeout"] == 3
    assert summary["bytes"] == sum((out / r["path"]).stat().st_size for r in manifest.values())
    assert summary["seconds"] > 0 and summary["images_per_second"] > 0


def test_byte_identical_images_are_grouped(hostile):
    groups = hostile["summary"]["duplicates"]
    assert ["good", "dup_a", "dup_b"] in groups
    assert all(len(g) >= 2 for g in groups)


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
    url = http_server.route("/t", trickle(b"x" * 1000, interval=0.2))
    fetcher = _fetcher(timeout=30.0, deadline=0.6, retries=0)
    start = time.monotonic()
    with pytest.raises(FetchFailed) as info:
        fetcher.get(url)
    assert info.value.reason == "timeout" and "deadline" in info.value.detail
    assert time.monotonic() - start < 0.6 + 0.3
    fetcher.close()


def _assert_cut_by_half_second_deadline(url: str) -> None:
    """A 30 s read timeout would let the response hold the worker; the 0.5 s attempt deadline must cut it."""
    fetcher = _fetcher(timeout=30.0, deadline=0.5, retries=0)
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="deadline"):
        fetcher.get(url)
    assert time.monotonic() - start < 0.5 + 0.3
    fetcher.close()


def test_deadline_cuts_a_stalled_response_despite_a_long_read_timeout(http_server):
    _assert_cut_by_half_second_deadline(http_server.route("/s", stall()))


def test_deadline_cuts_headers_sent_one_byte_at_a_time(http_server):
    def slow_headers(handler, hit):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"x" * 1000:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            if handler.server.closing.wait(0.05):
                break
        handler.close_connection = True

    _assert_cut_by_half_second_deadline(http_server.route("/h", slow_headers))


def test_huge_content_length_is_refused_before_reading(http_server):
    url = http_server.route("/big", huge_length(2_000_000_000, hold=10))
    fetcher = _fetcher(deadline=5.0)
    start = time.monotonic()
    with pytest.raises(FetchFailed) as info:
        fetcher.get(url)
    assert info.value.reason == "too_large" and "2000000000" in info.value.detail
    assert time.monotonic() - start < 0.5
    fetcher.close()


def test_body_without_length_is_cut_at_max_bytes(http_server):
    url = http_server.route("/endless", endless_chunked(b"\0" * 10_000))
    fetcher = _fetcher(max_bytes=200_000, deadline=5.0)
    with pytest.raises(FetchFailed) as info:
        fetcher.get(url)
    assert info.value.reason == "too_large" and "cut" in info.value.detail
    fetcher.close()


def test_retry_after_is_capped(http_server):
    url = http_server.route("/r", sequence(status(503, {"Retry-After": "3600"}), static(GOOD)))
    fetcher = _fetcher(retry_after_cap=0.3)
    start = time.monotonic()
    download = fetcher.get(url)
    assert download.data == GOOD and download.attempts == 2
    assert 0.3 <= time.monotonic() - start < 1.5
    fetcher.close()


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


def test_redirect_to_a_relative_location_and_a_final_url(http_server):
    http_server.route("/a", redirect("b/c"))
    http_server.route("/b/c", static(GOOD))
    fetcher = _fetcher()
    download = fetcher.get(http_server.url("/a"))
    assert download.data == GOOD and download.final_url == http_server.url("/b/c")
    fetcher.close()


def test_work_runs_concurrently(tmp_path, http_server):
    """16 images that each take 0.4 s to serve finish in about one latency with 16 workers, not sixteen."""
    slow = [http_server.route(f"/slow/{k}.jpg", static(samples.jpeg(seed=k), latency=0.4)) for k in range(16)]
    lines = [f"i{k},{url}" for k, url in enumerate(slow)]
    list_path = tmp_path / "l.csv"
    list_path.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    summary = crawl(CrawlConfig(list_path, tmp_path / "out", workers=16, timeout=5, progress="off"))
    assert summary["stored"] == 16
    assert time.monotonic() - start < 0.4 * 16 / 4


def test_progress_lines_when_not_a_terminal(tmp_path, http_server, capsys):
    lines = [f"i{k},{http_server.route(f'/p/{k}.jpg', static(samples.jpeg(seed=k), latency=0.05))}" for k in range(6)]
    list_path = tmp_path / "l.csv"
    list_path.write_text("\n".join(lines) + "\n")
    crawl(CrawlConfig(list_path, tmp_path / "out", workers=1, timeout=5, progress="lines", progress_every=0.1))
    captured = capsys.readouterr()
    assert "img/s" in captured.err and "/6 (" in captured.err
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith("crawl completed: stored 6 of 6") and "images/s" in last and "MB" in last
    assert os.path.exists(tmp_path / "out" / "crawl.json")


def test_progress_bar_on_a_terminal(tmp_path, http_server, capsys):
    lines = [f"i{k},{http_server.route(f'/b/{k}.jpg', static(samples.jpeg(seed=k)))}" for k in range(5)]
    list_path = tmp_path / "l.csv"
    list_path.write_text("\n".join(lines) + "\n")
    crawl(CrawlConfig(list_path, tmp_path / "out", workers=2, timeout=5, progress="bar"))
    err = capsys.readouterr().err
    assert "100%" in err and "5/5" in err and "img/s" in err and "stored 5 failed 0" in err
