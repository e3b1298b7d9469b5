"""Exact multi-label metrics in numpy: per-class average precision, mAP, F-beta (per sample, per class), thresholds.

Average precision follows scikit-learn's `average_precision_score` exactly: AP = sum over distinct score thresholds
(highest first) of (R_n - R_{n-1}) * P_n, so tied scores enter together as one step. mAP is the mean over the
classes with at least one positive (AP is undefined without positives: NaN here, left out of the mean).
"""

from __future__ import annotations

import numpy as np

THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)  # candidate per-class thresholds for tuning


def _as_matrices(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_score = y_true[:, None], y_score.reshape(-1, 1)
    if y_true.shape != y_score.shape:
        raise ValueError(f"labels have shape {y_true.shape} but scores have shape {y_score.shape}")
    if not np.isin(y_true, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(y_score).all():
        raise ValueError("scores contain NaN or infinity")
    return y_true, y_score


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision of one class (1-D arrays); NaN when there is no positive."""
    y_true, y_score = _as_matrices(y_true, y_score)
    y_true, y_score = y_true[:, 0], y_score[:, 0]
    n_pos = y_true.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-y_score, kind="mergesort")
    scores, hits = y_score[order], y_true[order]
    # The last position of each run of equal scores: a threshold admits a whole run of ties at once.
    ends = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tp = np.cumsum(hits)[ends]
    precision = tp / (ends + 1)
    recall_steps = np.diff(np.r_[0.0, tp]) / n_pos
    return float(np.sum(recall_steps * precision))


def per_class_average_precision(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """AP of each column (class); NaN for classes without a positive."""
    y_true, y_score = _as_matrices(y_true, y_score)
    return np.array([average_precision(y_true[:, k], y_score[:, k]) for k in range(y_true.shape[1])])


def mean_average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Macro mean of per-class AP over the classes with at least one positive (NaN when none has one).

    Equals sklearn.metrics.average_precision_score(y_true[:, keep], y_score[:, keep], average="macro").
    """
    ap = per_class_average_precision(y_true, y_score)
    kept = ap[~np.isnan(ap)]
    return float(kept.mean()) if kept.size else float("nan")


def _fbeta(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float, zero_division: float) -> np.ndarray:
    """The one F-beta formula, from counts: (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp); `zero_division` where
    the denominator is 0 (no true and no predicted label)."""
    b2 = beta * beta
    denom = (1 + b2) * tp + b2 * fn + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(denom > 0, (1 + b2) * tp / np.where(denom > 0, denom, 1), zero_division)
    return score


def _counts(y_true: np.ndarray, y_pred: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, fn) of 0/1 predictions, summed along `axis` (1: per sample, 0: per class)."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels have shape {y_true.shape} but predictions have shape {y_pred.shape}")
    return (y_true & y_pred).sum(axis=axis), (~y_true & y_pred).sum(axis=axis), (y_true & ~y_pred).sum(axis=axis)


def fbeta_samples(y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0, zero_division: float = 0.0) -> float:
    """Samples-averaged F-beta of 0/1 predictions, as sklearn's fbeta_score(average="samples").

    A sample with no true and no predicted label scores `zero_division` (sklearn's default gives 0).
    """
    return float(_fbeta(*_counts(y_true, y_pred, axis=1), beta, zero_division).mean())


def fbeta_per_class(
    y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0, zero_division: float = 0.0
) -> np.ndarray:
    """F-beta of each class (column) of 0/1 predictions, as sklearn's fbeta_score(average=None).

    A class with no true and no predicted label scores `zero_division`.
    """
    return _fbeta(*_counts(y_true, y_pred, axis=0), beta, zero_division).astype(np.float64)


def f2_samples(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Samples-averaged F2 of 0/1 predictions (sklearn's fbeta_score(beta=2, average="samples"))."""
    return fbeta_samples(y_true, y_pred, beta=2.0)


def tune_thresholds(
    y_true: np.ndarray, y_score: np.ndarray, beta: float = 2, grid: np.ndarray = THRESHOLD_GRID, rounds: int = 3
) -> np.ndarray:
    """Per-class thresholds (from `grid`) that maximise the samples-averaged F-beta of `y_score >= threshold`.

    Coordinate ascent from 0.5: each class in turn gets the grid value that is best given the others' current
    thresholds, for up to `rounds` passes or until nothing changes. Ties keep the current value if it is among the
    best, else take the lowest best value, so the result is deterministic.
    """
    y_true, y_score = _as_matrices(y_true, y_score)
    truth = y_true.astype(bool)
    grid = np.asarray(grid, dtype=np.float64)
    thresholds = np.full(y_true.shape[1], 0.5)
    pred = y_score >= thresholds
    for _ in range(rounds):
        changed = False
        for k in range(y_true.shape[1]):
            others = np.delete(np.arange(y_true.shape[1]), k)
            tp_o = (truth[:, others] & pred[:, others]).sum(axis=1)[:, None]
            fp_o = (~truth[:, others] & pred[:, others]).sum(axis=1)[:, None]
            fn_o = (truth[:, others] & ~pred[:, others]).sum(axis=1)[:, None]
            cand = y_score[:, k : k + 1] >= grid[None, :]  # samples x candidates
            t = truth[:, k : k + 1]
            f = _fbeta(tp_o + (t & cand), fp_o + (~t & cand), fn_o + (t & ~cand), beta, 0.0).mean(axis=0)
            best = np.flatnonzero(np.isclose(f, f.max(), rtol=0, atol=1e-12))
            current = np.flatnonzero(np.isclose(grid, thresholds[k]))
            choice = grid[current[0]] if current.size and current[0] in best else grid[best[0]]
            if choice != thresholds[k]:
                thresholds[k] = choice
                pred[:, k] = y_score[:, k] >= choice
                changed = True
        if not changed:
            break
    return thresholds


_BCE_EPSILON = 1e-7  # the probability clip of keras.losses.binary_crossentropy


def binary_crossentropy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean binary cross-entropy over all labels, with Keras's clipping of probabilities to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(y_prob, np.float64), _BCE_EPSILON, 1.0 - _BCE_EPSILON)
    y = np.asarray(y_true, np.float64)
    return float(np.mean(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))))
