"""Local image files as a source: list paths read under `--root`, and a folder of class sub-folders as a list.

Reading never leaves the folder the user named: a path is resolved (symlinks and `..` included) before it is
opened, and one that resolves outside the root, is missing, or is not a regular file fails with `bad_path`. The
file is opened without following a last-moment symlink and checked again on the open descriptor, so a path swapped
between the check and the read is caught too.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from crawl.fetch import FetchFailed
from crawl.listfile import ListError, ListItem, ParsedList

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STRAY_REASON = "stray_file"


def is_http(url: str) -> bool:
    """True for an http:// or https:// URL (any case): downloaded even when a crawl has a --root."""
    return url[:8].lower().startswith(("http://", "https://"))


def has_scheme(url: str) -> bool:
    """True when the row looks like a URL (`scheme://...`) rather than a file path."""
    return _SCHEME_RE.match(url) is not None


@dataclass(frozen=True)
class LocalFile:
    """The bytes of a file read under the root, its resolved path and the identity of what was read."""

    data: bytes
    real_path: str
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns of the file that was read


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: device, inode, size, modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LocalSource:
    """Reads list paths under one root folder (thread-safe: no state besides the resolved root)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = os.path.realpath(root)
        self.max_bytes = max_bytes

    def resolve(self, url: str) -> str:
        """The real path of a list row, or FetchFailed('bad_path') when it resolves outside the root."""
        if "\0" in url:
            raise FetchFailed("bad_path", f"{url[:200]!r}: NUL byte in the path", 1)
        # An absolute path replaces the root in the join; it is accepted only if it resolves inside the root.
        real = os.path.realpath(os.path.join(self.root, url))
        if real != self.root and not real.startswith(self.root.rstrip(os.sep) + os.sep):
            raise FetchFailed("bad_path", f"{url[:200]!r} resolves outside --root {self.root}", 1)
        return real

    def read(self, url: str) -> LocalFile:
        """The file's bytes; FetchFailed with bad_path (missing, not a regular file, outside), empty or too_large."""
        real = self.resolve(url)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise FetchFailed("bad_path", f"{url[:200]!r}: no such file under --root", 1) from None
        except OSError as exc:
            raise FetchFailed("bad_path", f"{url[:200]!r}: {exc.strerror or exc}", 1) from None
        if not stat.S_ISREG(st.st_mode):
            raise FetchFailed("bad_path", f"{url[:200]!r}: not a regular file", 1)
        try:
            # O_NOFOLLOW: a symlink put in place after the resolution is refused; O_NONBLOCK: a FIFO swapped in
            # cannot block the worker (the fstat below then refuses it).
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise FetchFailed("bad_path", f"{url[:200]!r}: cannot open: {exc.strerror or exc}", 1) from None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FetchFailed("bad_path", f"{url[:200]!r}: not a regular file", 1)
            if st.st_size > self.max_bytes:
                raise FetchFailed("too_large", f"file of {st.st_size} bytes > --max-bytes {self.max_bytes}", 1)
            data = handle.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise FetchFailed("too_large", f"file longer than --max-bytes {self.max_bytes}", 1)
        if not data:
            raise FetchFailed("empty", f"{url[:200]!r}: the file is empty", 1)
        return LocalFile(data=data, real_path=real, identity=file_identity(st))


def store_unchanged(source: LocalFile, tmp: Path) -> bool:
    """Hard-link the source file at `tmp` if it is still the file that was read; False when that cannot be done
    (another file system, no permission, the file changed since): the caller then writes the bytes it read."""
    try:
        os.link(source.real_path, tmp, follow_symlinks=False)
    except OSError:
        return False
    try:
        same = file_identity(os.stat(tmp, follow_symlinks=False)) == source.identity
    except OSError:
        same = False
    if not same:
        tmp.unlink(missing_ok=True)
    return same


@dataclass(frozen=True)
class FolderList:
    """A folder of class sub-folders read as a list: the parsed list (ids are relative paths) and the stray files
    (files directly in the folder or below a class folder's top level: id -> why), which are listed without labels."""

    parsed: ParsedList
    stray: dict[str, str]


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _check_name(rel: str, errors: list[str], folder: Path) -> bool:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        errors.append(f"{folder}: {os.fsencode(rel)!r}: the file name is not UTF-8 (it cannot be an id)")
        return False
    return True


def _below(folder: Path, top: str) -> list[str]:
    """Relative paths (posix, from `folder`) of every non-hidden file or link below the sub-folder `top`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder / top):  # does not descend into linked folders
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel_dir = Path(dirpath).relative_to(folder).as_posix()
        found += [f"{rel_dir}/{name}" for name in filenames if not _hidden(name)]
        found += [f"{rel_dir}/{d}" for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
    return found


def list_class_folders(folder: str | os.PathLike) -> FolderList:
    """Read `folder` as one sub-folder per class (Keras's image_dataset_from_directory and torchvision's ImageFolder
    layout): classes are the sub-folder names, sorted; every file directly in a class folder is an item whose id
    and url are its path relative to `folder` (posix), labelled with that one class. Hidden names (starting with
    '.') are skipped. Raises ListError when there is no class sub-folder or a name is not UTF-8."""
    folder = Path(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise ListError([f"{folder}: cannot read the folder: {exc.strerror or exc}"]) from None
    errors: list[str] = []
    classes: list[str] = []
    stray: dict[str, str] = {}
    real_folder = os.path.realpath(folder)
    for e in entries:
        if _hidden(e.name) or not _check_name(e.name, errors, folder):
            continue
        if not e.is_dir():
            stray[e.name] = "a file directly in the folder, not in a class sub-folder"
        elif e.is_symlink() and os.path.dirname(os.path.realpath(e.path)) != real_folder:
            # Listing a linked folder elsewhere would read outside the folder the user named.
            stray[e.name] = "a link to a folder that is not directly in the folder (not followed)"
        else:
            classes.append(e.name)
    if not classes and not errors:
        errors.append(f"{folder}: no class sub-folders (expected one sub-folder of images per class)")
    items: list[tuple[str, tuple[int, ...]]] = []
    for k, name in enumerate(classes):
        labels = tuple(int(j == k) for j in range(len(classes)))
        for entry in sorted(os.scandir(folder / name), key=lambda e: e.name):
            rel = f"{name}/{entry.name}"
            if _hidden(entry.name) or not _check_name(rel, errors, folder):
                continue
            if entry.is_dir():
                if entry.is_symlink():
                    stray[rel] = f"a link to a folder inside the class folder '{name}' (not followed)"
                    continue
                for deeper in _below(folder, rel):
                    if _check_name(deeper, errors, folder):
                        stray[deeper] = f"in a folder below the class folder '{name}' (only its own files are read)"
            else:
                items.append((rel, labels))
    if errors:
        raise ListError(errors)
    no_labels = (0,) * len(classes)
    rows = items + [(rel, no_labels) for rel in stray]
    rows.sort(key=lambda row: row[0])
    parsed = ParsedList(
        classes=classes,
        items=[ListItem(id=rel, url=rel, labels=labels, line=k) for k, (rel, labels) in enumerate(rows, start=1)],
        format="folders",
        delimiter=",",
    )
    return FolderList(parsed=parsed, stray=stray)
