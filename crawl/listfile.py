"""Parse and validate an input URL list (JD headerless CSV, or a CSV/TSV with a header) before anything is downloaded.

Formats, detected automatically:

- JD format: headerless CSV ``id,url[,f1,...,fK]`` with flags 0/1 in class order (a test list has no flags).
- A CSV or TSV with a header row that has a ``url`` column, an optional ``id`` column (without it the id of a row
  is its URL, which is unique and stable), and labels either as a ``labels`` column (class names separated by
  spaces or ``|``) or as one 0/1 column per class (then every column other than ``id`` and ``url`` is a class).

The whole file is checked first; every problem is reported as ``FILE:LINE: what is wrong``.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

MAX_REPORTED_ERRORS = 50  # beyond this the rest are summarised: a broken 1M-line file should not flood the terminal
_LABEL_SPLIT = re.compile(r"[\s|]+")


class ListError(ValueError):
    """The list (or the classes file) is invalid; ``errors`` holds one ``FILE:LINE: what is wrong`` per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        shown = self.errors[:MAX_REPORTED_ERRORS]
        more = len(self.errors) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more error(s)"] if more else [])))


@dataclass(frozen=True)
class ListItem:
    """One entry of the list: its id, URL, 0/1 labels in class order (empty when unlabelled) and source line."""

    id: str
    url: str
    labels: tuple[int, ...]
    line: int


@dataclass(frozen=True)
class ParsedList:
    """A validated list: class names (empty when unlabelled), items in input order, and the detected format."""

    classes: list[str]
    items: list[ListItem]
    format: str  # "jd" or "header"
    delimiter: str

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def read_classes_file(path: str | Path) -> list[str]:
    """Class names from a file with one per line (blank lines ignored); raises ListError on duplicates or emptiness."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ListError([f"{path}: cannot read the classes file: {exc.strerror or exc}"]) from exc
    classes: list[str] = []
    seen: dict[str, int] = {}
    errors: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            errors.append(f"{path}:{number}: class '{name}' repeats (first on line {seen[name]})")
            continue
        seen[name] = number
        classes.append(name)
    if not classes and not errors:
        errors.append(f"{path}: no class names (expected one per line)")
    if errors:
        raise ListError(errors)
    return classes


def _records(text: str, delimiter: str):
    """Yield (line_number, fields) for every non-blank CSV record, with the line the record starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    previous_end = 0
    while True:
        start = previous_end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ListError([f"{{file}}:{reader.line_num}: malformed CSV ({exc})"]) from exc
        previous_end = reader.line_num
        stripped = [f.strip() for f in fields]
        if any(stripped):
            yield start, stripped


def _is_header(fields: list[str]) -> bool:
    return any(f.lower() == "url" for f in fields)


def _check_id_url(where: str, item_id: str | None, url: str, errors: list[str]) -> bool:
    """Report an empty id and an empty url of one row, in that order; True when the row has both.

    `item_id` is None for a headered list without an id column: there the id is the URL and only the URL is checked.
    """
    empty = [name for name, value in (("id", item_id), ("url", url)) if value == ""]
    errors.extend(f"{where}: empty {name}" for name in empty)
    return not empty


_FLAG_VALUES = {"0": 0, "1": 1}


def _flags(values: list[str]) -> tuple[int, ...] | None:
    """The 0/1 flags as ints, or None if any is something else (then `_check_flag` reports each)."""
    try:
        return tuple(map(_FLAG_VALUES.__getitem__, values))
    except KeyError:
        return None


def _check_flag(value: str, where: str, column: str, errors: list[str]) -> int:
    if value not in ("0", "1"):
        errors.append(f"{where}: flag for '{column}' is {value!r}, expected 0 or 1")
        return 0
    return int(value)


