"""train.split: the --val-split is stratified per class, seeded, reproducible, and a partition of the images."""

from __future__ import annotations

import numpy as np
import pytest

from train.split import stratified_split


def _labels(n=300, c=6, seed=0):
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.5, 0.3, 0.15, 0.08, 0.04, 0.02])[:c]
    return (rng.random((n, c)) < prevalence).astype(int)


def test_split_partitions_and_is_reproducible():
    y = _labels()
    train, val = stratified_split(y, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(y)
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert abs(len(val) - 60) <= 3
    again = stratified_split(y, 0.2, seed=3)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, stratified_split(y, 0.2, seed=4)[1])


def test_every_class_keeps_its_share_even_rare_ones():
    y = _labels()
    _, val = stratified_split(y, 0.2, seed=0)
    expected = 0.2 * y.sum(axis=0)
    got = y[val].sum(axis=0)
    assert (np.abs(got - expected) <= 1.0).all(), (got, expected)
    # A plain random split of the same size typically misses the rare classes' share by much more.
    rng = np.random.default_rng(0)
    random_misses = [np.abs(y[rng.permutation(len(y))[: len(val)]].sum(axis=0) - expected).max() for _ in range(50)]
    worst_random = np.mean(random_misses)
    assert worst_random > 2.0


def test_single_class_and_bad_fractions():
    y = np.array([[1], [0], [0], [1], [0], [1], [0], [0], [1], [0]])
    train, val = stratified_split(y, 0.4, seed=0)
    assert len(val) == 4 and y[val].sum() == 2
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split(y, 1.0)
    with pytest.raises(ValueError, match="leaves no training"):
        stratified_split(y[:1], 0.5)
