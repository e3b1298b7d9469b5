"""train.data: decode/resize, unreadable files skipped and named, order and labels, shuffling, augmentation, cache."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from tests.datagen import make_data_dir
from train.data import (
    SkipLog,
    _transforms,
    affine_maps,
    augment_batch,
    decode_resize,
    load_image,
    make_dataset,
    parse_augment,
    resample,
)
from train.preprocess import preprocess

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """14 images of 90x80 px: 12 readable, then one corrupt and one missing file."""
    return make_data_dir(tmp_path_factory.mktemp("data"), n=14, n_classes=3, corrupt=1, missing=1, seed=5)


def _paths(fx) -> list[str]:
    return [str(fx.root / "images" / f"{i}.jpg") for i in fx.ids]


def _expected(path: str, size: int = SIZE) -> np.ndarray:
    return preprocess(load_image(tf.constant(path), size)[0], "inception").numpy()


def test_load_image_reads_rgb_and_flags_bad_files(tmp_path, data):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), rgb[:, :, ::-1])  # OpenCV writes BGR
    image, ok = load_image(tf.constant(str(tmp_path / "x.png")), 40)
    assert bool(ok) and image.dtype == tf.float32
    np.testing.assert_array_equal(image.numpy(), rgb.astype(np.float32))  # same size: pixels exactly, in RGB order

    image, ok = load_image(tf.constant(_paths(data)[0]), SIZE)
    assert bool(ok) and image.shape == (SIZE, SIZE, 3)
    values = image.numpy()
    assert values.min() >= 0 and values.max() <= 255 and (values == np.round(values)).all()
    for bad in (data.corrupt_ids[0], data.missing_ids[0]):
        image, ok = load_image(tf.constant(str(data.root / "images" / f"{bad}.jpg")), SIZE)
        assert not bool(ok) and not image.numpy().any()
    # Inside a tf.data map (graph mode) too, without raising.
    in_graph = tf.data.Dataset.from_tensor_slices(_paths(data)[-3:]).map(lambda p: load_image(p, SIZE))
    flags = [bool(ok) for _, ok in in_graph]
    assert flags == [True, False, False]
    with pytest.raises(tf.errors.NotFoundError):
        decode_resize(tf.constant(str(tmp_path / "nope.jpg")), SIZE)


def test_evaluation_sees_every_readable_image_once_in_order(data):
    paths = _paths(data)
    skips = SkipLog(len(paths))
    ds = make_dataset(paths, data.labels, image_size=SIZE, preprocessing="inception", batch_size=5, training=False,
                      skips=skips)
    batches = list(ds)
    assert [int(b[0].shape[0]) for b in batches] == [5, 5, 2]  # 12 readable images, the last batch partial
    assert skips.take() == [12, 13] and skips.skipped() == list(range(14))  # take() clears the flags
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(labels, data.labels[:12])
    for i in range(12):
        np.testing.assert_array_equal(images[i], _expected(paths[i]))
    unlabelled = make_dataset(paths, None, image_size=SIZE, preprocessing="inception", batch_size=5, training=False)
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in unlabelled]), images)


def test_evaluation_pads_the_last_batch_to_a_multiple_of_the_replicas(data):
    """12 readable images in batches of 5 over 5 replicas: 5, 5, 2 plain; padded, the last batch gets 3 zero rows
    (images and labels) after its 2 real ones, and nothing else changes; training batches are never padded."""
    paths = _paths(data)
    settings = dict(image_size=SIZE, preprocessing="inception", batch_size=5, training=False)
    plain = list(make_dataset(paths, data.labels, **settings))
    padded = list(make_dataset(paths, data.labels, pad_to_multiple=5, **settings))
    assert [int(b[0].shape[0]) for b in plain] == [5, 5, 2]
    assert [int(b[0].shape[0]) for b in padded] == [5, 5, 5]
    for (images, labels), (p_images, p_labels) in zip(plain, padded, strict=True):
        n = int(images.shape[0])
        np.testing.assert_array_equal(p_images[:n], images)
        np.testing.assert_array_equal(p_labels[:n], labels)
        assert not np.asarray(p_images[n:]).any() and not np.asarray(p_labels[n:]).any()
    assert [int(b.shape[0]) for b in make_dataset(paths, None, pad_to_multiple=5, **settings)] == [5, 5, 5]
    training = make_dataset(paths, data.labels, image_size=SIZE, preprocessing="inception", batch_size=4,
                            training=True, pad_to_multiple=3)
    assert [int(b[0].shape[0]) for b in training] == [4, 4, 4]


def test_training_batches_are_full_shuffled_by_seed_and_epoch_and_keep_labels(data):
    paths = _paths(data)
    n = len(paths)
    identity = np.eye(n, dtype=np.float32)  # label = one-hot index, to check each image arrives with its own label
    epoch = tf.Variable(0, dtype=tf.int64)
    skips = SkipLog(n)

    def run(seed=0):
        ds = make_dataset(paths, identity, image_size=SIZE, preprocessing="inception", batch_size=4, training=True,
                          augment=(), seed=seed, epoch=epoch, skips=skips)
        batches = list(ds)
        assert [int(b[0].shape[0]) for b in batches] == [4, 4, 4]  # 12 readable // 4, remainder dropped
        order = [int(np.argmax(row)) for b in batches for row in b[1].numpy()]
        for b in batches:
            for image, label in zip(b[0].numpy(), b[1].numpy(), strict=True):
                np.testing.assert_array_equal(image, _expected(paths[int(np.argmax(label))]))
        return order

    first = run()
    assert sorted(first) == list(range(12)) and first != list(range(12))
    assert skips.take() == [12, 13]
    assert run() == first  # same seed and epoch: same order
    epoch.assign(1)
    second = run()
    assert second != first and sorted(second) == list(range(12))
    epoch.assign(0)
    assert run(seed=1) != first


def test_augment_batch_flip_rot90_translate_rotate():
    rng = np.random.default_rng(1)
    s = 33  # odd: the centre pixel is a pixel
    images = tf.constant(rng.integers(0, 256, (6, s, s, 3), dtype=np.uint8))
    src = images.numpy()
    seed = tf.constant([3, 4], tf.int64)

    flipped = augment_batch(images, ("flip",), seed).numpy()
    kinds = [("same" if (o == i).all() else "mirror" if (o == i[:, ::-1]).all() else "other")
             for o, i in zip(flipped, src, strict=True)]
    assert "other" not in kinds and {"same", "mirror"} == set(kinds)

    turned = augment_batch(images, ("rot90",), seed).numpy()
    ks = [[k for k in range(4) if (o == np.rot90(i, k)).all()] for o, i in zip(turned, src, strict=True)]
    assert all(len(k) == 1 for k in ks) and len({k[0] for k in ks}) > 1

    shifted = augment_batch(images, ("translate",), seed).numpy()
    limit = int(np.ceil(0.1 * s))
    inner = (slice(limit, -limit), slice(limit, -limit))
    for o, i in zip(shifted, src, strict=True):
        matches = [(dy, dx) for dy in range(-limit, limit + 1) for dx in range(-limit, limit + 1)
                   if (o[inner] == np.roll(i, (dy, dx), axis=(0, 1))[inner]).all()]
        assert len(matches) == 1  # an integer shift of at most 10% (nearest sampling), interior pixels exact

    rotated = augment_batch(images, ("rotate",), seed).numpy()
    c = s // 2
    np.testing.assert_array_equal(rotated[:, c, c], src[:, c, c])  # rotation about the centre keeps the centre
    # A draw within ~1.7 degrees can be a no-op at 33 px.
    assert sum((o != i).any() for o, i in zip(rotated, src, strict=True)) >= 5
    assert set(np.unique(rotated)) <= set(np.unique(src))  # nearest sampling: no new pixel values

    everything = ("flip", "translate", "rotate", "rot90")
    np.testing.assert_array_equal(augment_batch(images, everything, seed), augment_batch(images, everything, seed))
    other_seed = augment_batch(images, everything, seed + 1).numpy()
    assert (augment_batch(images, everything, seed).numpy() != other_seed).any()
    np.testing.assert_array_equal(augment_batch(images, (), seed).numpy(), src)


def test_augmented_pipeline_repeats_within_an_epoch_and_changes_across(data):
    paths = _paths(data)[:12]
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = make_dataset(paths, data.labels[:12], image_size=SIZE, preprocessing="inception", batch_size=4, training=True,
                      augment=("flip", "translate", "rotate"), epoch=epoch)
    first = np.concatenate([b[0].numpy() for b in ds])
    np.testing.assert_array_equal(first, np.concatenate([b[0].numpy() for b in ds]))
    epoch.assign(1)
    assert (first != np.concatenate([b[0].numpy() for b in ds])).any()
    assert first.min() >= -1.0 and first.max() <= 1.0  # inception preprocessing after augmentation


def test_cache_memory_and_dir_give_the_same_images_and_skip_decoding(tmp_path):
    fx = make_data_dir(tmp_path / "data", n=9, n_classes=2, corrupt=1, seed=2)
    paths = _paths(fx)
    common = dict(image_size=SIZE, preprocessing="inception", batch_size=4, training=False)
    plain = np.concatenate([b[0].numpy() for b in make_dataset(paths, fx.labels, **common)])
    memory = make_dataset(paths, fx.labels, cache="memory", **common)
    for _ in range(2):
        np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in memory]), plain)
    skips = SkipLog(len(paths))
    on_disk = make_dataset(paths, fx.labels, cache=str(tmp_path / "cache"), skips=skips, cache_tag="val", **common)
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in on_disk]), plain)
    assert skips.take() == [8]
    assert any(p.name.startswith("val-32px-") for p in (tmp_path / "cache").iterdir())
    for p in paths[:-1]:
        Path(p).unlink()  # later passes and new pipelines over the same files read the cache, not the JPEGs
    again = make_dataset(paths, fx.labels, cache=str(tmp_path / "cache"), skips=skips, cache_tag="val", **common)
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in again]), plain)
    assert skips.take() == [8]
    train = make_dataset(paths, fx.labels, cache="memory", **{**common, "training": True})
    assert sum(int(b[0].shape[0]) for b in train) == 0  # the files are gone and this cache is new: all skipped


def test_arguments_are_checked():
    assert parse_augment("none") == () and parse_augment("flip, rot90,flip") == ("flip", "rot90")
    with pytest.raises(ValueError, match="unknown augmentation zoom"):
        parse_augment("flip,zoom")
    with pytest.raises(ValueError, match="none"):
        parse_augment("none,flip")
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(["a.jpg"], None, image_size=SIZE, preprocessing="inception", batch_size=0, training=False)
    with pytest.raises(ValueError, match="SkipLog has size 3"):
        make_dataset(["a.jpg"], None, image_size=SIZE, preprocessing="inception", batch_size=1, training=False,
                     skips=SkipLog(3))


def test_augmentation_matches_opencv_warp_and_fuses_the_preprocessing():
    """The XLA resampling against an independent one: cv2.warpAffine, nearest, reflected borders, same maps."""
    rng = np.random.default_rng(5)
    s = 64
    images = tf.constant(rng.integers(0, 256, (8, s, s, 3), dtype=np.uint8))
    seed = tf.constant([7, 8], tf.int64)
    augment = ("flip", "translate", "rotate")
    ours = augment_batch(images, augment, seed).numpy()
    maps = _transforms(8, s, augment, seed).numpy()  # output pixel -> input pixel, rows of a 2x3 matrix
    for image, affine, mine in zip(images.numpy(), maps, ours, strict=True):
        reference = cv2.warpAffine(image, affine.reshape(2, 3), (s, s), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REFLECT)
        # Pixels whose source lies exactly halfway between two pixels may round either way in either library.
        assert (reference != mine).any(axis=-1).mean() < 0.002
    fused = augment_batch(images, augment, seed, preprocessing="inception").numpy()
    assert fused.dtype == np.float32
    np.testing.assert_allclose(fused, ours.astype(np.float32) / 127.5 - 1.0, atol=1e-6)


def test_resample_by_fixed_maps_keeps_the_dtype_and_repeats_the_edge():
    """`resample` with maps from `affine_maps` (what prediction's TTA views use) against numpy references."""
    rng = np.random.default_rng(9)
    s = 9
    for dtype in (np.uint8, np.float32):
        x = rng.integers(0, 256, (2, s, s, 3)).astype(dtype)

        def moved(x=x, dtype=dtype, **kw):
            out = resample(tf.constant(x), tf.tile(affine_maps(s, **kw)[None], [2, 1])).numpy()
            assert out.dtype == dtype
            return out

        np.testing.assert_array_equal(moved(), x)
        np.testing.assert_array_equal(moved(flip=-1.0), x[:, :, ::-1])
        # Content 2 px right and 1 px up; uncovered pixels mirror the image with its edge repeated.
        padded = np.pad(x, [(0, 0), (1, 1), (2, 2), (0, 0)], mode="symmetric")
        np.testing.assert_array_equal(moved(shift_x=2.0, shift_y=-1.0), padded[:, 2 : 2 + s, 0:s])
        # A quarter turn (cos 0, sin 1: clockwise on screen, as y points down) maps pixels onto pixels.
        np.testing.assert_array_equal(moved(cos=0.0, sin=1.0), np.rot90(x, -1, axes=(1, 2)))
    with pytest.raises(ValueError, match="square images"):
        resample(tf.zeros([1, 4, 5, 3]), tf.zeros([1, 6]))
