"""Atomic file writes: a temporary file in the same folder, then a rename, so a reader never sees a partial file.

Every stage writes what matters through these (manifests, RUN_DIR files, submissions); a crash at any moment
leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import stat
from pathlib import Path

import pandas as pd


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temporary file next to `path`, with the mode `open(path, "w")` would leave: an existing file's mode,
    else 0o666 less the umask (tempfile.mkstemp's 0o600 would make every file written this way private)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, str(tmp)
    raise FileExistsError(f"no free temporary name next to {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
