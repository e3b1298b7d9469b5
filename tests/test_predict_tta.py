"""Test-time augmentation: the views are the documented ones, deterministic and resampled exactly as training's
augmentation resamples (same borders), --tta 1 is plain prediction exactly, all views of a batch go through the
model in one call, and the view probabilities are averaged."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tensorflow as tf

from predict.errors import PredictError
from predict.inference import image_dataset, predict_run
from predict.runs import load_run
from predict.tta import MAX_TTA, TTA_VIEWS, apply_view, average_views, check_tta, shift_pixels, tta_views
from tests.predict_fixtures import conv_model, make_data_dir, make_run_dir, textured
from train.data import MAX_TRANSLATE, _maps_from_draws, augment_batch, load_image, make_dataset, resample
from train.preprocess import preprocess

VIEW = {v.name: v for v in TTA_VIEWS}


def _batch(b=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, size, size, 3)).astype(np.float32)


def _np_shift(x, dy, dx):
    # Independent reference: numpy's 'symmetric' padding repeats the edge pixel, as cv2's BORDER_REFLECT and
    # training's augmentation do (numpy's 'reflect', like tf.pad's REFLECT, would not repeat it).
    h, w = x.shape[1:3]
    p = np.pad(x, [(0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)], mode="symmetric")
    return p[:, abs(dy) - dy : abs(dy) - dy + h, abs(dx) - dx : abs(dx) - dx + w]


def _cv2_warp(x, matrix):
    # Independent reference: OpenCV, output pixel -> input pixel, nearest, borders reflected with the edge repeated.
    size = x.shape[1]
    return np.stack([cv2.warpAffine(im, np.asarray(matrix, np.float64), (size, size), flags=cv2.INTER_NEAREST
                                    | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT) for im in x])


def _training_draws(batch, size, dx=0, dy=0, flip=False):
    """Uniform draws that make training's augmentation do exactly this shift (in pixels) and mirror."""
    u = np.full((batch, 5), 0.5, np.float32)
    u[:, 0] = 0.0 if flip else 0.75
    u[:, 3] = (dx / (MAX_TRANSLATE * size) + 1) / 2
    u[:, 4] = (dy / (MAX_TRANSLATE * size) + 1) / 2
    return tf.constant(u)


def test_view_list_is_the_documented_one():
    names = [v.name for v in TTA_VIEWS]
    assert names[:8] == [
        "identity",
        "flip",
        "shift_down_right",
        "shift_down_right_flip",
        "shift_up_left",
        "shift_up_left_flip",
        "zoom_center",
        "zoom_center_flip",
    ]
    assert names[8:] == ["shift_down_left", "shift_down_left_flip", "shift_up_right", "shift_up_right_flip"]
    assert len(set(names)) == len(names) == MAX_TTA == 12
    assert check_tta(1) == 1 and check_tta(MAX_TTA) == MAX_TTA and check_tta(np.int64(3)) == 3
    for bad in (0, MAX_TTA + 1, 2.5, True, "2"):
        with pytest.raises(PredictError, match=f"--tta must be an integer from 1 to {MAX_TTA} "):
            check_tta(bad)


def test_views_match_independent_references():
    x = _batch(size=32)
    s = shift_pixels(32)
    assert s == 2
    views = {v.name: apply_view(tf.constant(x), v).numpy() for v in TTA_VIEWS}
    assert all(v.dtype == np.float32 for v in views.values())  # the float 0..255 batch stays float
    np.testing.assert_array_equal(views["identity"], x)
    np.testing.assert_array_equal(views["flip"], x[:, :, ::-1])
    for name, (dy, dx) in {"shift_down_right": (s, s), "shift_up_left": (-s, -s), "shift_down_left": (s, -s),
                           "shift_up_right": (-s, s)}.items():
        np.testing.assert_array_equal(views[name], _np_shift(x, dy, dx), err_msg=name)
        np.testing.assert_array_equal(views[name], _cv2_warp(x, [[1, 0, -dx], [0, 1, -dy]]), err_msg=name)
    # Content really moved: the pixel at (10, 10) went to (10 + s, 10 + s); the border repeats the edge pixel:
    # rows 1 and 0 of the view are rows 0 and 1 of the image.
    np.testing.assert_array_equal(views["shift_down_right"][:, 10 + s, 10 + s], x[:, 10, 10])
    np.testing.assert_array_equal(views["shift_down_right"][:, 1, s:], x[:, 0, :-s])
    np.testing.assert_array_equal(views["shift_down_right"][:, 0, s:], x[:, 1, :-s])
    # Zoom: the central 7/8 scaled to the full 32 px, nearest neighbour about the centre (15.5): OpenCV with the
    # same map (its sample points, multiples of 1/16, are never halfway between pixels, so both round alike).
    c = 15.5 * (1 - 7 / 8)
    np.testing.assert_array_equal(views["zoom_center"], _cv2_warp(x, [[7 / 8, 0, c], [0, 7 / 8, c]]))
    assert set(np.unique(views["zoom_center"])) <= set(np.unique(x))  # nearest: no new pixel values
    # Every odd view is the mirror of the view before it.
    for even, odd in zip(TTA_VIEWS[0::2], TTA_VIEWS[1::2], strict=True):
        np.testing.assert_array_equal(views[odd.name], views[even.name][:, :, ::-1])


