"""The tf.data input pipeline: the one decode/resize used by training, validation and prediction, plus augmentation.

`decode_resize` is the one copy of read, decode and resize to a square of `image_size` pixels. `load_image` wraps it
so that it never raises (an unreadable or corrupt file gives zeros and ok=False). `make_dataset` builds the whole
pipeline: parallel read and decode, optional cache of the decoded images, skipping (and recording, by index) the
files that failed, shuffling and augmentation for training only, the backbone's preprocessing, batching, prefetch.

Randomness (the shuffle order and the augmentation of each image) is a pure function of (seed, epoch, position),
so a run resumed after a kill sees the same epochs as an uninterrupted one; the caller passes the epoch as a
`tf.Variable` that a Keras callback advances. With a cache, the order within an epoch comes from a seeded shuffle
buffer instead (the decoded images cannot be gathered at random), which a resumed run does not replay exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from train.preprocess import preprocess

AUGMENTATIONS = ("flip", "translate", "rotate", "rot90")
DEFAULT_AUGMENT = ("flip", "translate", "rotate")
_PARALLEL = tf.data.AUTOTUNE
MAX_TRANSLATE = 0.1  # fraction of the image side
MAX_ROTATE_DEGREES = 15.0
CACHE_SHUFFLE_BUFFER = 1024  # decoded images held for shuffling when --cache is on (uint8, ~270 KB each at 299 px)


def pipeline_options() -> tf.data.Options:
    """The tf.data options of the input pipelines (training, validation, prediction): model-based autotuning off.

    On a machine with few cores tf.data's autotuner can leave whole passes over the data running on a fraction of
    the cores; with it off every pass runs at the parallelism it asks for. The benchmarks use the same options, so
    their figures describe these pipelines.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def parse_augment(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Turn "flip,translate" (or a list of names) into a tuple of known augmentation names; "none" gives ()."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["none"] or not names:
        return ()
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or "none" in names:
        bad = ", ".join(unknown) if unknown else "none (it cannot be combined with others)"
        raise ValueError(f"unknown augmentation {bad}; known: {', '.join(AUGMENTATIONS)}, none")
    return tuple(dict.fromkeys(names))  # keep order, drop repeats


def decode_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read, decode and resize one image to float32 0..255; raises a TF error for a missing or corrupt file.

    The one copy of decode and resize: `load_image` wraps it for single calls, `make_dataset` maps it and drops
    the elements that raised (cheaper per image than a per-element fallback).
    """
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    # Rounded to whole pixel values, as an 8-bit resized image would be: the cache can then keep uint8 losslessly,
    # so cached and uncached runs (and prediction) see exactly the same pixels.
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def resize_rule(image_size: int) -> dict:
    """`decode_resize` described for a consumer without this code (predict's tagger.json beside an export)."""
    return {
        "decode": "tf.io.decode_image(channels=3, expand_animations=False): JPEG, PNG, GIF (first frame) or BMP as "
        "8-bit RGB, EXIF orientation ignored; the crawl stores every image already converted (8-bit RGB JPEG or "
        "PNG, alpha composited over white, EXIF orientation applied)",
        "size": [image_size, image_size],
        "keep_aspect_ratio": False,
        "method": "bilinear",
        "antialias": True,
        "implementation": f"tf.image.resize(image, [{image_size}, {image_size}], method='bilinear', antialias=True)",
        "then": "round to whole values (half to even), clip to 0..255, float32",
    }


def load_image(path: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Read, decode and resize one image file to (image_size, image_size, 3) float32 in 0..255.

    Returns (image, ok); ok is False (and the image zeros) when the file is missing, unreadable or corrupt.
    Works eagerly and inside tf.data/tf.function: the decode runs in a one-element dataset whose errors are
    dropped, so a bad file falls through to the zero image instead of raising.
    """
    path = tf.convert_to_tensor(path, tf.string)
    decoded = (
        tf.data.Dataset.from_tensors(path)
        .map(lambda p: (decode_resize(p, image_size), tf.constant(True)))
        .ignore_errors()
    )
    fallback = tf.data.Dataset.from_tensors((tf.zeros([image_size, image_size, 3], tf.float32), tf.constant(False)))
    image, ok = decoded.concatenate(fallback).take(1).get_single_element()
    return tf.ensure_shape(image, [image_size, image_size, 3]), ok


class SkipLog:
    """Which inputs of a dataset were skipped as unreadable during the current pass over it.

    The pipeline flags every input index it delivers; after a complete pass the unflagged indices are the files
    that could not be read. `take()` returns them and clears the flags for the next pass (a Keras callback calls
    it at the end of each epoch).
    """

    def __init__(self, size: int):
        self.size = size
        with tf.device("/cpu:0"):
            self._delivered = tf.Variable(tf.zeros([max(size, 1)], tf.int32), trainable=False, name="delivered")

    def mark_delivered(self, index: tf.Tensor) -> tf.Tensor:
        """Flag one input index as read (inside the pipeline); returns the index so it can sit in a map."""
        update = self._delivered.scatter_update(tf.IndexedSlices(tf.ones([1], tf.int32), tf.reshape(index, [1])))
        with tf.control_dependencies([update]):
            return tf.identity(index)

    def delivered(self) -> list[int]:
        """Indices read so far in this pass, ascending."""
        return [int(i) for i in np.flatnonzero(self._delivered.numpy()[: self.size])]

    def skipped(self) -> list[int]:
        """Indices not read in this pass (meaningful after a complete pass), ascending."""
        return [int(i) for i in np.flatnonzero(self._delivered.numpy()[: self.size] == 0)]

    def take(self) -> list[int]:
        """The skipped indices of the pass just finished; clears the flags for the next pass."""
        skipped = self.skipped()
        self.reset()
        return skipped

    def reset(self) -> None:
        self._delivered.assign(tf.zeros_like(self._delivered))


def _cache_file(cache_dir: str, paths: Sequence[str], image_size: int, tag: str) -> str:
    """A cache file name that changes whenever the images or the size change, so a stale cache is never reused."""
    digest = hashlib.sha256(f"{image_size}\n".encode() + "\n".join(paths).encode()).hexdigest()[:16]
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    prefix = os.path.join(cache_dir, f"{tag}-{image_size}px-{digest}")
    # A killed run leaves TF's lock file behind, which makes every later run fail; the cache is only finalised
    # after a complete pass, so an orphaned lock means an unfinished, unusable cache.
    for leftover in Path(cache_dir).glob(f"{Path(prefix).name}*.lockfile"):
        leftover.unlink(missing_ok=True)
    return prefix


def affine_maps(
    size: int,
    *,
    flip: tf.Tensor | float = 1.0,
    cos: tf.Tensor | float = 1.0,
    sin: tf.Tensor | float = 0.0,
    shift_x: tf.Tensor | float = 0.0,
    shift_y: tf.Tensor | float = 0.0,
    crop: tf.Tensor | float = 1.0,
) -> tf.Tensor:
    """Affine maps from output pixel to input pixel, rows (a00, a01, b0, a10, a11, b1), for `resample`.

    The forward map, in coordinates centred on the image of side `size`, is u_out = t + R F u_in / crop: first the
    mirror F (flip -1 mirrors left-right, 1 keeps), then the rotation R = [[cos, -sin], [sin, cos]], then a zoom
    that makes the central `crop` fraction of the side fill the image, then the shift t = (shift_x, shift_y) in
    pixels (+ is right and down). Its inverse is u_in = crop F R^T (u_out - t), because F is its own inverse and
    rotations invert by transposing. Each argument is a number or a tensor of shape [B]; the result has shape
    [B, 6], or [6] when all are numbers. Training's augmentation and prediction's TTA views both build their maps
    here, so they move pixels and fill borders by the same rule.
    """
    flip, cos, sin, shift_x, shift_y, crop = (
        tf.convert_to_tensor(v, tf.float32) for v in (flip, cos, sin, shift_x, shift_y, crop)
    )
    # A = crop F R^T = crop [[f c, f s], [-s, c]] (F negates the x row).
    a00, a01, a10, a11 = flip * cos * crop, flip * sin * crop, -sin * crop, cos * crop
    centre = (size - 1) / 2.0
    x0, y0 = centre + shift_x, centre + shift_y
    # x_in = A (x_out - centre - t) + centre
    b0 = centre - a00 * x0 - a01 * y0
    b1 = centre - a10 * x0 - a11 * y0
    parts = [a00, a01, b0, a10, a11, b1]
    shape = tf.shape(parts[0])
    for part in parts[1:]:
        shape = tf.broadcast_dynamic_shape(shape, tf.shape(part))
    return tf.stack([tf.broadcast_to(part, shape) for part in parts], axis=-1)


def _transforms(batch: tf.Tensor, size: int, augment: tuple[str, ...], seed: tf.Tensor) -> tf.Tensor:
    """Random per-image maps [B, 6] for the named augmentations, drawn from the stateless seed `seed`.

    One map per image does all the named augmentations in a single resampling pass.
    """
    return _maps_from_draws(tf.random.stateless_uniform([batch, 5], seed=seed), size, augment)


def _maps_from_draws(u: tf.Tensor, size: int, augment: tuple[str, ...]) -> tf.Tensor:
    """The maps [B, 6] of the named augmentations for uniform draws u in [0, 1) of shape [B, 5].

    Columns of u: mirror (below 0.5 mirrors), rotation angle, quarter turn, shift in x, shift in y; an augmentation
    that is not named ignores its column.
    """
    batch = tf.shape(u)[0]
    ones, zeros = tf.ones([batch]), tf.zeros([batch])
    flip = tf.where(u[:, 0] < 0.5, -ones, ones) if "flip" in augment else ones
    theta = (u[:, 1] * 2.0 - 1.0) * (MAX_ROTATE_DEGREES * math.pi / 180.0) if "rotate" in augment else zeros
    if "rot90" in augment:
        k = tf.minimum(tf.cast(u[:, 2] * 4.0, tf.int32), 3)
        cos90 = tf.gather([1.0, 0.0, -1.0, 0.0], k)  # exact values: quarter turns map pixels onto pixels
        sin90 = tf.gather([0.0, 1.0, 0.0, -1.0], k)
    else:
        cos90, sin90 = ones, zeros
    shift = (u[:, 3:5] * 2.0 - 1.0) * (MAX_TRANSLATE * size) if "translate" in augment else tf.zeros([batch, 2])
    # R(theta) R90(k) = [[c, -s], [s, c]]
    c = tf.cos(theta) * cos90 - tf.sin(theta) * sin90
    s = tf.sin(theta) * cos90 + tf.cos(theta) * sin90
    return affine_maps(size, flip=flip, cos=c, sin=s, shift_x=shift[:, 0], shift_y=shift[:, 1])


def _source_pixel(coordinate: tf.Tensor, size: int) -> tf.Tensor:
    """The nearest pixel to each continuous coordinate (pixel centres at integers), reflected at the borders.

    Reflection repeats the edge pixel (-1 -> 0, size -> size - 1), as OpenCV's BORDER_REFLECT and Keras's
    "reflect" fill do; it holds for coordinates within one image side of the image, far beyond what the
    augmentations reach, and anything further is clamped to the edge.
    """
    v = coordinate + 0.5  # pixel k now covers [k, k + 1)
    v = size - tf.abs(size - tf.abs(v))  # mirror about 0 and about size
    return tf.clip_by_value(tf.cast(v, tf.int32), 0, size - 1)  # v >= 0 here, so the cast is a floor


def resample(images: tf.Tensor, transforms: tf.Tensor, preprocessing: str | None = None) -> tf.Tensor:
    """Nearest-neighbour resampling of square images [B, S, S, C] by per-image affine maps [B, 6] (`affine_maps`).

    A map takes an output pixel to the input pixel it shows (cv2.warpAffine's WARP_INVERSE_MAP); pixels it places
    outside the image are filled by reflection that repeats the edge pixel (cv2's BORDER_REFLECT). The result
    keeps the dtype of `images`, or with `preprocessing` is the backbone's float32 input, computed in the same pass.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4 or images.shape[1] is None or images.shape[1] != images.shape[2]:
        raise ValueError(f"resample needs a batch of square images of static size [B, S, S, C], got {images.shape}")
    return _resample(images, tf.convert_to_tensor(transforms, tf.float32), preprocessing)


@tf.function(jit_compile=True)
def _resample(images: tf.Tensor, transforms: tf.Tensor, preprocessing: str | None) -> tf.Tensor:
    # Compiled with XLA, which fuses the index arithmetic, the gather and the preprocessing into one loop over the
    # output pixels.
    size = images.shape[1]
    r = tf.range(size, dtype=tf.float32)
    t = transforms[:, :, None, None]  # [B, 6, 1, 1]: broadcast against rows (y) and columns (x)
    x = t[:, 0] * r[None, None, :] + t[:, 1] * r[None, :, None] + t[:, 2]
    y = t[:, 3] * r[None, None, :] + t[:, 4] * r[None, :, None] + t[:, 5]
    index = _source_pixel(y, size) * size + _source_pixel(x, size)  # [B, S, S] into the flattened image
    shape = tf.shape(images)
    flat = tf.reshape(images, [shape[0], size * size, shape[3]])
    moved = tf.reshape(tf.gather(flat, tf.reshape(index, [shape[0], -1]), batch_dims=1), shape)
    return moved if preprocessing is None else preprocess(moved, preprocessing)


def augment_batch(
    images: tf.Tensor, augment: Sequence[str], seed: tf.Tensor, preprocessing: str | None = None
) -> tf.Tensor:
    """Randomly augment a batch of square uint8 RGB images [B, S, S, 3]; `seed` is a stateless seed of shape [2].

    Returns uint8 images, or with `preprocessing` the backbone's float32 input (augmentation and preprocessing
    in one pass). Nearest-neighbour sampling, torchvision's default for its random rotations and affines: flips,
    quarter turns and integer shifts are exact, and no new pixel values appear. Borders are filled by
    reflection, so no black corners appear.
    """
    augment = tuple(augment)
    if not augment:
        return images if preprocessing is None else preprocess(images, preprocessing)
    return resample(images, _transforms(tf.shape(images)[0], images.shape[1], augment, seed), preprocessing)


def make_dataset(
    paths: Sequence[str],
    labels: np.ndarray | None,
    *,
    image_size: int,
    preprocessing: str,
    batch_size: int,
    training: bool,
    augment: Sequence[str] = (),
    cache: str | None = None,
    seed: int = 0,
    epoch: tf.Variable | None = None,
    skips: SkipLog | None = None,
    cache_tag: str = "images",
    pad_to_multiple: int = 1,
) -> tf.data.Dataset:
    """The input pipeline: yields (images, labels) batches, or images alone when `labels` is None.

    training=True shuffles, augments and drops the last partial batch; training=False keeps the input order and
    yields every readable image exactly once. Unreadable files are skipped; pass a `SkipLog` to learn which (by
    index into `paths`). `cache` is None, "memory" or a folder for the decoded, resized images. `epoch` (an int64
    tf.Variable, advanced by the caller) keys the shuffle and the augmentation so that they depend only on
    (seed, epoch); without it every pass draws a new seeded key.

    `pad_to_multiple` (evaluation only): a batch whose size is not a multiple of it (with a batch size that is one:
    only the last batch) gets zero images (and zero labels) appended up to one, so that a MirroredStrategy with that
    many replicas never hands a replica an empty batch (TensorFlow fails on one: tests/test_keras_workarounds.py).
    The padding rows come last; the caller drops the predictions past the readable images (SkipLog.delivered()).
    """
    paths = [str(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise ValueError("make_dataset: no images given")
    if labels is not None and len(labels) != n:
        raise ValueError(f"make_dataset: {n} paths but {len(labels)} label rows")
    if batch_size < 1:
        raise ValueError(f"make_dataset: batch_size must be at least 1, got {batch_size}")
    augment = parse_augment(augment) if training else ()
    label_array = np.zeros([n, 0], np.float32) if labels is None else np.asarray(labels, np.float32)
    seed = int(seed)

    path_table, label_table = tf.constant(paths), tf.constant(label_array)
    if training and cache is None:
        # Shuffle the (cheap) file list before decoding: a full shuffle with no buffer of decoded images.
        if epoch is not None:
            indices, pick = tf.data.Dataset.range(n), lambda i: _permuted(i, n, seed, epoch)
        else:
            indices, pick = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True), tf.identity
    else:
        # In order for evaluation; for training with a cache, one fixed seeded permutation is cached and a
        # shuffle buffer mixes it anew each epoch.
        order = np.random.default_rng(seed).permutation(n) if training else np.arange(n)
        indices, pick = tf.data.Dataset.from_tensor_slices(order.astype(np.int64)), tf.identity
    # Without a cache or augmentation the preprocessing runs here, per image, while the image is still in the CPU
    # cache; otherwise images stay uint8 (4x smaller to cache and batch) and are preprocessed later.
    preprocess_now = cache is None and not augment

    def decode(i):
        index = pick(i)
        image = decode_resize(tf.gather(path_table, index), image_size)
        image = preprocess(image, preprocessing) if preprocess_now else tf.cast(image, tf.uint8)
        return image, tf.gather(label_table, index), index

    # A file that fails to read or decode raises inside the map and its element is dropped; `skips` learns which.
    ds = indices.map(decode, num_parallel_calls=_PARALLEL).ignore_errors()
    if cache is not None:
        ds = ds.cache("" if cache == "memory" else _cache_file(cache, paths, image_size, cache_tag))
        if training:
            ds = ds.shuffle(min(n, CACHE_SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    if skips is not None and skips.size != n:
        raise ValueError(f"make_dataset: SkipLog has size {skips.size}, expected {n}")

    def deliver(image, label, index):
        if skips is not None:
            with tf.control_dependencies([skips.mark_delivered(index)]):
                image = tf.identity(image)
        if not augment and not preprocess_now:
            image = preprocess(image, preprocessing)
        return image, label

    ds = ds.map(deliver, num_parallel_calls=_PARALLEL).batch(batch_size, drop_remainder=training)
    if augment:
        # The augmentation draws of a batch depend on (seed, epoch) and the batch number only, so a resumed run
        # repeats them; the augmentation and the preprocessing are one pass over the batch.
        def augment_and_preprocess(step, images, label, key):
            return augment_batch(images, augment, tf.stack([key * 1_000_003 + seed, step]), preprocessing), label

        if epoch is not None:
            ds = ds.enumerate().map(lambda step, batch: augment_and_preprocess(step, *batch, epoch.read_value()),
                                    num_parallel_calls=_PARALLEL)
        else:
            keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
            ds = tf.data.Dataset.zip((ds.enumerate(), keys)).map(
                lambda numbered, key: augment_and_preprocess(numbered[0], *numbered[1], key),
                num_parallel_calls=_PARALLEL)
    if pad_to_multiple > 1 and not training:
        ds = ds.map(lambda images, label: _pad_batch(images, label, pad_to_multiple))
    if labels is None:
        ds = ds.map(lambda images, label: images)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())


def _pad_batch(images: tf.Tensor, labels: tf.Tensor, multiple: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Zero rows appended to a batch up to the next multiple of `multiple` rows (none when it already is one)."""
    extra = tf.math.floormod(-tf.shape(images)[0], multiple)
    pad_images = tf.concat([[[0, extra]], tf.zeros([tf.rank(images) - 1, 2], tf.int32)], axis=0)
    return tf.pad(images, pad_images), tf.pad(labels, [[0, extra], [0, 0]])


def _permuted(i: tf.Tensor, n: int, seed: int, epoch: tf.Variable) -> tf.Tensor:
    """Position i of a permutation of range(n) that depends only on (seed, epoch)."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch.read_value(), tf.int64)])
    return tf.random.experimental.index_shuffle(i, seed=key, max_index=n - 1)
