"""train.metrics against scikit-learn: AP and mAP with ties and classes without positives, samples-F2, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, fbeta_score

from train.metrics import (
    average_precision,
    f2_samples,
    fbeta_per_class,
    fbeta_samples,
    mean_average_precision,
    per_class_average_precision,
    tune_thresholds,
)


def _random_case(rng, n, c, levels):
    y = (rng.random((n, c)) < 0.35).astype(int)
    # Scores rounded to a few levels: many ties, within and across classes.
    s = np.round(rng.random((n, c)) * levels) / levels
    return y, s


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_map_equals_sklearn_macro_over_classes_with_positives(levels):
    rng = np.random.default_rng(levels)
    checked = 0
    for _ in range(150):
        y, s = _random_case(rng, int(rng.integers(2, 60)), int(rng.integers(2, 7)), levels)
        keep = y.sum(axis=0) > 0
        ours = mean_average_precision(y, s)
        if not keep.any():
            assert np.isnan(ours)
            continue
        expected = average_precision_score(y[:, keep], s[:, keep], average="macro")
        assert ours == pytest.approx(expected, abs=1e-12)
        per_class = per_class_average_precision(y, s)
        assert np.isnan(per_class[~keep]).all()
        for k in np.flatnonzero(keep):
            assert per_class[k] == pytest.approx(average_precision_score(y[:, k], s[:, k]), abs=1e-12)
        checked += 1
    assert checked > 100


def test_ties_count_as_one_threshold():
    # Positives and negatives tied at the top: sklearn (and we) take them together, giving precision 1/2 there.
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.9, 0.5, 0.1])
    assert average_precision(y, s) == pytest.approx(0.5 * 0.5 + 0.5 * (2 / 3))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    # All scores tied: AP is the prevalence.
    assert average_precision(np.array([1, 0, 0, 1, 0]), np.full(5, 0.3)) == pytest.approx(0.4)


def test_class_without_positives_is_nan_and_left_out():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.8, 0.2], [0.1, 0.9], [0.7, 0.4]])
    ap = per_class_average_precision(y, s)
    assert ap[0] == 1.0 and np.isnan(ap[1])
    assert mean_average_precision(y, s) == 1.0
    assert np.isnan(mean_average_precision(np.zeros((3, 2)), s))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        mean_average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(np.ones((2, 1)), np.array([[np.nan], [0.5]]))
    with pytest.raises(ValueError, match="0 or 1"):
        mean_average_precision(np.array([[2], [0]]), np.array([[0.1], [0.5]]))


def test_f2_samples_equals_sklearn_including_empty_rows():
    rng = np.random.default_rng(3)
    for _ in range(100):
        n, c = int(rng.integers(1, 40)), int(rng.integers(2, 8))
        y = (rng.random((n, c)) < 0.3).astype(int)
        p = (rng.random((n, c)) < 0.3).astype(int)
        y[0] = 0
        p[0] = 0  # no true and no predicted label: scores zero_division
        expected = fbeta_score(y, p, beta=2, average="samples", zero_division=0)
        assert f2_samples(y, p) == pytest.approx(expected, abs=1e-12)
        assert fbeta_samples(y, p, beta=0.5, zero_division=1.0) == pytest.approx(
            fbeta_score(y, p, beta=0.5, average="samples", zero_division=1.0), abs=1e-12
        )



@pytest.mark.parametrize(("beta", "zero_division"), [(2.0, 0.0), (0.5, 1.0), (1.0, 0.0)])
def test_fbeta_per_class_equals_sklearn_including_empty_classes(beta, zero_division):
    rng = np.random.default_rng(int(beta * 10))
    for _ in range(100):
        n, c = int(rng.integers(1, 40)), int(rng.integers(3, 8))
        y = (rng.random((n, c)) < 0.3).astype(int)
        p = (rng.random((n, c)) < 0.3).astype(int)
        y[:, 0] = p[:, 0] = 0  # no true and no predicted label: scores zero_division
        y[:, 1], p[:, 1] = 0, 1  # no positive, only false positives: 0
        y[:, 2], p[:, 2] = 1, 0  # positives, none predicted: 0
        ours = fbeta_per_class(y, p, beta=beta, zero_division=zero_division)
        expected = fbeta_score(y, p, beta=beta, average=None, zero_division=zero_division)
        assert ours.shape == (c,) and ours.dtype == np.float64
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
        assert ours[0] == zero_division and ours[1] == ours[2] == 0.0
    with pytest.raises(ValueError, match="shape"):
        fbeta_per_class(np.zeros((2, 3)), np.zeros((2, 2)))

def test_tuned_thresholds_beat_or_match_half_and_are_reproducible():
    rng = np.random.default_rng(7)
    y = (rng.random((200, 5)) < 0.3).astype(int)
    # Informative but badly calibrated scores: positives around 0.3, negatives around 0.1.
    s = np.clip(0.1 + 0.2 * y + rng.normal(0, 0.08, y.shape), 0, 1)
    t = tune_thresholds(y, s)
    assert t.shape == (5,) and ((t > 0) & (t < 1)).all()
    tuned, half = f2_samples(y, s >= t), f2_samples(y, s >= 0.5)
    assert tuned > half + 0.3  # at 0.5 almost nothing is predicted
    # Coordinate ascent ends in a point no single-class change improves.
    for k in range(5):
        for alt in (0.05, 0.15, 0.25, 0.35):
            t2 = t.copy()
            t2[k] = alt
            assert f2_samples(y, s >= t2) <= tuned + 1e-12
    np.testing.assert_array_equal(t, tune_thresholds(y, s))
