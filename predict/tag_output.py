"""The results of `predict tag` and `predict.Tagger`, and their three output formats (the one owner of these formats).

- ``--out FILE.csv``: header ``path,tags,error,<class names>``; one row per image in input order; ``tags`` are class
  names joined by ``|`` (most probable first), ``error`` is empty when the image was tagged, else its reason word;
  the class columns hold the probabilities with 6 decimals (empty on error rows). Lines end with ``\\n``; fields are
  quoted only when needed (csv module, minimal quoting).
- ``--out FILE.jsonl``: one JSON object per line, keys in this order: ``path``, ``tags`` (list), ``error`` (null when
  tagged), ``probabilities`` (class name -> probability rounded to 6 decimals, class order; ``{}`` on error rows).
- no ``--out``: one readable line per image on standard output: the path, a tab, then ``tag:probability`` (3
  decimals) for each tag, most probable first, separated by spaces; ``(no tags)`` when none passes; ``error:
  REASON (detail)`` for an image that could not be tagged.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predict.errors import PredictError

FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}  # --out suffix -> format
TAG_SEPARATOR = "|"
NO_TAGS = "(no tags)"


@dataclass(frozen=True)
class TagResult:
    """One image's result: its position in the input and path (None for an array), its tags (most probable first),
    its probability per class (class order; empty when it could not be tagged) and the error reason, if any."""

    index: int
    path: str | None
    tags: tuple[str, ...]
    probabilities: Mapping[str, float] = field(repr=False, hash=False)  # hash=False: results stay hashable
    error: str | None = None  # a reason word (README, "predict tag"); None when tagged
    detail: str = ""  # what exactly went wrong, for the error message

    @property
    def name(self) -> str:
        """The path, or `#index` for an array."""
        return self.path if self.path is not None else f"#{self.index}"


def choose_tags(probabilities: np.ndarray, thresholds: np.ndarray, top_k: int | None) -> list[int]:
    """Class indices of one image's tags, most probable first (ties: class order): those reaching their threshold
    (p >= t, the rule of submit), at most `top_k` of them when given."""
    probabilities = np.asarray(probabilities)
    passing = np.flatnonzero(probabilities >= np.asarray(thresholds))
    ranked = passing[np.argsort(-probabilities[passing], kind="stable")]
    return [int(i) for i in (ranked if top_k is None else ranked[:top_k])]


def file_format(out: Path) -> str:
    """The format of an --out file from its suffix; PredictError for another suffix."""
    fmt = FILE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise PredictError(f"--out {out}: the file name must end in {' or '.join(FILE_FORMATS)} (the output format)")
    return fmt


def _six(p: float) -> str:
    return f"{p:.6f}"


def format_csv(results: Sequence[TagResult], classes: Sequence[str]) -> str:
    """The CSV text (header and one row per result)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "tags", "error", *classes])
    for r in results:
        values = [_six(r.probabilities[c]) for c in classes] if r.error is None else [""] * len(classes)
        writer.writerow([r.name, TAG_SEPARATOR.join(r.tags), r.error or "", *values])
    return buf.getvalue()


def format_jsonl(results: Sequence[TagResult], classes: Sequence[str]) -> str:
    """The JSON Lines text (one object per result)."""
    lines = []
    for r in results:
        probabilities = {c: float(_six(r.probabilities[c])) for c in classes} if r.error is None else {}
        record = {"path": r.name, "tags": list(r.tags), "error": r.error, "probabilities": probabilities}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def format_line(result: TagResult) -> str:
    """One readable line (no line end) for standard output."""
    if result.error is not None:
        return f"{result.name}\terror: {result.error}" + (f" ({result.detail})" if result.detail else "")
    shown = " ".join(f"{t}:{result.probabilities[t]:.3f}" for t in result.tags)
    return f"{result.name}\t{shown or NO_TAGS}"


def format_results(results: Sequence[TagResult], classes: Sequence[str], fmt: str) -> str:
    """The whole text of `results` in `fmt` ("csv", "jsonl" or "text")."""
    if fmt == "csv":
        return format_csv(results, classes)
    if fmt == "jsonl":
        return format_jsonl(results, classes)
    if fmt == "text":
        return "".join(format_line(r) + "\n" for r in results)
    raise ValueError(f"unknown tag output format {fmt!r}")
