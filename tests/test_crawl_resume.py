"""Resume and crashes: re-runs finish the job without re-downloading, kill -9 and Ctrl-C lose nothing stored.

Waits on the crawl processes poll a condition with a generous limit against hangs, and fail at once, with the
process's output, if the process exits first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from crawl import manifest as mf
from crawl.crawler import LOCK_FILE, CrawlBusy, CrawlConfig, crawl
from tests import crawl_samples as samples
from tests.http_server import gated, sequence, stall, static, status

REPO = Path(__file__).resolve().parents[1]
HANG_LIMIT = 120.0  # seconds: a limit against hangs, never a speed check


def make_list(tmp_path: Path, server, n: int, latency: float = 0.0, extra: dict | None = None) -> Path:
    """A JD list of n distinct JPEGs (ids img0..), plus extra id -> url rows; labels alternate."""
    lines = []
    for k in range(n):
        url = server.route(f"/img/{k}.jpg", static(samples.jpeg(60, 40, seed=k), latency=latency))
        lines.append(f"img{k},{url},{k % 2},{(k + 1) % 2}")
    for item_id, url in (extra or {}).items():
        lines.append(f"{item_id},{url},0,1")
    path = tmp_path / "list.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(list_path: Path, out_dir: Path, **overrides) -> CrawlConfig:
    settings = dict(workers=8, timeout=2.0, retries=0, progress="off")
    settings.update(overrides)
    return CrawlConfig(list_path=list_path, out_dir=out_dir, **settings)


def assert_manifest_consistent(out_dir: Path) -> pd.DataFrame:
    """Every manifest row names a complete file whose sha256 matches."""
    manifest = pd.read_csv(out_dir / "manifest.csv", dtype=str, keep_default_na=False)
    for row in manifest.to_dict("records"):
        path = out_dir / row["path"]
        assert path.is_file(), row
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"], row
    return manifest


def test_rerun_downloads_nothing_and_writes_the_same_manifest(tmp_path, http_server):
    list_path = make_list(tmp_path, http_server, 12)
    out = tmp_path / "out"
    first = crawl(config(list_path, out))
    manifest = (out / "manifest.csv").read_bytes()
    assert first["stored"] == first["downloaded"] == 12
    second = crawl(config(list_path, out))
    assert second["downloaded"] == 0 and second["already_stored"] == 12
    assert all(http_server.hits(f"/img/{k}.jpg") == 1 for k in range(12))
    assert (out / "manifest.csv").read_bytes() == manifest


def test_rerun_retries_failures_and_replaces_damaged_or_missing_files(tmp_path, http_server):
    later = http_server.route("/later.jpg", sequence(status(404), static(samples.jpeg(seed=99))))
    list_path = make_list(tmp_path, http_server, 6, extra={"later": later})
    out = tmp_path / "out"
    crawl(config(list_path, out))
    failed = pd.read_csv(out / "failed.csv", dtype=str)
    assert list(failed["id"]) == ["later"] and failed["reason"][0] == "http_404"
    manifest = pd.read_csv(out / "manifest.csv", dtype=str).set_index("id")
    damaged, missing = out / manifest.loc["img1", "path"], out / manifest.loc["img2", "path"]
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")  # same size, different bytes
    missing.unlink()
    (out / "images" / ".leftover.123.tmp").write_bytes(b"partial")

    summary = crawl(config(list_path, out))
    assert summary["downloaded"] == 3 and summary["already_stored"] == 4 and summary["failed"] == 0
    assert [http_server.hits(f"/img/{k}.jpg") for k in range(6)] == [1, 2, 2, 1, 1, 1]
    assert http_server.hits("/later.jpg") == 2
    final = assert_manifest_consistent(out).set_index("id")
    assert list(final.index) == [f"img{k}" for k in range(6)] + ["later"]
    assert final.loc["img1", "sha256"] == manifest.loc["img1", "sha256"]  # the damaged file was restored
    assert pd.read_csv(out / "failed.csv").empty
    assert not (out / "images" / ".leftover.123.tmp").exists()


def test_files_missing_from_the_manifest_are_recognised_by_rehashing(tmp_path, http_server):
    list_path = make_list(tmp_path, http_server, 8)
    out = tmp_path / "out"
    crawl(config(list_path, out))
    manifest = (out / "manifest.csv").read_bytes()
    (out / "manifest.csv").unlink()  # as if killed after the renames but before the manifest write
    (out / "crawl.json").unlink()
    summary = crawl(config(list_path, out))
    assert summary["downloaded"] == 0 and summary["already_stored"] == 8
    assert (out / "manifest.csv").read_bytes() == manifest


def test_changing_max_side_downloads_again(tmp_path, http_server):
    list_path = make_list(tmp_path, http_server, 3)
    out = tmp_path / "out"
    crawl(config(list_path, out))
    summary = crawl(config(list_path, out, max_side=30))
    assert summary["downloaded"] == 3
    manifest = assert_manifest_consistent(out)
    assert set(manifest["width"]) == {"30"} and set(manifest["height"]) == {"20"}


def test_an_edited_url_is_downloaded_again(tmp_path, http_server):
    list_path = make_list(tmp_path, http_server, 3)
    out = tmp_path / "out"
    crawl(config(list_path, out))
    before = pd.read_csv(out / "manifest.csv", dtype=str).set_index("id")
    new_image = samples.jpeg(60, 40, seed=77)
    new_url = http_server.route("/moved/1.jpg", static(new_image))
    lines = list_path.read_text().splitlines()
    lines[1] = f"img1,{new_url},1,0"  # same id and labels, another URL
    list_path.write_text("\n".join(lines) + "\n")

    summary = crawl(config(list_path, out))
    assert summary["downloaded"] == 1 and summary["already_stored"] == 2
    assert [http_server.hits(f"/img/{k}.jpg") for k in range(3)] == [1, 1, 1] and http_server.hits("/moved/1.jpg") == 1
    after = assert_manifest_consistent(out).set_index("id")
    assert after.loc["img1", "url"] == new_url
    assert after.loc["img1", "sha256"] == hashlib.sha256(new_image).hexdigest() != before.loc["img1", "sha256"]
    assert after.loc["img1", "path"] != before.loc["img1", "path"]
    assert after.drop(index="img1").equals(before.drop(index="img1"))


def test_a_second_crawl_on_the_same_directory_is_refused(tmp_path, http_server):
    list_path = make_list(tmp_path, http_server, 1)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CrawlBusy, match="another crawl"):
            crawl(config(list_path, out))


def _default_sigint() -> None:
    """In the child before exec: SIGINT handled and unblocked, as a shell starts a command. A child inherits an
    ignored or blocked SIGINT from the test process; in a whole-suite run something before this module left the
    process so (a crawl started then never saw Ctrl-C), while alone the test passed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _start_crawl(list_path: Path, out_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "crawl", str(list_path), str(out_dir), "--workers", "4", "--timeout", "5",
         "--retries", "0", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_until(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    """Poll `condition` until it holds; fail if `process` exits first (showing its output) or after HANG_LIMIT."""
    pause = threading.Event()
    deadline = time.monotonic() + HANG_LIMIT
    while not condition():
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"waiting for {what}: the crawl exited with {process.returncode}\n{stdout}\n{stderr}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"waiting for {what}: not seen within {HANG_LIMIT:g} s")
        pause.wait(0.01)


def _stored_files(out_dir: Path) -> int:
    images = out_dir / "images"
    return len([p for p in images.iterdir() if not p.name.startswith(".")]) if images.is_dir() else 0


def _rows_on_record(out_dir: Path) -> int:
    """Stored rows on record (manifest.csv and the journal a running crawl appends to), 0 before the first."""
    return len(mf.read_stored_rows(out_dir))


def test_kill_9_at_any_moment_then_rerun_equals_an_uninterrupted_run(tmp_path, http_server):
    n = 40
    missing = http_server.route("/gone.jpg", status(404))
    # An id whose server answers only once the test opens the gate: until then no run can complete, so both kills
    # land while the crawl is running. The killed runs get a long --timeout, so the held request is not cut.
    gate = threading.Event()
    held = http_server.route("/gate.jpg", gated(gate, static(samples.jpeg(60, 40, seed=500))))
    list_path = make_list(tmp_path, http_server, n, latency=0.1, extra={"gone": missing, "gate": held})
    out = tmp_path / "out"
    hits_when_on_disk: dict[str, int] = {}  # file name -> requests for it when a kill left it on disk
    # Kill twice: once after the manifest was checkpointed with some rows, once during the resumed run.
    for kill_after, checkpoint in ((6, "0.05"), (20, "5")):
        process = _start_crawl(list_path, out, "--checkpoint-every", checkpoint, "--timeout", "60")
        _wait_until(lambda count=kill_after: _stored_files(out) >= count, process, f"{kill_after} stored files")
        if checkpoint == "0.05":
            _wait_until(lambda: _rows_on_record(out) >= 4, process, "4 rows on record before the kill")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=HANG_LIMIT) == -signal.SIGKILL
        process.communicate()
        assert json.loads((out / "crawl.json").read_text())["status"] == "running"  # killed mid-run
        on_disk = {p.name for p in (out / "images").iterdir() if not p.name.startswith(".")}
        hits = {k: http_server.hits(f"/img/{k}.jpg") for k in range(n)}
        for k in range(n):
            name = next((p for p in on_disk if p.startswith(f"img{k}-")), None)
            if name is not None:
                hits_when_on_disk.setdefault(name, hits[k])
        if (out / "manifest.csv").exists():
            assert_manifest_consistent(out)  # never a missing or partial file, whenever the kill came
    gate.set()
    process = _start_crawl(list_path, out)
    stdout, stderr = process.communicate(timeout=HANG_LIMIT)
    assert process.returncode == 0, stderr  # completed, even with a per-URL failure
    assert "crawl completed: stored 41 of 42" in stdout
    hits_after_resume = {k: http_server.hits(f"/img/{k}.jpg") for k in range(n)}

    reference = tmp_path / "reference"
    crawl(config(list_path, reference))
    assert (out / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()
    assert (out / "failed.csv").read_bytes() == (reference / "failed.csv").read_bytes()
    assert (out / "list.csv").read_bytes() == (reference / "list.csv").read_bytes()
    assert sorted(os.listdir(out / "images")) == sorted(os.listdir(reference / "images"))
    # A file that a kill left on disk is never downloaded again (an id in flight at a kill is requested again).
    manifest = pd.read_csv(out / "manifest.csv", dtype=str).set_index("id")
    assert len(hits_when_on_disk) >= 20
    for k in range(n):
        name = Path(manifest.loc[f"img{k}", "path"]).name
        if name in hits_when_on_disk:
            assert hits_after_resume[k] == hits_when_on_disk[name], k
    assert sum(hits_after_resume.values()) <= n + 2 * 4  # at most one worker pool's worth lost per kill


def test_kill_9_leaves_a_journal_of_stored_rows_that_the_rerun_trusts_and_compacts(tmp_path, http_server):
    n = 12
    gate = threading.Event()
    held = http_server.route("/gate.jpg", gated(gate, static(samples.jpeg(60, 40, seed=600))))
    list_path = make_list(tmp_path, http_server, n, extra={"gate": held})
    out = tmp_path / "out"
    process = _start_crawl(list_path, out, "--checkpoint-every", "0.05", "--timeout", "60")
    _wait_until(lambda: _rows_on_record(out) >= n, process, f"{n} rows on record")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=HANG_LIMIT) == -signal.SIGKILL
    process.communicate()

    # Each checkpoint appended only what was new: one header and one line per stored image, each naming its file.
    assert not (out / "manifest.csv").exists()
    lines = (out / mf.JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 1 + n and json.loads(lines[0])["format"] == "crawl manifest journal"
    journaled = mf.read_journal(out)
    assert sorted(row.id for row in journaled) == sorted(f"img{k}" for k in range(n))
    for row in journaled:
        assert hashlib.sha256((out / row.path).read_bytes()).hexdigest() == row.sha256
    with open(out / mf.JOURNAL_FILE, "ab") as handle:
        handle.write(b'["img0", "images/img0-')  # as if the kill had come in the middle of an append

    gate.set()
    summary = crawl(config(list_path, out))
    assert (summary["downloaded"], summary["already_stored"], summary["failed"]) == (1, n, 0)
    assert [http_server.hits(f"/img/{k}.jpg") for k in range(n)] == [1] * n
    assert not (out / mf.JOURNAL_FILE).exists()
    reference = tmp_path / "reference"
    crawl(config(list_path, reference))
    assert (out / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()


def test_ctrl_c_exits_130_records_what_is_stored_and_a_rerun_retries_the_rest(tmp_path, http_server):
    quick = {f"q{k}": http_server.route(f"/q/{k}.jpg", static(samples.jpeg(seed=k))) for k in range(8)}
    stalled = {f"s{k}": http_server.route(f"/s/{k}.jpg", stall()) for k in range(4)}
    list_path = tmp_path / "list.csv"
    list_path.write_text("".join(f"{i},{u}\n" for i, u in {**quick, **stalled}.items()))
    out = tmp_path / "out"
    process = _start_crawl(list_path, out, "--timeout", "60")
    _wait_until(lambda: _stored_files(out) >= 8, process, "8 stored files")

    def stalled_hits() -> int:
        return sum(http_server.hits(f"/s/{k}.jpg") for k in range(4))

    _wait_until(lambda: stalled_hits() == 4, process, "every worker hanging on a stalled host")
    process.send_signal(signal.SIGINT)
    # The stalled hosts hold for an hour and --timeout is 60 s: exiting within 45 s, interpreter shutdown
    # included, means the in-flight downloads were abandoned, not waited for (waiting would take 60 s at least).
    # 45 s, not less: a CI run of the whole suite on a busy machine once took more than 15 s here.
    try:
        _, stderr = process.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the crawl did not exit within 45 s of SIGINT: it waited for the stalled downloads")
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    manifest = assert_manifest_consistent(out)
    assert list(manifest["id"]) == list(quick)
    failed = pd.read_csv(out / "failed.csv", dtype=str)
    assert list(failed["id"]) == list(stalled) and set(failed["reason"]) == {"interrupted"}
    assert set(failed["attempts"]) == {"0"}
    summary = json.loads((out / "crawl.json").read_text())
    assert summary["status"] == "interrupted" and summary["stored"] == 8
    assert summary["failed_by_reason"] == {"interrupted": 4}

    # The hosts answer now: running the same command again retries exactly the interrupted ids.
    images = {item_id: samples.jpeg(seed=40 + k) for k, item_id in enumerate(stalled)}
    for k, item_id in enumerate(stalled):
        http_server.route(f"/s/{k}.jpg", static(images[item_id]))
    rerun = crawl(config(list_path, out))
    assert (rerun["status"], rerun["downloaded"], rerun["already_stored"], rerun["failed"]) == ("completed", 4, 8, 0)
    assert [http_server.hits(f"/q/{k}.jpg") for k in range(8)] == [1] * 8
    assert stalled_hits() == 8  # one more request each
    final = assert_manifest_consistent(out).set_index("id")
    assert list(final.index) == list(quick) + list(stalled)
    for item_id, data in images.items():
        assert final.loc[item_id, "sha256"] == hashlib.sha256(data).hexdigest()
    assert pd.read_csv(out / "failed.csv").empty
