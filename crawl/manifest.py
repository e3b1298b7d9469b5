"""The DATA_DIR format: the one place that reads and writes list.csv, classes.txt, manifest.csv, failed.csv, crawl.json.

A DATA_DIR is what `python -m crawl` writes and what `train` and `predict` read:

- ``list.csv``: every id of the input list, in input order: ``id,url`` plus one 0/1 column per class when labelled.
- ``classes.txt``: class names in flag order, one per line (labelled lists only).
- ``manifest.csv``: one row per stored image: ``id,path,url,sha256,width,height`` plus one 0/1 column per class
  when labelled; ``path`` is relative to the DATA_DIR.
- ``failed.csv``: ``id,url,reason,detail,attempts``, one row per id that has no stored image.
- ``crawl.json``: the run summary.
- ``manifest.journal``: only while a crawl runs (or after one was killed): the rows stored since manifest.csv was
  last written, one JSON array per line, appended at each checkpoint. A crawl's last step writes manifest.csv
  from everything and removes the journal, so a checkpoint costs what changed, not the whole manifest.

Nothing here imports TensorFlow: the crawl stage runs on machines without it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from common.atomic import atomic_write_csv, atomic_write_json, atomic_write_text

LIST_FILE = "list.csv"
CLASSES_FILE = "classes.txt"
MANIFEST_FILE = "manifest.csv"
FAILED_FILE = "failed.csv"
SUMMARY_FILE = "crawl.json"
JOURNAL_FILE = "manifest.journal"
IMAGES_DIR = "images"

MANIFEST_COLUMNS = ["id", "path", "url", "sha256", "width", "height"]
FAILED_COLUMNS = ["id", "url", "reason", "detail", "attempts"]

# The JD AI Fashion Challenge (2018) style classes, in the competition's flag order.
JD_FASHION_CLASSES = [
    "sport",
    "casual",
    "ol_commute",
    "japanese",
    "korean",
    "euro_american",
    "british",
    "girly",
    "lady",
    "simple",
    "natural",
    "street_punk",
    "ethnic",
]


class DataDirError(ValueError):
    """A DATA_DIR is missing a file or holds one that does not match the format."""


@dataclass(frozen=True)
class DataDir:
    """A parsed DATA_DIR: its classes, its full list and the stored images."""

    root: Path
    classes: list[str]
    items: pd.DataFrame  # list.csv: id, url, [classes...]
    manifest: pd.DataFrame  # manifest.csv: id, path, url, sha256, width, height, [classes...]
    failed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FAILED_COLUMNS))

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def image_paths(self) -> list[str]:
        """Absolute paths of the stored images, in manifest order."""
        return [str(self.root / p) for p in self.manifest["path"]]

    def labels(self):
        """The manifest's 0/1 label matrix (n_images x n_classes) as float32."""
        if not self.labelled:
            raise DataDirError(f"{self.root}: this DATA_DIR has no labels ({CLASSES_FILE} is missing)")
        return self.manifest[self.classes].to_numpy(dtype="float32")

    @property
    def missing_ids(self) -> list[str]:
        """Ids of the list that have no stored image, in list order."""
        stored = set(self.manifest["id"])
        return [i for i in self.items["id"] if i not in stored]


@dataclass(frozen=True)
class ListRow:
    """One row of list.csv: an id of the input list, its URL and its 0/1 labels in class order (empty if unlabelled)."""

    id: str
    url: str
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class ManifestRow:
    """One row of manifest.csv: a stored image, its path relative to the DATA_DIR, hash, size and labels."""

    id: str
    path: str
    url: str
    sha256: str
    width: int
    height: int
    labels: tuple[int, ...] = ()

    @classmethod
    def of_file(
        cls, data: bytes, *, id: str, path: str, url: str, width: int, height: int, labels: Sequence[int] = ()
    ) -> ManifestRow:
        """The row of an image stored at `path` whose file holds `data` (its sha256 is computed here)."""
        return cls(
            id=id,
            path=path,
            url=url,
            sha256=hashlib.sha256(data).hexdigest(),
            width=width,
            height=height,
            labels=tuple(int(v) for v in labels),
        )


