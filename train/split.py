"""The validation split and the k-fold split: multi-label iterative stratification (Sechidis et al., 2011), seeded
and reproducible."""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split rows of a 0/1 label matrix into (train, val) index arrays, ascending, keeping each class's share.

    The same labels, fraction and seed always give the same split. Raises ValueError when either side would be
    empty.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-split must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = int(np.ceil(val_fraction * n))
    if n < 2 or n_val < 1 or n_val >= n:
        raise ValueError(f"--val-split {val_fraction} of {n} images leaves no training or no validation images")
    y = _stratification_targets(labels)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train, val = next(splitter.split(np.zeros((n, 1)), y))
    return np.sort(train), np.sort(val)


def stratified_kfold(labels: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` (train, held-out) index pairs, ascending: every row is held out in exactly one fold, each class's share
    kept in every part (iterstrat's MultilabelStratifiedKFold, shuffled with `seed`).

    The same labels, fold count and seed always give the same folds. Raises ValueError when there are fewer rows
    than folds.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if n < folds:
        raise ValueError(f"--folds {folds} needs at least {folds} images, got {n}")
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(train), np.sort(held_out))
            for train, held_out in splitter.split(np.zeros((n, 1)), _stratification_targets(labels))]


def _stratification_targets(labels: np.ndarray) -> np.ndarray:
    """The label matrix as booleans; with one class, its complement added so the stratifier sees a multi-label
    matrix and balances both."""
    y = np.asarray(labels).astype(bool)
    n = len(y)
    if y.ndim == 1 or y.shape[1] == 1:
        y = np.column_stack([y.reshape(n, 1), ~y.reshape(n, 1)])
    return y
