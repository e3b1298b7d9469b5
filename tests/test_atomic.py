"""common/atomic.py: exact bytes, '\\n' line endings, and a failed write that leaves the old file and no temporary."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from common import atomic
from common.atomic import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text

OLD = b"id,url\nold,http://example.invalid/old.jpg\n"


@pytest.fixture
def target(tmp_path):
    """An existing file with known bytes, alone in its folder."""
    path = tmp_path / "out" / "manifest.csv"
    path.parent.mkdir()
    path.write_bytes(OLD)
    return path


def _folder(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_bytes_are_written_exactly_and_parents_created(tmp_path):
    data = bytes(range(256)) + b"\r\n\n\x00"
    path = tmp_path / "a" / "b" / "blob.bin"
    atomic_write_bytes(path, data)
    assert path.read_bytes() == data
    assert _folder(path) == ["blob.bin"]


def test_text_is_utf8_with_its_own_line_endings(tmp_path):
    path = tmp_path / "classes.txt"
    atomic_write_text(path, "top\nrobe d'été\n")
    assert path.read_bytes() == "top\nrobe d'été\n".encode()  # no '\r\n' translation, UTF-8 whatever the locale


def test_csv_has_no_index_and_newline_line_endings(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b"], "score": [0.25, 1.0], "note": ["x,y", ""]})
    path = tmp_path / "t.csv"
    atomic_write_csv(path, frame)
    assert path.read_bytes() == b'id,score,note\na,0.25,"x,y"\nb,1.0,\n'
    atomic_write_csv(path, frame[["id"]], header=False)
    assert path.read_bytes() == b"a\nb\n"


def test_json_is_indented_in_key_order_with_a_final_newline(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_json(path, {"z": 1, "a": [1.5, None], "s": "é"})
    assert path.read_bytes() == b'{\n  "z": 1,\n  "a": [\n    1.5,\n    null\n  ],\n  "s": "\\u00e9"\n}\n'


def test_replacing_keeps_the_files_mode_and_a_new_file_gets_the_umask_mode(tmp_path, target):
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new\n")
    assert target.read_bytes() == b"new\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"")  # what open() gives a new file under this process's umask
    fresh = tmp_path / "fresh.txt"
    atomic_write_text(fresh, "")
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


class _ExplodingFrame(pd.DataFrame):
    def to_csv(self, *args, **kwargs):
        raise RuntimeError("disk full while rendering")


def test_a_frame_that_fails_to_render_leaves_the_old_file(target):
    before = _folder(target)
    with pytest.raises(RuntimeError, match="disk full while rendering"):
        atomic_write_csv(target, _ExplodingFrame({"id": ["new"]}))
    assert target.read_bytes() == OLD and _folder(target) == before


def test_json_that_cannot_be_encoded_leaves_the_old_file(target):
    with pytest.raises(TypeError):
        atomic_write_json(target, {"ok": 1, "bad": object()})
    assert target.read_bytes() == OLD and _folder(target) == ["manifest.csv"]


@pytest.mark.parametrize("error", [OSError("no space left on device"), KeyboardInterrupt()])
def test_a_write_failing_midway_leaves_the_old_file_and_no_temporary(target, monkeypatch, error):
    """The temporary file exists (its bytes written) when fsync fails: it must be removed, the old file untouched."""
    seen = []

    def failing_fsync(fd):
        seen.append(_folder(target))
        raise error

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(type(error)):
        atomic_write_bytes(target, b"partial" * 1000)
    assert len(seen) == 1 and len(seen[0]) == 2  # the temporary was there at the moment of failure ...
    assert target.read_bytes() == OLD and _folder(target) == ["manifest.csv"]  # ... and is gone now


def test_a_failing_rename_leaves_the_old_file_and_no_temporary(target, monkeypatch):
    def failing_replace(src, dst):
        raise PermissionError(f"cannot rename {src} to {dst}")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        atomic_write_csv(target, pd.DataFrame({"id": ["new"], "url": ["http://example.invalid/new.jpg"]}))
    assert target.read_bytes() == OLD and _folder(target) == ["manifest.csv"]


def test_a_reader_sees_the_old_bytes_or_the_new_ones_never_a_mix(target, monkeypatch):
    """Up to the rename the target holds the old bytes; right after it, all of the new ones."""
    real_replace = os.replace
    during = []

    def watching_replace(src, dst):
        during.append(Path(dst).read_bytes())
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", watching_replace)
    atomic_write_bytes(target, b"new contents\n")
    assert during == [OLD] and target.read_bytes() == b"new contents\n"
