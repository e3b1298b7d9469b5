"""Write a submission: one row per id of the test list, in list order, as JD flags, a CSV with header, or probabilities.

Formats (see submissions/README.md):

- ``jd`` (default): no header, ``id,f1,...,fK`` with 0/1 flags in class order: the JD AI Fashion Challenge format.
- ``csv``: header ``id,<class names>``, then 0/1 flags.
- ``proba``: header ``id,<class names>``, then probabilities with 6 decimals.

Lines end with ``\\n``; fields are quoted only when an id needs it (csv module, minimal quoting). The file is
written atomically, after every prediction succeeded, so a failed run leaves an earlier submission intact.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_text
from crawl.manifest import LIST_FILE, read_data_dir
from predict.engines import DEFAULT_ENGINE, DEFAULT_PRECISION, check_engine, check_precision
from predict.errors import PredictError
from predict.inference import DEFAULT_BATCH_SIZE, predict_ensemble
from predict.options import check_batch_size, check_beam, check_choice, check_runs
from predict.runs import load_runs
from predict.thresholds import DEFAULT_THRESHOLD, apply_thresholds, parse_threshold, resolve_thresholds
from predict.tta import check_tta

FORMATS = ("jd", "csv", "proba")
MISSING_MODES = ("error", "fill")
_LISTED = 20


@dataclass(frozen=True, kw_only=True)
class SubmitConfig:
    """Settings of `python -m predict submit`; `resolve()` checks them (`submit` calls it)."""

    runs: tuple[Path, ...]
    data: Path
    out: Path
    tta: int = 1
    threshold: str = DEFAULT_THRESHOLD
    format: str = "jd"
    batch_size: int = DEFAULT_BATCH_SIZE
    missing: str = "error"
    progress: bool = True
    beam: int = 1  # rnn runs: beam width of the decoder (1 = greedy, as trained and validated)
    engine: str = DEFAULT_ENGINE  # keras, openvino or onnx (predict.engines)
    precision: str = DEFAULT_PRECISION  # f32, or bf16 with the openvino engine on a CPU that has it

    def resolve(self) -> SubmitConfig:
        """A copy with every option checked and the threshold in canonical form; raises PredictError."""
        out = Path(self.out)
        if out.is_dir():
            raise PredictError(f"--out {out} is a directory; give a file name such as submissions/NAME.csv")
        return dataclasses.replace(
            self,
            runs=check_runs(self.runs),
            data=Path(self.data),
            out=out,
            tta=check_tta(self.tta),
            threshold=parse_threshold(self.threshold),
            format=check_choice("--format", self.format, FORMATS),
            batch_size=check_batch_size(self.batch_size),
            beam=check_beam(self.beam),
            engine=check_engine(self.engine),
            precision=check_precision(self.precision, self.engine),
            missing=check_choice("--missing", self.missing, MISSING_MODES),
        )


@dataclass(frozen=True)
class SubmitResult:
    """What `submit` wrote."""

    out: Path
    rows: int
    format: str
    thresholds: np.ndarray = field(repr=False)
    filled_ids: list[str] = field(default_factory=list)  # ids without an image: no crawl result, or undecodable

    def summary(self) -> str:
        text = f"wrote {self.out}: {self.rows} rows ({self.format})"
        if self.filled_ids:
            shown = ", ".join(self.filled_ids[:_LISTED]) + (" ..." if len(self.filled_ids) > _LISTED else "")
            text += f"; {len(self.filled_ids)} id(s) had no usable image and were filled: {shown}"
        return text


def format_submission(
    ids: Sequence[str],
    classes: Sequence[str],
    probabilities: np.ndarray,
    thresholds: np.ndarray,
    fmt: str,
    filled: np.ndarray | None = None,
    fill_probabilities: np.ndarray | None = None,
) -> str:
    """The submission text for `ids` (rows in that order) given their probabilities, in format `fmt` (of FORMATS).

    Rows where `filled` is True get zero flags, or `fill_probabilities` (the training prevalence) in `proba`.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(ids), len(classes)):
        raise ValueError(f"probabilities have shape {probabilities.shape}, expected {(len(ids), len(classes))}")
    filled = np.zeros(len(ids), dtype=bool) if filled is None else np.asarray(filled, dtype=bool)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if fmt != "jd":
        writer.writerow(["id", *classes])
    if fmt == "proba":
        if filled.any():
            if fill_probabilities is None:
                raise ValueError("fill_probabilities are needed to fill probability rows")
            probabilities = probabilities.copy()
            probabilities[filled] = np.asarray(fill_probabilities, dtype=np.float64)
        for id_, row in zip(ids, probabilities, strict=True):
            writer.writerow([id_, *(f"{p:.6f}" for p in row)])
    else:
        flags = apply_thresholds(probabilities, thresholds)
        flags[filled] = 0
        for id_, row in zip(ids, flags, strict=True):
            writer.writerow([id_, *(str(int(f)) for f in row)])
    return buf.getvalue()


def _missing_message(data, missing: list[str], n_ids: int) -> str:
    reasons = {}
    if len(data.failed):
        reasons = dict(zip(data.failed["id"], data.failed["reason"], strict=True))
    shown = [f"{i} ({reasons[i]})" if reasons.get(i) else i for i in missing[:_LISTED]]
    more = len(missing) - len(shown)
    return (
        f"{len(missing)} of {n_ids} ids of {data.root / LIST_FILE} have no image: {', '.join(shown)}"
        + (f", ... and {more} more" if more > 0 else "")
        + ". Re-run the crawl on this list to fetch them again (it retries the failed ids), "
        "or pass --missing fill to write rows of zeros (training prevalence in --format proba) for them."
    )


def submit(config: SubmitConfig) -> SubmitResult:
    """Predict every id of the DATA_DIR's list with the ensemble of runs and write the submission atomically."""
    config = config.resolve()
    fill = config.missing == "fill"
    # The DATA_DIR first: reading it is cheap, loading models is not.
    data = read_data_dir(config.data)
    ids = [str(i) for i in data.items["id"]]
    missing = data.missing_ids
    if missing and not fill:
        raise PredictError(_missing_message(data, missing, len(ids)))

    runs = load_runs(config.runs, beam=config.beam, engine=config.engine, precision=config.precision)
    classes = runs[0].classes
    thresholds = resolve_thresholds(config.threshold, runs)  # before predicting: a bad option fails at once
    prevalence = np.mean([r.class_prevalence for r in runs], axis=0) if fill and config.format == "proba" else None

    path_of = dict(zip(data.manifest["id"], data.image_paths(), strict=True))
    stored = [i for i, id_ in enumerate(ids) if id_ in path_of]
    prediction = predict_ensemble(
        runs,
        [path_of[ids[i]] for i in stored],
        ids=[ids[i] for i in stored],
        tta=config.tta,
        batch_size=config.batch_size,
        progress=config.progress,
        unreadable="keep" if fill else "error",
    )
    probabilities = np.zeros((len(ids), len(classes)), dtype=np.float64)
    probabilities[stored] = prediction.probabilities
    filled = np.ones(len(ids), dtype=bool)
    filled[stored] = ~prediction.readable
    text = format_submission(ids, classes, probabilities, thresholds, config.format, filled, prevalence)
    atomic_write_text(config.out, text)
    return SubmitResult(
        out=config.out,
        rows=len(ids),
        format=config.format,
        thresholds=thresholds,
        filled_ids=[ids[i] for i in np.flatnonzero(filled)],
    )
