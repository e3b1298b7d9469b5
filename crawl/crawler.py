"""The crawl stage: download a validated URL list (or read local files) concurrently into a resumable DATA_DIR.

`crawl(CrawlConfig)` parses the list (nothing is downloaded unless the whole list is valid), writes list.csv and
classes.txt, then runs worker threads that each verify-or-fetch one id at a time. Files are written under a
temporary name and renamed; every few seconds the rows stored since the last checkpoint are appended to the
manifest journal, and manifest.csv is written once, at the end. A crawl killed at any moment and started again ends
with the same manifest as an uninterrupted one: files that are on disk but on no record are recognised by their
name (derived from id and URL) and re-hashed.

With `root`, list rows that are not http(s) URLs are file paths read under that folder (crawl.local); a folder of
class sub-folders given as the list is read as a labelled list of its files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from crawl import manifest as mf
from crawl.fetch import FetchConfig, Fetcher, FetchFailed, Interrupted
from crawl.images import ImageRejected, configure_pil, process_image, verify_stored
from crawl.listfile import ListError, ListItem, ParsedList, parse_list
from crawl.local import STRAY_REASON, LocalSource, has_scheme, is_http, list_class_folders, store_unchanged

# The `reason` column of failed.csv. `http_<status>` stands for one reason per HTTP status (http_404, http_503...).
# Retryable failures (connection, timeout, incomplete, 408, 429, 5xx) are reported with the reason of the last
# attempt, once every retry has failed; the others are reported at once. The README copies this table.
FAILURE_REASONS: dict[str, str] = {
    "http_<status>": "the server answered with this HTTP status (4xx at once; 408, 429 and 5xx after the retries)",
    "timeout": "no connection or no data within --timeout, or the attempt ran past --deadline",
    "connection": "connection refused or reset, or the host name does not resolve",
    "incomplete": "the body was shorter than its Content-Length (the connection closed early)",
    "too_large": "Content-Length above --max-bytes (refused unread), or a body without length cut at --max-bytes",
    "redirects": "more than 5 redirects (a redirect loop, for instance)",
    "bad_scheme": "the URL, or a redirect, is not http/https (ftp://, file://, ...)",
    "bad_url": "the URL cannot be parsed or has no host",
    "bad_path": "with --root: the path is missing, not a regular file, or resolves outside the root (links included)",
    "stray_file": "a folder crawl: a file directly in the folder or below a class sub-folder (not an item)",
    "empty": "the server answered with an empty body",
    "not_image": "the bytes are not an image: an HTML page, text, or a format we do not read",
    "corrupt": "the bytes start like an image but do not decode (or use a colour mode that cannot be converted)",
    "truncated": "the image data stops early: a JPEG without its end marker, a cut PNG",
    "too_many_pixels": "width x height read from the header is above --max-pixels (the image is never decoded)",
    "interrupted": "the run was stopped (Ctrl-C) before this id was done; running the command again retries it",
}

LOCK_FILE = ".crawl.lock"
_json_string = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str (ensure_ascii)
_SLUG_RE = re.compile(r"[^A-Za-z0-9_-]+")  # no dots, no slashes: a slug can never be '..' or a hidden file


@dataclass(frozen=True, kw_only=True)
class CrawlConfig:
    """Settings of one crawl (the CLI flags of `python -m crawl`)."""

    list_path: Path  # a list file, or a folder of class sub-folders
    out_dir: Path
    classes_path: Path | None = None
    root: Path | None = None  # list rows that are not http(s) are paths under this folder
    # 128: against hosts 100-300 ms away, 64 workers reached 63-84% of their latency floor and 128 up to 34% more
    # images/s (at 200-300 ms); 256 gained nothing on 2 cores (BENCHMARKS.md, `python -m bench.crawl_peer --sweep`).
    workers: int = 128
    timeout: float = 10.0
    deadline: float | None = None  # None: three times `timeout`
    retries: int = 3
    max_bytes: int = 20_000_000
    max_pixels: int = 50_000_000
    max_side: int = 0  # 0 keeps the original size
    backoff: float = 0.5  # first retry waits up to this many seconds (random), doubling each retry
    progress: str = "auto"  # "auto" (bar on a terminal, lines otherwise), "bar", "lines" or "off" (also no summary)
    progress_every: float = 5.0  # seconds between progress lines
    checkpoint_every: float = 5.0  # seconds between manifest rewrites during the crawl

    @property
    def attempt_deadline(self) -> float:
        return self.deadline if self.deadline is not None else 3.0 * self.timeout

    def validate(self) -> None:
        """Raise ConfigError naming the first setting out of range."""
        checks = [
            (self.workers >= 1, "--workers must be at least 1"),
            (self.timeout > 0, "--timeout must be positive"),
            (self.attempt_deadline > 0, "--deadline must be positive"),
            (self.retries >= 0, "--retries must be 0 or more"),
            (self.max_bytes >= 1, "--max-bytes must be positive"),
            (self.max_pixels >= 1, "--max-pixels must be positive"),
            (self.max_side >= 0, "--max-side must be 0 (keep) or positive"),
            (self.checkpoint_every > 0, "--checkpoint-every must be positive"),
            (self.progress in ("auto", "bar", "lines", "off"), "progress must be auto, bar, lines or off"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.root is not None and not Path(self.root).is_dir():
            raise ConfigError(f"--root {self.root}: not a directory")
        if self.is_folder:
            if self.root is not None:
                raise ConfigError(f"{self.list_path} is a folder: it is the root itself, so --root is not used")
            if self.classes_path is not None:
                raise ConfigError(f"{self.list_path} is a folder: the sub-folders are the classes, no --classes")
            folder, out = os.path.realpath(self.list_path), os.path.realpath(self.out_dir)
            if out == folder or out.startswith(folder.rstrip(os.sep) + os.sep):
                raise ConfigError(f"OUT_DIR {self.out_dir} is inside the image folder {self.list_path}")

    @property
    def is_folder(self) -> bool:
        """The list is a folder of class sub-folders."""
        return Path(self.list_path).is_dir()

    @property
    def source_root(self) -> Path | None:
        """The folder local paths are read under: --root, or the folder of a folder crawl."""
        return Path(self.list_path) if self.is_folder else self.root


class ConfigError(ValueError):
    """A setting is out of range (exit status 2 from the CLI)."""


class CrawlBusy(RuntimeError):
    """Another crawl holds OUT_DIR's lock."""


