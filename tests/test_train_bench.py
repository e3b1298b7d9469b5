"""bench.pipeline on a tiny workload: it times the pipeline training uses, counts every image it reads, prints
the figures it returns, and says so when the legacy baseline (tf-keras) is missing.

Nothing here depends on how fast the machine is: the checks are on what the timed datasets yield and on the
figures' bookkeeping, never on a speed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest
import tensorflow as tf

from bench.pipeline import (
    LEGACY_MISSING,
    PipelineBenchConfig,
    _print_input,
    bench_input,
    bench_labels,
    input_datasets,
    main,
    make_jpegs,
    whole_batches,
)
from train.data import DEFAULT_AUGMENT, decode_resize, make_dataset

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")

# 20 images in batches of 8: the bench times the 16 that fill whole batches, 3 times a pass.
TINY = PipelineBenchConfig(images=20, image_size=48, batch_size=8, passes=3, rounds=2, legacy_images=8,
                           skip_train=True)
TINY_FLAGS = ["--images", "20", "--image-size", "48", "--batch-size", "8", "--passes", "3", "--rounds", "2",
              "--legacy-images", "8", "--skip-train"]
HAS_TF_KERAS = importlib.util.find_spec("tf_keras") is not None
NO_TF_KERAS = "tf-keras is not installed: requirements-bench.txt has it (make install-bench), requirements-test.txt not"


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[str]:
    return make_jpegs(tmp_path_factory.mktemp("bench-jpegs"), TINY)


def _batches(ds: tf.data.Dataset) -> list[tuple[np.ndarray, ...]]:
    return [tuple(np.asarray(t) for t in (b if isinstance(b, tuple) else (b,))) for b in ds]


def test_timed_series_yield_what_training_and_decoding_yield(jpegs):
    paths = whole_batches(jpegs, TINY.batch_size)
    assert len(jpegs) == 20 and paths == jpegs[:16]
    labels = bench_labels(len(paths), TINY)
    datasets = input_datasets(paths, labels, TINY)
    assert set(datasets) == {"ceiling", "pipeline", "pipeline_no_augment"}
    decoded = np.stack([decode_resize(tf.constant(p), TINY.image_size).numpy() for p in paths])

    # ceiling: every file decoded and resized, in order, `passes` times over.
    ceiling = np.concatenate([b[0] for b in _batches(datasets["ceiling"])])
    np.testing.assert_array_equal(ceiling, np.concatenate([decoded] * TINY.passes))

    # pipeline: exactly the batches of train.data.make_dataset as training builds it (epoch variable, seed).
    timed = _batches(datasets["pipeline"])
    training = _batches(make_dataset(paths, labels, image_size=TINY.image_size, preprocessing="inception",
                                     batch_size=TINY.batch_size, training=True, augment=DEFAULT_AUGMENT,
                                     seed=TINY.seed, epoch=tf.Variable(0, dtype=tf.int64)))
    assert len(timed) == TINY.passes * len(training) == TINY.passes * 2
    for i, (x, y) in enumerate(timed):
        np.testing.assert_array_equal(x, training[i % len(training)][0])
        np.testing.assert_array_equal(y, training[i % len(training)][1])

    # pipeline_no_augment: each pass holds every image once, inception-preprocessed, next to its own labels.
    plain = _batches(datasets["pipeline_no_augment"])
    per_pass = len(plain) // TINY.passes
    expected = decoded.astype(np.float32) / 127.5 - 1.0
    for p in range(TINY.passes):
        x = np.concatenate([b[0] for b in plain[p * per_pass:(p + 1) * per_pass]])
        y = np.concatenate([b[1] for b in plain[p * per_pass:(p + 1) * per_pass]])
        assert x.shape == (16, 48, 48, 3)
        order = [int(np.argmin(np.abs(expected - image).reshape(16, -1).max(axis=1))) for image in x]
        assert sorted(order) == list(range(16))
        np.testing.assert_allclose(x, expected[order], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(y, labels[order])
    # Both pipelines draw the same order from (seed, epoch); the augmented one really changes the images.
    np.testing.assert_array_equal(timed[0][1], plain[0][1])
    assert not np.allclose(timed[0][0], plain[0][0], atol=1e-2)


def _printed_rows(out: str) -> dict[str, list[str]]:
    """The input table's rows by series name: the printed cells after the name column."""
    rows = {}
    for line in out.splitlines():
        for name in ("ceiling", "pipeline", "pipeline_no_augment", "legacy"):
            if line.startswith(f"  {name:<22}"):
                rows[name] = line[24:].split()
    return rows


def test_printed_table_shows_the_returned_figures_and_every_image_is_counted(tmp_path, capsys):
    figures = main([*TINY_FLAGS, "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert len(list(tmp_path.glob("*.jpg"))) == 20
    assert "training" not in figures
    r = figures["input"]
    for name in ("ceiling", "pipeline", "pipeline_no_augment"):
        assert r[name]["images_per_pass"] == TINY.passes * 16, name  # nothing skipped, nothing read twice
    rows = _printed_rows(out)
    series = [name for name in ("ceiling", "pipeline", "pipeline_no_augment", "legacy") if name in r]
    for name in series:
        f = r[name]
        assert rows[name] == [f"{f['images_per_second']:.1f}", f"{f['images_per_second_median']:.1f}",
                              f"{f['cpu_ms_per_image']:.2f}"], name
    for key, label in (("pipeline_vs_ceiling", "pipeline / ceiling"),
                       ("pipeline_no_augment_vs_ceiling", "pipeline, no augmentation / ceiling")):
        line = next(x for x in out.splitlines() if x.startswith(f"  {label:<38}"))
        assert line[40:].split()[:2] == [f"{r[key]:.2f}", f"{r[key + '_median_of_rounds']:.2f}"], label
    if HAS_TF_KERAS:
        assert r["legacy"]["images_per_pass"] == TINY.legacy_images and "legacy_missing" not in r
    else:
        assert "legacy" not in r and r["legacy_missing"] == LEGACY_MISSING
        assert rows["legacy"] == ["n/a:", *LEGACY_MISSING.split()]


@pytest.mark.skipif(not HAS_TF_KERAS, reason=NO_TF_KERAS)
def test_legacy_generator_reads_the_same_images_at_the_same_size(jpegs):
    from bench.pipeline import _legacy_iterator

    paths = whole_batches(jpegs, TINY.batch_size)
    labels = bench_labels(len(paths), TINY)
    x, y = next(_legacy_iterator(paths, labels, TINY))
    assert x.shape == (TINY.batch_size, 48, 48, 3) and y.shape == (TINY.batch_size, TINY.n_classes)
    assert x.min() >= -1.0 and x.max() <= 1.0  # the inception preprocessing, as the pipeline's
    assert {tuple(row) for row in y} <= {tuple(row) for row in labels}


def test_missing_tf_keras_is_reported_not_dropped(jpegs, monkeypatch, capsys):
    for name in ("tf_keras", "tf_keras.preprocessing", "tf_keras.preprocessing.image"):
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import` raise ImportError
    config = dataclasses.replace(TINY, rounds=1)
    result = bench_input(jpegs, config)
    assert "legacy" not in result and result["legacy_missing"] == LEGACY_MISSING
    _print_input(result, config)
    assert f"legacy                n/a: {LEGACY_MISSING}" in capsys.readouterr().out
    assert result["pipeline_vs_legacy"] is None and result["pipeline_vs_legacy_median_of_rounds"] is None
    assert result["pipeline"]["images_per_pass"] == TINY.passes * 16