@dataclass(frozen=True)
class FailedRow:
    """One row of failed.csv: an id without a stored image, why (a crawl.crawler.FAILURE_REASONS key) and tries."""

    id: str
    url: str
    reason: str
    detail: str
    attempts: int


class _ListEntry(Protocol):
    """What list.csv needs of an entry: ListRow, or crawl.listfile.ListItem as parsed."""

    @property
    def id(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def labels(self) -> tuple[int, ...]: ...


def image_path(stem: str, extension: str) -> str:
    """The manifest `path` of a stored image: relative to the DATA_DIR, posix, under images/."""
    return f"{IMAGES_DIR}/{stem}{extension}"


def _write_rows(path: Path, columns: list[str], rows: list[list]) -> None:
    atomic_write_csv(path, pd.DataFrame(rows, columns=columns))


def write_list(root: str | os.PathLike, entries: Iterable[_ListEntry], classes: Sequence[str]) -> None:
    """Write list.csv (every id of the input list, in order) and classes.txt, or remove a stale classes.txt when the
    list is unlabelled (an earlier labelled list may have been crawled into the same folder)."""
    root = Path(root)
    classes = list(classes)
    _write_rows(root / LIST_FILE, ["id", "url"] + classes, [[e.id, e.url, *e.labels] for e in entries])
    if classes:
        write_classes(root, classes)
    else:
        (root / CLASSES_FILE).unlink(missing_ok=True)


def write_manifest(root: str | os.PathLike, rows: Iterable[ManifestRow], classes: Sequence[str]) -> None:
    """Write manifest.csv: one row per stored image, in the given (list) order; then remove the journal, whose rows
    the complete manifest replaces (a kill between the two leaves both, which read the same)."""
    _write_rows(
        Path(root) / MANIFEST_FILE,
        MANIFEST_COLUMNS + list(classes),
        [[r.id, r.path, r.url, r.sha256, r.width, r.height, *r.labels] for r in rows],
    )
    (Path(root) / JOURNAL_FILE).unlink(missing_ok=True)


_JOURNAL_HEADER = json.dumps({"format": "crawl manifest journal", "version": 1, "columns": MANIFEST_COLUMNS})


class ManifestJournal:
    """The append-only journal of stored rows (manifest.journal), written by the one crawl that holds OUT_DIR.

    `append(rows)` writes one JSON line per row, flushes and fsyncs: its cost is the rows given, whatever the size
    of the manifest. A line cut by a kill is skipped by `read_stored_rows`, and the next append starts on a new
    line, so a kill -9 at any moment loses at most the rows not yet appended (their files are found on disk again).
    """

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / JOURNAL_FILE
        self._handle = None

    def append(self, rows: Iterable[ManifestRow]) -> int:
        """Append `rows` (labels are not journaled: list.csv holds them); returns how many were written."""
        lines = [json.dumps([r.id, r.path, r.url, r.sha256, r.width, r.height]) + "\n" for r in rows]
        if not lines:
            return 0
        if self._handle is None:
            self._handle = open(self.path, "a+b")  # noqa: SIM115 - kept open across checkpoints, closed by close()
            size = self._handle.seek(0, os.SEEK_END)
            if size == 0:
                self._handle.write(_JOURNAL_HEADER.encode() + b"\n")
            else:
                self._handle.seek(size - 1)
                if self._handle.read(1) != b"\n":
                    self._handle.write(b"\n")  # end the line a kill cut, so it cannot swallow the next row
        self._handle.write("".join(lines).encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return len(lines)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_journal(root: str | os.PathLike) -> list[ManifestRow]:
    """The journal's rows in order (labels left out); lines that are not a whole row (one cut by a kill) are
    skipped. [] when there is no journal."""
    path = Path(root) / JOURNAL_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    for line in raw.split(b"\n"):
        try:
            values = json.loads(line)
        except ValueError:
            continue
        if not isinstance(values, list) or len(values) != len(MANIFEST_COLUMNS):
            continue
        item_id, rel, url, sha, width, height = values
        if not (all(isinstance(v, str) for v in (item_id, rel, url, sha)) and type(width) is type(height) is int):
            continue
        rows.append(ManifestRow(id=item_id, path=rel, url=url, sha256=sha, width=width, height=height))
    return rows


def write_failed(root: str | os.PathLike, rows: Iterable[FailedRow]) -> None:
    """Write failed.csv: one row per id of the list that has no stored image."""
    _write_rows(
        Path(root) / FAILED_FILE, FAILED_COLUMNS, [[r.id, r.url, r.reason, r.detail, r.attempts] for r in rows]
    )


def write_summary(root: str | os.PathLike, summary: dict) -> None:
    """Write crawl.json, the run summary."""
    atomic_write_json(Path(root) / SUMMARY_FILE, summary)


def read_summary(root: str | os.PathLike) -> dict | None:
    """crawl.json as a dict, or None when it is missing or not a JSON object (a crawl killed before writing it)."""
    try:
        summary = json.loads((Path(root) / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def write_data_dir(
    root: str | os.PathLike,
    *,
    classes: Sequence[str],
    entries: Iterable[_ListEntry],
    stored: Iterable[ManifestRow],
    failed: Iterable[FailedRow] = (),
    summary: dict | None = None,
) -> Path:
    """Write a whole DATA_DIR's tables at once (the image files must already be under images/), as a crawl would
    leave it: list.csv, classes.txt, manifest.csv, failed.csv and, if given, crawl.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_list(root, entries, classes)
    write_manifest(root, stored, classes)
    write_failed(root, failed)
    if summary is not None:
        write_summary(root, summary)
    return root


def write_classes(root: str | os.PathLike, classes: Sequence[str]) -> None:
    """Write classes.txt: the class names in flag order, one per line."""
    atomic_write_text(Path(root) / CLASSES_FILE, "".join(f"{c}\n" for c in classes))


def read_classes(root: str | os.PathLike) -> list[str]:
    """Class names from classes.txt, or [] when the DATA_DIR is unlabelled."""
    path = Path(root) / CLASSES_FILE
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataDirError(f"{path}: not found; is this a DATA_DIR written by `python -m crawl`?")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataDirError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def read_data_dir(root: str | os.PathLike) -> DataDir:
    """Read a DATA_DIR written by the crawl stage, with labels as ints and sizes as ints."""
    root = Path(root)
    if not root.is_dir():
        raise DataDirError(f"{root}: not a directory")
    classes = read_classes(root)
    items = _read_csv(root / LIST_FILE, ["id", "url"] + classes)
    manifest = _read_csv(root / MANIFEST_FILE, MANIFEST_COLUMNS + classes)
    for col in ["width", "height"] + classes:
        manifest[col] = manifest[col].astype(int)
    for col in classes:
        items[col] = items[col].astype(int)
    failed_path = root / FAILED_FILE
    failed = _read_csv(failed_path, FAILED_COLUMNS) if failed_path.exists() else pd.DataFrame(columns=FAILED_COLUMNS)
    return DataDir(root=root, classes=classes, items=items, manifest=manifest, failed=failed)


def read_stored_rows(root: str | os.PathLike) -> dict[str, ManifestRow]:
    """The stored rows on record by id (labels left out): manifest.csv's, updated by the journal of a crawl that
    did not finish. A missing, unreadable or malformed manifest counts as none.

    For a crawl resuming in the folder: what is not on record it re-checks on disk instead.
    """
    rows = _read_manifest_rows(Path(root) / MANIFEST_FILE)
    for row in read_journal(root):
        rows[row.id] = row
    return rows


def _read_manifest_rows(path: Path) -> dict[str, ManifestRow]:
    if not path.exists():
        return {}
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        return {
            r["id"]: ManifestRow(
                id=r["id"],
                path=r["path"],
                url=r["url"],
                sha256=r["sha256"],
                width=int(r["width"]),
                height=int(r["height"]),
            )
            for r in frame[MANIFEST_COLUMNS].to_dict("records")
        }
    except (OSError, ValueError, KeyError):
        return {}


def manifest_sha256(root: str | os.PathLike) -> str:
    """sha256 of manifest.csv, recorded by training so a run names the data it saw."""
    return hashlib.sha256((Path(root) / MANIFEST_FILE).read_bytes()).hexdigest()