class CrawlInterrupted(Exception):
    """Ctrl-C: what was stored is recorded in OUT_DIR; `summary` is the crawl.json that was written."""

    def __init__(self, summary: dict):
        super().__init__("crawl interrupted")
        self.summary = summary


def safe_stem(item_id: str, url: str) -> str:
    """File name stem for an id: a readable slug plus a hash of the exact (id, url), so no escape, no collision.

    The URL is part of the hash so that a list whose URL for an id changed does not reuse the old file.
    """
    # The bytes of json.dumps([item_id, url]), built from its C string encoder (a million ids: 5 s less).
    key = f"[{_json_string(item_id)}, {_json_string(url)}]"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    slug = _SLUG_RE.sub("_", item_id).strip("_")[:48]
    return f"{slug}-{digest}" if slug else digest


@dataclass(frozen=True)
class _Stored:
    item: ListItem
    path: str  # relative to OUT_DIR, posix
    sha256: str
    width: int
    height: int
    size: int
    resumed: bool
    converted: bool


@dataclass(frozen=True)
class _Failed:
    item: ListItem
    reason: str
    detail: str
    attempts: int


@dataclass(frozen=True)
class _Crash:
    item: ListItem
    error: BaseException


_FALLBACK_SIZE = (24, 100)  # rows and columns for the bar on a terminal that reports no size


