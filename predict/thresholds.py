"""Decision thresholds: `--threshold 0.5|tuned|FLOAT` parsed, resolved to one value per class, and applied.

`tuned` takes the per-class thresholds each RUN_DIR's metrics.json stores (tuned on validation for F2) and
averages them over the runs of an ensemble; a number applies to every class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from predict.errors import PredictError
from predict.runs import Run

TUNED = "tuned"
DEFAULT_THRESHOLD = "0.5"  # as in the reference entry


def parse_threshold(text: str) -> str:
    """Validate a --threshold value: 'tuned' or a number in [0, 1]; returns its canonical text (kept in reports)."""
    text = str(text).strip()
    if text.lower() == TUNED:
        return TUNED
    try:
        value = float(text)
    except ValueError:
        raise PredictError(f"--threshold must be 'tuned' or a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise PredictError(f"--threshold must be between 0 and 1, got {value}")
    return repr(value)


def resolve_thresholds(spec: str, runs: Sequence[Run]) -> np.ndarray:
    """One threshold per class (in the runs' class order) for a `parse_threshold` result: the number, or the tuned
    ones averaged over runs."""
    n_classes = len(runs[0].classes)
    if spec == TUNED:
        return np.mean([run.tuned_thresholds for run in runs], axis=0)
    return np.full(n_classes, float(spec), dtype=np.float64)


def apply_thresholds(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 flags (int8): a class is predicted when its probability reaches its threshold (p >= t)."""
    return (np.asarray(probabilities) >= np.asarray(thresholds)[None, :]).astype(np.int8)
