"""The inputs of `predict tag`: which arguments are RUN_DIRs, the image files a folder or standard input names, and
each file made ready for the training decoder with the crawl's own conversion.

- RUN_DIRs come first: the leading arguments that are folders holding a RUN_DIR's config file are the runs, the
  first argument that is not starts the inputs (and no later argument may be a RUN_DIR).
- A folder is searched recursively for the extensions of the image formats the crawl accepts
  (`crawl.images.ACCEPTED_FORMATS`, as Pillow names their extensions), case-insensitively, and its images are
  sorted by their path inside the folder, component by component. Nothing outside the named folder is read: a
  symlink (to a file or a folder) that resolves outside it becomes an error row (`outside_folder`) and is not
  followed; a folder reached twice through symlinks is searched once.
- `-` reads one path per line from standard input (blank lines skipped); each line is an INPUT like the others.
- A file is read whole and goes through `crawl.images.process_image`, as a downloaded body does in the crawl: a
  baseline RGB JPEG is used as is, every other file (PNG with alpha, CMYK, grayscale, WebP, EXIF-rotated, ...) is
  converted to the bytes the crawl would have stored, so a raw file tags exactly like its crawled copy. Files the
  crawl would reject get the crawl's reason (`not_image`, `corrupt`, `truncated`, `empty`, `too_many_pixels`);
  `not_found`, `not_a_file`, `unreadable` and `outside_folder` are tag's own (README, "predict tag").
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from crawl.crawler import CrawlConfig
from crawl.images import ACCEPTED_FORMATS, ImageRejected, process_image
from predict.errors import PredictError
from train.rundir import CONFIG_FILE

STDIN = "-"
MAX_PIXELS = CrawlConfig.max_pixels  # the crawl's default --max-pixels: the same images are refused
# The reasons tag adds to the crawl's failed.csv reasons.
NOT_FOUND, NOT_A_FILE, UNREADABLE, OUTSIDE_FOLDER = "not_found", "not_a_file", "unreadable", "outside_folder"


class TagUsageError(PredictError):
    """The command line names no run, no input, or a RUN_DIR among the inputs (exit status 2 with the usage)."""


@dataclass(frozen=True)
class ImageInput:
    """One row of the output: the path as the user named it (or as found in a folder), or an error found already."""

    path: str
    error: str | None = None  # a reason word; None while the file still has to be read
    detail: str = ""


@dataclass(frozen=True)
class Prepared:
    """An input after reading: the file the decoder reads (`source`, None on error), or the reason it cannot be."""

    source: str | None
    error: str | None = None
    detail: str = ""


def is_run_dir(path: str | Path) -> bool:
    """True for a folder holding a RUN_DIR's config file (what `python -m train` writes first)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def split_runs_and_inputs(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """The leading RUN_DIRs and the INPUTs after them; TagUsageError when either is empty or a RUN_DIR comes late."""
    n_runs = 0
    while n_runs < len(arguments) and arguments[n_runs] != STDIN and is_run_dir(arguments[n_runs]):
        n_runs += 1
    runs, inputs = list(arguments[:n_runs]), list(arguments[n_runs:])
    if not runs:
        first = arguments[0] if arguments else None
        raise TagUsageError(
            "no RUN_DIR given: the first arguments must be run folders written by python -m train"
            + (f" ({first} has no {CONFIG_FILE})" if first else "")
        )
    if not inputs:
        raise TagUsageError("no INPUT given: name image files, folders, or - to read paths from standard input")
    late = [a for a in inputs if a != STDIN and is_run_dir(a)]
    if late:
        raise TagUsageError(f"{late[0]} is a RUN_DIR after the first INPUT ({inputs[0]}); give every RUN_DIR first")
    if inputs.count(STDIN) > 1:
        raise TagUsageError("- (standard input) can be given once")
    return runs, inputs


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of the formats the crawl accepts, as Pillow registers them."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in ACCEPTED_FORMATS)


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def find_images(folder: str | Path) -> list[ImageInput]:
    """The image files under `folder`, recursively, sorted by their path inside it; symlinks that resolve outside
    the folder are error rows (never followed)."""
    folder = str(folder)
    root = os.path.realpath(folder)
    found: list[tuple[tuple[str, ...], ImageInput]] = []
    visited = {root}
    extensions = image_extensions()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        relative_dir = Path(os.path.relpath(dirpath, folder)).parts if dirpath != folder else ()
        keep = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if not _inside(real, root):
                shown = os.path.join(dirpath, name)
                found.append(((*relative_dir, name), ImageInput(shown, OUTSIDE_FOLDER, f"a symlink to {real}")))
            elif real not in visited:  # a folder reached twice through symlinks (or a loop) is searched once
                visited.add(real)
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            shown = os.path.join(dirpath, name)
            real = os.path.realpath(shown)
            key = (*relative_dir, name)
            if not _inside(real, root):
                found.append((key, ImageInput(shown, OUTSIDE_FOLDER, f"a symlink to {real}")))
            else:
                found.append((key, ImageInput(shown)))
    found.sort(key=lambda item: item[0])
    return [entry for _, entry in found]


def read_path_lines(lines: Iterable[str]) -> list[str]:
    """Paths from standard input: one per line, line ends removed, blank lines skipped (spaces inside are kept)."""
    return [line.rstrip("\r\n") for line in lines if line.strip()]


def expand_inputs(inputs: Sequence[str], stdin: Iterable[str] | None = None) -> list[ImageInput]:
    """Every image row the INPUT arguments name, in order: files as given, folders searched, `-` read from stdin."""
    rows: list[ImageInput] = []
    for arg in inputs:
        if arg == STDIN:
            if stdin is None:
                raise TagUsageError("- given but there is no standard input to read")
            rows.extend(expand_inputs([p for p in read_path_lines(stdin) if p != STDIN]))
        elif os.path.isdir(arg):
            rows.extend(find_images(arg))
        else:
            rows.append(ImageInput(arg))  # a named file is tried whatever its extension; missing files are rows
    return rows


def prepare(entry: ImageInput, scratch: Path, index: int) -> Prepared:
    """Read one input and return the file the training decoder should read: the file itself when the crawl would
    store it byte for byte, else the crawl's converted bytes written to `scratch`; or the reason it cannot be."""
    if entry.error is not None:
        return Prepared(None, entry.error, entry.detail)
    path = entry.path
    if not os.path.exists(path):  # a broken symlink too
        return Prepared(None, NOT_FOUND, "no such file")
    if not os.path.isfile(path):
        return Prepared(None, NOT_A_FILE, "a folder or special file, not an image file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return Prepared(None, UNREADABLE, err.strerror or str(err))
    try:
        stored = process_image(data, max_pixels=MAX_PIXELS)
    except ImageRejected as err:
        return Prepared(None, err.reason, err.detail)
    if stored.unchanged:
        return Prepared(path)
    converted = scratch / f"{index}{stored.extension}"
    converted.write_bytes(stored.data)  # a private scratch folder: no reader sees a partial file
    return Prepared(str(converted))


def write_array(image: np.ndarray, scratch: Path, index: int) -> Prepared:
    """An HxWx3 uint8 RGB array as a PNG in `scratch` (lossless), so it takes the very decode and resize of a file."""
    target = scratch / f"{index}.png"
    Image.fromarray(np.ascontiguousarray(image)).save(target, format="PNG", compress_level=1)
    return Prepared(str(target))