def _terminal_columns() -> int:
    """The width stderr's terminal reports, 0 when it reports none."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


class _Progress:
    """A tqdm bar on a terminal, else one line every few seconds on stderr."""

    def __init__(self, total: int, mode: str, every: float):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.every = mode, total, every
        self.start = self.last = time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            # tqdm hides its bar on a terminal that reports no size (0 x 0, as some pseudo-terminals do): give it one.
            rows, columns = _FALLBACK_SIZE
            size = {"dynamic_ncols": True} if _terminal_columns() > 0 else {"ncols": columns, "nrows": rows}
            self.bar = tqdm(total=total, unit="img", smoothing=0.05, file=sys.stderr, **size)

    def update(self, done: int, stored: int, failed: int, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(f"stored {stored} failed {failed} {nbytes / 1e6:.1f} MB", refresh=False)
            return
        now = time.monotonic()
        if self.mode != "lines" or now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        print(
            f"crawl: {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) stored {stored} failed {failed}, "
            f"{rate:.1f} img/s, {nbytes / 1e6:.1f} MB, ETA {eta_text}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Crawl:
    """One run over one DATA_DIR; `run()` returns the summary written to crawl.json."""

    def __init__(self, config: CrawlConfig, parsed: ParsedList, stems: dict[str, str], stray: dict[str, str]):
        self.config = config
        self.parsed = parsed
        self.stray = stray
        self.out_dir = Path(config.out_dir)
        self.images_dir = self.out_dir / mf.IMAGES_DIR
        self.stems = stems
        self.results: dict[str, _Stored | _Failed] = {}
        self.stop = threading.Event()
        self.pid = os.getpid()  # in temporary file names
        self.previous = mf.read_stored_rows(self.out_dir)
        self.journal = mf.ManifestJournal(self.out_dir)
        self.unjournaled: list[mf.ManifestRow] = []  # stored since the last checkpoint
        # Running totals, so that a checkpoint's summary costs the same at any list length.
        self.n_stored = self.n_fetched = self.n_converted = self.n_bytes = self.n_fetched_bytes = 0
        self.failed_by_reason: Counter = Counter()
        self.first_by_hash: dict[str, str] = {}
        self.duplicates_by_hash: dict[str, list[str]] = {}
        root = config.source_root
        self.local = LocalSource(root, config.max_bytes) if root is not None else None
        # One listing instead of two failed opens per id when checking for files of an earlier run.
        self.on_disk = set(os.listdir(self.images_dir)) if self.images_dir.is_dir() else set()
        self.trust_files = self._previous_settings_match()
        self.started_wall = datetime.now(UTC)
        self.started = time.monotonic()
        self.fetcher = Fetcher(
            FetchConfig(
                timeout=config.timeout,
                deadline=config.attempt_deadline,
                retries=config.retries,
                max_bytes=config.max_bytes,
                backoff=config.backoff,
            ),
            pool_size=config.workers,
            stop=self.stop,
        )

    # -- state from an earlier run -------------------------------------------------------------------------------

    def _previous_settings_match(self) -> bool:
        """Stored files are reused only if they were made with the same --max-side."""
        summary = mf.read_summary(self.out_dir)
        settings = summary.get("settings") if summary is not None else None
        if not isinstance(settings, dict):
            return True
        return int(settings.get("max_side", self.config.max_side)) == self.config.max_side

    # -- per item (worker threads) -------------------------------------------------------------------------------

    def _stored_already(self, item: ListItem) -> _Stored | None:
        """A file from an earlier run for this id and URL, if it is on disk and checks out."""
        if not self.trust_files:
            return None
        stem = self.stems[item.id]
        previous = self.previous.get(item.id)
        candidates = [mf.image_path(stem, ext) for ext in (".jpg", ".png")]
        if previous is not None and previous.path in candidates:
            candidates.remove(previous.path)
            candidates.insert(0, previous.path)
        for rel in candidates:
            if rel.rsplit("/", 1)[-1] not in self.on_disk:
                continue
            path = self.out_dir / rel
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            sha = hashlib.sha256(data).hexdigest()
            if previous is not None and previous.path == rel:
                if previous.sha256 != sha:
                    continue  # damaged since it was recorded: download again
                width, height = previous.width, previous.height
            else:
                # On disk but not in the manifest: a crash came between the rename and the manifest write.
                # Renamed files are complete; still, check that it decodes before trusting it.
                try:
                    width, height = verify_stored(data)
                except ImageRejected:
                    continue
            cfg = self.config
            if width * height > cfg.max_pixels or (cfg.max_side and max(width, height) > cfg.max_side):
                continue  # stored under other limits: download again
            return _Stored(
                item=item,
                path=rel,
                sha256=sha,
                width=width,
                height=height,
                size=len(data),
                resumed=True,
                converted=False,
            )
        return None

    def _process(self, item: ListItem) -> _Stored | _Failed:
        if item.id in self.stray:
            return _Failed(item=item, reason=STRAY_REASON, detail=self.stray[item.id], attempts=0)
        done = self._stored_already(item)
        if done is not None:
            return done
        local = None
        try:
            if self.local is not None and not is_http(item.url) and not has_scheme(item.url):
                local = self.local.read(item.url)
                data, content_type, attempts = local.data, None, 1
            else:
                download = self.fetcher.get(item.url)
                data, content_type, attempts = download.data, download.content_type, download.attempts
        except FetchFailed as failure:
            return _Failed(item=item, reason=failure.reason, detail=failure.detail, attempts=failure.attempts)
        cfg = self.config
        try:
            image = process_image(data, max_pixels=cfg.max_pixels, max_side=cfg.max_side, content_type=content_type)
        except ImageRejected as rejected:
            return _Failed(item=item, reason=rejected.reason, detail=rejected.detail, attempts=attempts)
        stem = self.stems[item.id]
        rel = mf.image_path(stem, image.extension)
        final = self.out_dir / rel
        tmp = self.images_dir / f".{stem}.{self.pid}-{threading.get_ident()}.tmp"
        # A local file kept byte for byte is hard-linked where the file system allows it; else its bytes are written.
        if not (local is not None and image.unchanged and store_unchanged(local, tmp)):
            _write_file(tmp, image.data)
        os.replace(tmp, final)  # the file appears complete or not at all
        other = final.with_suffix(".png" if image.extension == ".jpg" else ".jpg")
        if other.name in self.on_disk:
            other.unlink(missing_ok=True)  # a stale copy from a run where the server sent another format
        return _Stored(
            item=item,
            path=rel,
            sha256=hashlib.sha256(image.data).hexdigest(),
            width=image.width,
            height=image.height,
            size=len(image.data),
            resumed=False,
            converted=not image.unchanged,
        )

    def _worker(self, tasks: queue.Queue, results: queue.Queue) -> None:
        while not self.stop.is_set():
            try:
                item = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                result = self._process(item)
            except Interrupted:
                return
            except BaseException as exc:  # reported by the main thread, which stops the crawl
                results.put(_Crash(item, exc))
                return
            results.put(result)

    # -- outputs -------------------------------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        rows = []
        for item in self.parsed.items:
            result = self.results.get(item.id)
            if isinstance(result, _Stored):
                rows.append(
                    mf.ManifestRow(
                        id=item.id,
                        path=result.path,
                        url=item.url,
                        sha256=result.sha256,
                        width=result.width,
                        height=result.height,
                        labels=item.labels,
                    )
                )
        mf.write_manifest(self.out_dir, rows, self.parsed.classes)

    def _write_failed(self) -> None:
        rows = []
        for item in self.parsed.items:
            result = self.results.get(item.id)
            if isinstance(result, _Failed):
                reason, detail, attempts = result.reason, result.detail, result.attempts
            elif result is None:
                reason, detail, attempts = "interrupted", "the run stopped before this id was done", 0
            else:
                continue
            rows.append(mf.FailedRow(id=item.id, url=item.url, reason=reason, detail=detail, attempts=attempts))
        mf.write_failed(self.out_dir, rows)

    def _record(self, result: _Stored | _Failed) -> None:
        """Keep `result` and the running totals; queue a stored row for the journal unless it is on record."""
        self.results[result.item.id] = result
        if isinstance(result, _Failed):
            self.failed_by_reason[result.reason] += 1
            return
        self.n_stored += 1
        self.n_bytes += result.size
        if not result.resumed:
            self.n_fetched += 1
            self.n_fetched_bytes += result.size
            self.n_converted += result.converted
        first = self.first_by_hash.setdefault(result.sha256, result.item.id)
        if first != result.item.id:
            self.duplicates_by_hash.setdefault(result.sha256, [first]).append(result.item.id)
        item = result.item
        previous = self.previous.get(item.id)
        if previous is None or (previous.path, previous.sha256, previous.url) != (result.path, result.sha256, item.url):
            self.unjournaled.append(
                mf.ManifestRow(
                    id=item.id, path=result.path, url=item.url, sha256=result.sha256, width=result.width,
                    height=result.height,
                )
            )

    def _duplicates_in_list_order(self) -> list[list[str]]:
        """Groups of ids with byte-identical images, each in list order, groups by their first id's position."""
        if not self.duplicates_by_hash:
            return []
        by_hash: dict[str, list[str]] = {}
        for item in self.parsed.items:
            result = self.results.get(item.id)
            if isinstance(result, _Stored) and result.sha256 in self.duplicates_by_hash:
                by_hash.setdefault(result.sha256, []).append(item.id)
        return list(by_hash.values())

    def summary(self, status: str) -> dict:
        failed = Counter(self.failed_by_reason)
        missing = len(self.parsed.items) - len(self.results)
        if missing and status == "interrupted":
            failed["interrupted"] += missing
        seconds = time.monotonic() - self.started
        # A running checkpoint counts the groups; listing them would cost as much as the ids they hold, so only the
        # final summary lists them (in list order). Running summaries have "duplicates": null.
        duplicates = None if status == "running" else self._duplicates_in_list_order()
        cfg = self.config
        settings = {
            "workers": cfg.workers,
            "timeout": cfg.timeout,
            "deadline": cfg.attempt_deadline,
            "retries": cfg.retries,
            "max_bytes": cfg.max_bytes,
            "max_pixels": cfg.max_pixels,
            "max_side": cfg.max_side,
        }
        if cfg.source_root is not None:
            settings["root"] = str(cfg.source_root)
        return {
            "status": status,
            "list": str(cfg.list_path),
            "format": self.parsed.format,
            "classes": len(self.parsed.classes),
            "items": len(self.parsed.items),
            "stored": self.n_stored,
            "downloaded": self.n_fetched,
            "already_stored": self.n_stored - self.n_fetched,
            "converted": self.n_converted,
            "failed": sum(failed.values()),
            "failed_by_reason": dict(sorted(failed.items(), key=lambda kv: (-kv[1], kv[0]))),
            "bytes": self.n_bytes,
            "downloaded_bytes": self.n_fetched_bytes,
            "seconds": round(seconds, 3),
            "images_per_second": round(self.n_fetched / seconds, 2) if seconds > 0 else 0.0,
            "duplicate_groups": len(self.duplicates_by_hash),
            "duplicates": duplicates,
            "settings": settings,
            "started": self.started_wall.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds") if status != "running" else None,
        }

    def _checkpoint(self) -> None:
        """Append what was stored since the last checkpoint to the journal, and the running totals to crawl.json."""
        self.journal.append(self.unjournaled)
        self.unjournaled = []
        mf.write_summary(self.out_dir, self.summary("running"))

    def _finish(self, status: str) -> dict:
        self.journal.close()
        self._write_manifest()  # the compaction: manifest.csv from every result; the journal is removed
        self._write_failed()
        summary = self.summary(status)
        mf.write_summary(self.out_dir, summary)
        return summary

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.config
        items = self.parsed.items
        tasks: queue.Queue = queue.Queue()
        for item in items:
            tasks.put(item)
        # Bounded: workers that outrun the main thread wait for it instead of piling results up in memory.
        results: queue.Queue = queue.Queue(maxsize=_RESULTS_WAITING)
        progress = _Progress(len(items), cfg.progress, cfg.progress_every) if cfg.progress != "off" else None
        # Daemon threads: on Ctrl-C in-flight downloads are abandoned, not waited for.
        threads = [
            threading.Thread(target=self._worker, args=(tasks, results), name=f"crawl-{k}", daemon=True)
            for k in range(thread_count(cfg.workers, items, local=self.local is not None))
        ]
        last_checkpoint = time.monotonic()
        # Taken results wait in `pending` until recorded, so a Ctrl-C between the two loses none of them.
        pending: deque = deque()
        try:
            self._checkpoint()
            for thread in threads:
                thread.start()
            while len(self.results) < len(items):
                _take_all(results, interval=0.02, into=pending)
                while pending:
                    result = pending[0]
                    if isinstance(result, _Crash):
                        raise RuntimeError(f"crawl worker failed on id {result.item.id!r}: {result.error!r}") from (
                            result.error
                        )
                    self._record(result)
                    pending.popleft()
                if progress is not None:
                    progress.update(len(self.results), self.n_stored, len(self.results) - self.n_stored, self.n_bytes)
                if time.monotonic() - last_checkpoint >= cfg.checkpoint_every:
                    self._checkpoint()
                    last_checkpoint = time.monotonic()
        except KeyboardInterrupt:
            self.fetcher.abort_all()
            self._drain(pending, results)
            if progress is not None:
                progress.close()
                progress = None
            summary = self._finish("interrupted")
            self._print_summary(summary)
            raise CrawlInterrupted(summary) from None
        except BaseException:
            self.fetcher.abort_all()
            self._drain(pending, results)
            self._finish("failed")
            raise
        finally:
            if progress is not None:
                progress.close()
            self.fetcher.close()
        summary = self._finish("completed")
        self._print_summary(summary)
        return summary

    def _drain(self, pending: deque, results: queue.Queue) -> None:
        """Record results taken but not yet recorded, and those that finished while we were stopping."""
        while True:
            if pending:
                result = pending.popleft()
            else:
                try:
                    result = results.get_nowait()
                except queue.Empty:
                    return
            # A Ctrl-C between recording a result and dropping it from `pending` leaves it there, recorded.
            if not isinstance(result, _Crash) and self.results.get(result.item.id) is not result:
                self._record(result)

    def _print_summary(self, summary: dict) -> None:
        if self.config.progress == "off":
            return
        print(format_summary(summary, self.out_dir), flush=True)


