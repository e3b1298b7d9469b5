"""Evaluate runs (or an ensemble) on a labelled DATA_DIR: mAP, samples-averaged F2 and per-class AP, F2, support.

mAP, per-class AP and samples F2 are train.metrics' functions, the ones training reports, so a validation
mAP and an evaluation mAP mean the same thing. Images the list names but the crawl did not store are left out
and counted; an image that cannot be decoded is an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_json
from crawl.manifest import read_data_dir
from predict.engines import DEFAULT_ENGINE, DEFAULT_PRECISION, check_engine, check_precision
from predict.errors import PredictError
from predict.inference import DEFAULT_BATCH_SIZE, predict_ensemble
from predict.options import check_batch_size, check_beam, check_runs
from predict.runs import load_runs
from predict.thresholds import DEFAULT_THRESHOLD, apply_thresholds, parse_threshold, resolve_thresholds
from predict.tta import check_tta
from train.metrics import f2_samples, fbeta_per_class, mean_average_precision, per_class_average_precision


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Settings of `python -m predict evaluate`; `resolve()` checks them (`evaluate` calls it)."""

    runs: tuple[Path, ...]
    data: Path
    tta: int = 1
    threshold: str = DEFAULT_THRESHOLD
    out: Path | None = None  # JSON report; printed only when None
    batch_size: int = DEFAULT_BATCH_SIZE
    progress: bool = True
    beam: int = 1  # rnn runs: beam width of the decoder (1 = greedy, as trained and validated)
    engine: str = DEFAULT_ENGINE  # keras, openvino or onnx (predict.engines)
    precision: str = DEFAULT_PRECISION  # f32, or bf16 with the openvino engine on a CPU that has it

    def resolve(self) -> EvaluateConfig:
        """A copy with every option checked and the threshold in canonical form; raises PredictError."""
        return dataclasses.replace(
            self,
            runs=check_runs(self.runs),
            data=Path(self.data),
            tta=check_tta(self.tta),
            threshold=parse_threshold(self.threshold),
            out=None if self.out is None else Path(self.out),
            batch_size=check_batch_size(self.batch_size),
            beam=check_beam(self.beam),
            engine=check_engine(self.engine),
            precision=check_precision(self.precision, self.engine),
        )


@dataclass(frozen=True)
class LabelledImages:
    """The stored images of a labelled DATA_DIR with labels in a given class order."""

    ids: list[str]
    paths: list[str]
    labels: np.ndarray  # (n_images, n_classes) 0/1
    missing_ids: list[str]  # list ids without a stored image (left out of the evaluation)


def load_labelled(data_path: str | Path, classes: Sequence[str]) -> LabelledImages:
    """Stored images and labels of a labelled DATA_DIR, labels reordered to `classes` (the runs' order)."""
    data = read_data_dir(data_path)
    if not data.labelled:
        raise PredictError(
            f"{data.root}: this DATA_DIR has no labels (no classes.txt); evaluate needs a labelled crawl"
        )
    if set(data.classes) != set(classes):
        raise PredictError(
            f"{data.root}: its classes differ from the runs' (only in the data: "
            f"{[c for c in data.classes if c not in classes] or 'none'}; only in the runs: "
            f"{[c for c in classes if c not in data.classes] or 'none'})"
        )
    labels = data.manifest[list(classes)].to_numpy(dtype=np.int64)
    return LabelledImages(
        ids=[str(i) for i in data.manifest["id"]],
        paths=data.image_paths(),
        labels=labels,
        missing_ids=data.missing_ids,
    )


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def evaluation_report(
    y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], thresholds: np.ndarray
) -> dict:
    """{"map", "f2", "per_class": {class: {"ap", "f2", "support", "threshold"}}}; AP is null for a class without
    positives."""
    y_true = np.asarray(y_true)
    y_pred = apply_thresholds(probabilities, thresholds)
    ap = per_class_average_precision(y_true, probabilities)
    f2 = fbeta_per_class(y_true, y_pred, beta=2.0)  # 0 for a class with no positive and no prediction
    support = y_true.sum(axis=0)
    return {
        "map": float(mean_average_precision(y_true, probabilities)),
        "f2": float(f2_samples(y_true, y_pred)),
        "per_class": {
            c: {"ap": _number(ap[k]), "f2": float(f2[k]), "support": int(support[k]), "threshold": float(thresholds[k])}
            for k, c in enumerate(classes)
        },
    }


def format_report(report: dict) -> str:
    """A plain-text table of an evaluation report, for the terminal."""
    lines = [
        f"mAP {report['map']:.4f}   F2 (samples) {report['f2']:.4f}   "
        f"threshold {report.get('threshold', '?')}   tta {report.get('tta', '?')}   images {report.get('images', '?')}"
    ]
    if report.get("missing_ids"):
        lines.append(f"({len(report['missing_ids'])} listed id(s) have no image and were left out)")
    width = max([len("class")] + [len(c) for c in report["per_class"]])
    lines.append(f"{'class':<{width}}  {'AP':>7}  {'F2':>7}  {'support':>7}  {'thresh':>7}")
    for c, row in report["per_class"].items():
        ap = "    n/a" if row["ap"] is None else f"{row['ap']:7.4f}"
        lines.append(f"{c:<{width}}  {ap}  {row['f2']:7.4f}  {row['support']:7d}  {row['threshold']:7.3f}")
    return "\n".join(lines)


def evaluate(config: EvaluateConfig) -> dict:
    """Score the ensemble of `config.runs` on the labelled DATA_DIR; returns the report, written as JSON to `out`."""
    config = config.resolve()
    runs = load_runs(config.runs, beam=config.beam, engine=config.engine, precision=config.precision)
    classes = runs[0].classes
    thresholds = resolve_thresholds(config.threshold, runs)
    images = load_labelled(config.data, classes)
    if not images.ids:
        raise PredictError(f"{config.data}: no stored images to evaluate on")
    prediction = predict_ensemble(
        runs, images.paths, ids=images.ids, tta=config.tta, batch_size=config.batch_size, progress=config.progress
    )
    report = evaluation_report(images.labels, prediction.probabilities, classes, thresholds)
    report.update(
        {
            "threshold": config.threshold,
            "tta": config.tta,
            "beam": config.beam,
            "engine": config.engine,
            "precision": config.precision,
            "runs": [str(r.path) for r in runs],
            "data": str(config.data),
            "images": len(images.ids),
            "missing_ids": images.missing_ids,
            "images_per_second": prediction.images_per_second,
        }
    )
    if config.out is not None:
        atomic_write_json(config.out, report)
    return report
