"""The DATA_DIR format: the one place that reads and writes list.csv, classes.txt, manifest.csv, failed.csv, crawl.json.

A DATA_DIR is what `python -m crawl` writes and what `train` and `predict` read:

- ``list.csv``: every id of the input list, in input order: ``id,url`` plus one 0/1 column per class when labelled.
- ``classes.txt``: class names in flag order, one per line (labelled lists only).
- ``manifest.csv``: one row per stored image: ``id,path,url,sha256,width,height`` plus one 0/1 column per class
  when labelled; ``path`` is relative to the DATA_DIR.
- ``failed.csv``: ``id,url,reason,detail,attempts``, one row per id that has no stored image.
- ``crawl.json``: the run summary.

Nothing here imports TensorFlow: the crawl stage runs on machines without it.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.atomic import atomic_write_text

LIST_FILE = "list.csv"
CLASSES_FILE = "classes.txt"
MANIFEST_FILE = "manifest.csv"
FAILED_FILE = "failed.csv"
SUMMARY_FILE = "crawl.json"
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


def write_classes(root: str | os.PathLike, classes: list[str]) -> None:
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


def manifest_sha256(root: str | os.PathLike) -> str:
    """sha256 of manifest.csv, recorded by training so a run names the data it saw."""
    import hashlib

    return hashlib.sha256((Path(root) / MANIFEST_FILE).read_bytes()).hexdigest()