def _write_file(path: Path, data: bytes) -> None:
    """`data` into a new file at `path` with three system calls (open, write, close).

    Python's `open()` adds an fstat, a terminal check and a seek; each call gives up the interpreter lock, and
    getting it back behind 32 busy workers is where much of a download crawl's CPU went (futex waits).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


_MAX_BATCH = 1000  # results per wake-up at most: checkpoints keep their pace when workers outrun the main thread
_RESULTS_WAITING = 4 * _MAX_BATCH
LOCAL_THREADS_PER_CPU = 2


def thread_count(workers: int, items: list[ListItem], local: bool) -> int:
    """Worker threads for a crawl: `workers`, but no more than there are items, and for a list of local files
    only (`--root`, no http(s) row) no more than LOCAL_THREADS_PER_CPU per CPU: they never wait on a network, so
    more only compete for the interpreter lock (a 1M-row local crawl with 32 left the main thread far behind)."""
    count = min(workers, max(1, len(items)))
    if local and not any(is_http(item.url) for item in items):
        count = min(count, LOCAL_THREADS_PER_CPU * (os.cpu_count() or 1))
    return count


def _take_all(results: queue.Queue, interval: float, into: deque) -> None:
    """Sleep `interval`, then take the results already there (up to _MAX_BATCH) without waiting; each is appended
    to `into` as soon as it is taken.

    A sleep per batch, not a wait per result: a waiting main thread is woken by every result a worker puts, and
    each wake-up is one more hand-off of the interpreter lock among dozens of busy workers (futex calls, and up to
    a switch interval of 5 ms to get the lock back), which capped the main thread at a few hundred results a second.
    """
    time.sleep(interval)
    try:
        for _ in range(_MAX_BATCH):
            into.append(results.get_nowait())
    except queue.Empty:
        pass


def format_summary(summary: dict, out_dir: str | Path) -> str:
    """The one-line final report: stored, failed by reason, MB, seconds, images per second."""
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary["failed_by_reason"].items())
    text = (
        f"crawl {summary['status']}: stored {summary['stored']} of {summary['items']} "
        f"({summary['downloaded']} downloaded, {summary['already_stored']} already stored), "
        f"failed {summary['failed']}{f' ({reasons})' if reasons else ''}, "
        f"{summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s, {summary['images_per_second']:.1f} images/s"
    )
    if summary["duplicate_groups"]:
        text += f", {summary['duplicate_groups']} group(s) of byte-identical images"
    return f"{text} -> {out_dir}"


def _prepare_out_dir(out_dir: Path, parsed: ParsedList) -> None:
    images = out_dir / mf.IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    for leftover in images.glob(".*.tmp"):  # partial files of a killed run
        leftover.unlink(missing_ok=True)
    mf.write_list(out_dir, parsed.items, parsed.classes)


def crawl(config: CrawlConfig) -> dict:
    """Run the crawl stage; return the crawl.json summary.

    Raises ListError (bad list or classes file: nothing downloaded), ConfigError (bad setting), CrawlBusy (another
    crawl runs on OUT_DIR) and CrawlInterrupted (Ctrl-C, after recording what was stored).
    """
    config.validate()
    if config.is_folder:
        folder = list_class_folders(config.list_path)
        parsed, stray = folder.parsed, folder.stray
    else:
        parsed, stray = parse_list(config.list_path, config.classes_path), {}
    stems = _stems(parsed, config.list_path)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CrawlBusy(f"{out_dir}: another crawl is writing this directory") from None
        configure_pil(config.max_pixels)
        _prepare_out_dir(out_dir, parsed)
        return _Crawl(config, parsed, stems, stray).run()


def _stems(parsed: ParsedList, list_path: Path) -> dict[str, str]:
    """Every id's file name stem; ListError if two ids would share a file."""
    stems: dict[str, str] = {}
    owners: dict[str, str] = {}
    for item in parsed.items:
        stem = safe_stem(item.id, item.url)
        owner = owners.setdefault(stem, item.id)
        if owner != item.id:  # 80-bit hash: never expected, but never silently overwrite a file either
            raise ListError([f"{list_path}:{item.line}: id '{item.id}' maps to the same file as '{owner}'"])
        stems[item.id] = stem
    return stems


__all__ = [
    "FAILURE_REASONS",
    "ConfigError",
    "CrawlBusy",
    "CrawlConfig",
    "CrawlInterrupted",
    "crawl",
    "format_summary",
    "safe_stem",
]