@pytest.mark.parametrize("size", [32, 24, 299])
def test_views_equal_training_augmentation_with_the_same_shift_and_mirror(size):
    """One resampling: a TTA view shows the model exactly what training's augmentation shows it for that shift."""
    x = _batch(b=2, size=size, seed=size)
    s = shift_pixels(size)
    for name, dy, dx, flip in [
        ("flip", 0, 0, True),
        ("shift_down_right", s, s, False),
        ("shift_up_left", -s, -s, False),
        ("shift_down_left", s, -s, False),
        ("shift_up_right", -s, s, False),
        # view = mirror of the shifted image = training's mirror, then the mirrored shift
        ("shift_down_right_flip", s, -s, True),
        ("shift_up_right_flip", -s, -s, True),
    ]:
        maps = _maps_from_draws(_training_draws(2, size, dx, dy, flip), size, ("flip", "translate"))
        trained = resample(tf.constant(x), maps).numpy()
        np.testing.assert_array_equal(apply_view(tf.constant(x), VIEW[name]).numpy(), trained, err_msg=name)
    # The random training flip is the flip view: each image a seed mirrors is exactly the flip view's image.
    images = tf.constant(_batch(b=8, size=size, seed=1).astype(np.uint8))
    flipped = augment_batch(images, ("flip",), tf.constant([3, 4], tf.int64)).numpy()
    mirror = apply_view(images, VIEW["flip"]).numpy()
    assert mirror.dtype == np.uint8  # the resampler keeps the dtype it is given
    kinds = ["mirror" if (f == m).all() else "same" if (f == i).all() else "other"
             for f, m, i in zip(flipped, mirror, images.numpy(), strict=True)]
    assert sorted(set(kinds)) == ["mirror", "same"]


def test_tta_views_stacked_view_major_and_deterministic():
    x = _batch(b=2)
    a = tta_views(tf.constant(x), 4).numpy()
    b = tta_views(tf.constant(x), 4).numpy()
    assert a.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    for k, view in enumerate(TTA_VIEWS[:4]):
        np.testing.assert_array_equal(a[2 * k : 2 * k + 2], apply_view(tf.constant(x), view).numpy())
    np.testing.assert_array_equal(tta_views(tf.constant(x), 1).numpy(), x)
    # All 12 views in one resampling call equal the views one by one.
    every = tta_views(tf.constant(x), MAX_TTA).numpy()
    for k, view in enumerate(TTA_VIEWS):
        np.testing.assert_array_equal(every[2 * k : 2 * k + 2], apply_view(tf.constant(x), view).numpy())


def test_average_views_undoes_stacking():
    scores = np.arange(12, dtype=np.float32).reshape(6, 2)  # 3 views x 2 images
    np.testing.assert_array_equal(average_views(scores, 3), [[4.0, 5.0], [6.0, 7.0]])
    with pytest.raises(ValueError, match="do not split"):
        average_views(scores, 4)


@pytest.fixture(scope="module")
def textured_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    images = {f"t{i}": textured(i) for i in range(5)}
    data = make_data_dir(root / "data", images)
    run = load_run(make_run_dir(root / "run", conv_model(24, seed=1)))
    paths = [str(data / "images" / f"{i}.jpg") for i in images]
    return run, paths


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_tta_1_equals_plain_prediction_exactly(textured_run):
    run, paths = textured_run
    ours = predict_run(run, paths, tta=1, batch_size=2, progress=False).probabilities
    # Plain prediction as training's own evaluation pipeline does it.
    plain = run.model.predict(
        make_dataset(paths, None, image_size=24, preprocessing="inception", batch_size=2, training=False), verbose=0
    )
    np.testing.assert_array_equal(ours, plain)
    assert ours.shape == (5, 3)


def test_views_batched_in_one_call_per_batch_and_averaged(textured_run, monkeypatch):
    run, paths = textured_run
    calls = []
    original = run.model.predict_on_batch

    def counting(x):
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(run.model, "predict_on_batch", counting)
    pred = predict_run(run, paths, tta=4, batch_size=2, progress=False)
    # 5 images in batches of 2: three calls, each with all 4 views of its images.
    assert calls == [(8, 24, 24, 3), (8, 24, 24, 3), (4, 24, 24, 3)]

    # Independent reference: each view of all images scored separately, then the mean.
    images = tf.stack([load_image(tf.constant(p), 24)[0] for p in paths])
    per_view = [original(preprocess(apply_view(images, v), "inception")) for v in TTA_VIEWS[:4]]
    np.testing.assert_allclose(pred.probabilities, np.mean(per_view, axis=0), rtol=1e-5, atol=1e-6)
    # The views matter for this position-sensitive model: TTA is not a no-op here.
    assert np.abs(pred.probabilities - np.asarray(per_view[0])).max() > 1e-4
    # Deterministic: the same call gives the same numbers. A warm-up (for speed figures) scores zeros of both
    # batch shapes first, outside the timed loop, and changes nothing.
    calls.clear()
    again = predict_run(run, paths, tta=4, batch_size=2, progress=False, warmup=True)
    np.testing.assert_array_equal(again.probabilities, pred.probabilities)
    assert calls == [(8, 24, 24, 3), (4, 24, 24, 3), (8, 24, 24, 3), (8, 24, 24, 3), (4, 24, 24, 3)]


def test_image_dataset_builds_views_before_preprocessing(textured_run):
    _, paths = textured_run
    (x, ok), = list(image_dataset(paths[:2], image_size=24, preprocessing="raw", batch_size=2, tta=2))
    raw = tf.stack([load_image(tf.constant(p), 24)[0] for p in paths[:2]]).numpy()
    np.testing.assert_array_equal(x.numpy(), np.concatenate([raw, raw[:, :, ::-1]]))
    assert ok.numpy().tolist() == [True, True]
