"""Atomic file writes: a temporary file in the same folder, then a rename, so a reader never sees a partial file.

Every stage writes what matters through these (manifests, RUN_DIR files, submissions); a crash at any moment
leaves either the old file or the new one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pandas as pd


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | os.PathLike, frame: pd.DataFrame, header: bool = True) -> None:
    """Atomically write a DataFrame as CSV without the index, with '\\n' line endings."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False, header=header, lineterminator="\n")
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write pretty-printed JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