def parse_list(path: str | Path, classes_path: str | Path | None = None) -> ParsedList:
    """Read and validate a URL list; raise ListError listing every problem (``FILE:LINE: what is wrong``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM spreadsheets write
    except UnicodeDecodeError as exc:
        raise ListError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    except OSError as exc:
        raise ListError([f"{path}: cannot read the list: {exc.strerror or exc}"]) from exc
    given_classes = read_classes_file(classes_path) if classes_path is not None else None

    first_line = next((line for line in text.splitlines() if line.strip()), None)
    if first_line is None:
        raise ListError([f"{path}: the list is empty"])
    delimiter = "\t" if "\t" in first_line else ","
    try:
        records = list(_records(text, delimiter))
    except ListError as exc:
        raise ListError([e.replace("{file}", str(path)) for e in exc.errors]) from None

    if _is_header(records[0][1]):
        classes, items, errors = _parse_headered(path, records, given_classes, classes_path)
        fmt = "header"
    else:
        classes, items, errors = _parse_jd(path, records, given_classes, classes_path)
        fmt = "jd"
    if not errors and not items:
        errors.append(f"{path}: the list has a header but no rows")
    errors += _check_duplicates(path, items)
    if errors:
        raise ListError(sorted(errors, key=lambda message: _line_of(message, path)))
    return ParsedList(classes=classes, items=_dedupe(items), format=fmt, delimiter=delimiter)


def _parse_jd(path, records, given_classes, classes_path):
    errors: list[str] = []
    n_fields = len(records[0][1])
    if n_fields < 2:
        errors.append(f"{path}:{records[0][0]}: expected at least 2 fields (id,url), found {n_fields}")
        return [], [], errors
    n_flags = n_fields - 2
    if given_classes is not None:
        if len(given_classes) != n_flags:
            errors.append(
                f"{path}:{records[0][0]}: {n_flags} flag column(s) but {classes_path} names "
                f"{len(given_classes)} class(es)"
            )
            return [], [], errors
        classes = list(given_classes)
    else:
        classes = [f"class_{k}" for k in range(1, n_flags + 1)]
    items: list[ListItem] = []
    for line, fields in records:
        flags = _flags(fields[2:])
        if len(fields) == n_fields and fields[0] and fields[1] and flags is not None:  # the usual row, checked fast
            items.append(ListItem(id=fields[0], url=fields[1], labels=flags, line=line))
            continue
        where = f"{path}:{line}"
        if len(fields) != n_fields:
            shape = "id,url,flags" if n_flags else "id,url"
            errors.append(f"{where}: expected {n_fields} fields ({shape}), found {len(fields)}")
            continue
        _check_id_url(where, fields[0], fields[1], errors)
        for k, v in enumerate(fields[2:]):
            _check_flag(v, where, classes[k], errors)
    return classes, items, errors


def _parse_headered(path, records, given_classes, classes_path):
    errors: list[str] = []
    header_line, header = records[0]
    lowered = [h.lower() for h in header]
    for name in set(lowered):
        if name and lowered.count(name) > 1:
            errors.append(f"{path}:{header_line}: column '{name}' appears {lowered.count(name)} times in the header")
    if any(not h for h in header):
        errors.append(f"{path}:{header_line}: empty column name in the header")
    if errors:
        return [], [], errors
    col = {name: i for i, name in enumerate(lowered)}
    url_col, id_col, labels_col = col["url"], col.get("id"), col.get("labels")
    flag_cols = [i for i, name in enumerate(lowered) if name not in ("id", "url")] if labels_col is None else []

    if labels_col is not None:
        classes = list(given_classes) if given_classes is not None else []
    elif flag_cols:
        names = [header[i] for i in flag_cols]
        if given_classes is not None:
            if len(given_classes) != len(names):
                errors.append(
                    f"{path}:{header_line}: {len(names)} class column(s) but {classes_path} names "
                    f"{len(given_classes)} class(es)"
                )
                return [], [], errors
            missing = [c for c in given_classes if c not in names]
            if missing:
                errors.append(f"{path}:{header_line}: no column for class(es) {', '.join(missing)} of {classes_path}")
                return [], [], errors
            # Put the flag columns in the order the classes file gives.
            flag_cols = [flag_cols[names.index(c)] for c in given_classes]
            classes = list(given_classes)
        else:
            classes = names
    else:
        if given_classes is not None:
            errors.append(f"{path}:{header_line}: the list has no label columns but --classes was given")
            return [], [], errors
        classes = []

    raw_items: list[tuple[int, str, str, list[str] | tuple[int, ...]]] = []
    n_fields = len(header)
    for line, fields in records[1:]:
        where = f"{path}:{line}"
        if len(fields) != n_fields:
            errors.append(f"{where}: expected {n_fields} fields like the header, found {len(fields)}")
            continue
        url = fields[url_col]
        given_id = fields[id_col] if id_col is not None else None
        bad = not _check_id_url(where, given_id, url, errors)
        item_id = given_id if given_id is not None else url
        if labels_col is not None:
            names = [n for n in _LABEL_SPLIT.split(fields[labels_col]) if n]
            if given_classes is not None:
                unknown = [n for n in names if n not in given_classes]
                if unknown:
                    errors.append(f"{where}: unknown class(es) {', '.join(unknown)} (not in {classes_path})")
                    bad = True
            if not bad:
                raw_items.append((line, item_id, url, names))
        else:
            values = [fields[i] for i in flag_cols]
            flags = tuple(_check_flag(v, where, classes[k], errors) for k, v in enumerate(values))
            if not bad and all(v in ("0", "1") for v in values):
                raw_items.append((line, item_id, url, flags))

    if labels_col is not None and given_classes is None:
        classes = sorted({n for _, _, _, names in raw_items for n in names})
        if not classes and not errors:
            errors.append(f"{path}:{header_line}: the 'labels' column names no class in any row")
    items = []
    for line, item_id, url, labels in raw_items:
        if labels_col is not None:
            present = set(labels)
            labels = tuple(int(c in present) for c in classes)
        items.append(ListItem(id=item_id, url=url, labels=tuple(labels), line=line))
    return classes, items, errors


def _line_of(message: str, path: Path) -> int:
    """The line number of a `FILE:LINE: ...` message (0 for whole-file messages), to report errors in file order."""
    rest = message[len(str(path)) + 1 :] if message.startswith(f"{path}:") else ""
    number = rest.split(":", 1)[0]
    return int(number) if number.isdigit() else 0


def _check_duplicates(path: Path, items: list[ListItem]) -> list[str]:
    """An id may repeat only with the same URL and labels (then the repeat is ignored)."""
    errors = []
    first: dict[str, ListItem] = {}
    for item in items:
        seen = first.setdefault(item.id, item)
        if seen is item:
            continue
        if seen.url != item.url:
            errors.append(f"{path}:{item.line}: id '{item.id}' repeats line {seen.line} with a different url")
        elif seen.labels != item.labels:
            errors.append(f"{path}:{item.line}: id '{item.id}' repeats line {seen.line} with different labels")
    return errors


def _dedupe(items: list[ListItem]) -> list[ListItem]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item.id not in seen:
            seen.add(item.id)
            out.append(item)
    return out
