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
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from train.preprocess import preprocess

AUGMENTATIONS = ("flip", "translate", "rotate", "rot90")
DEFAULT_AUGMENT = ("flip", "translate", "rotate")
_PARALLEL = tf.data.AUTOTUNE
MAX_TRANSLATE = 0.1  # fraction of the image side
MAX_ROTATE_DEGREES = 15.0
CACHE_SHUFFLE_BUFFER = 1024  # decoded images held for shuffling when --cache is on (uint8, ~270 KB each at 299 px)


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


def _transforms(batch: tf.Tensor, size: int, augment: tuple[str, ...], seed: tf.Tensor) -> tf.Tensor:
    """Per-image projective transforms (output pixel -> input pixel) for ImageProjectiveTransformV3, shape [B, 8].

    The forward map is u_out = t + R(theta) R90(k) F u_in in coordinates centred on the image; its inverse is
    u_in = F R90(k)^T R(theta)^T (u_out - t), because the flip F is its own inverse and rotations invert by
    transposing. One transform per image does all the named augmentations in a single resampling pass.
    """
    u = tf.random.stateless_uniform([batch, 5], seed=seed)
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
    # R(theta) R90(k) = [[c, -s], [s, c]]; A = F [[c, s], [-s, c]] (F negates the x row).
    c = tf.cos(theta) * cos90 - tf.sin(theta) * sin90
    s = tf.sin(theta) * cos90 + tf.cos(theta) * sin90
    a00, a01, a10, a11 = flip * c, flip * s, -s, c
    centre = (size - 1) / 2.0
    x0, y0 = centre + shift[:, 0], centre + shift[:, 1]
    # x_in = A (x_out - centre - t) + centre
    b0 = centre - a00 * x0 - a01 * y0
    b1 = centre - a10 * x0 - a11 * y0
    return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)


def augment_batch(images: tf.Tensor, augment: Sequence[str], seed: tf.Tensor) -> tf.Tensor:
    """Randomly augment a batch of square uint8 RGB images [B, S, S, 3]; `seed` is a stateless seed of shape [2].

    Nearest-neighbour sampling (torchvision's default for its random rotations and affines) on the three channels
    packed into one int32: one sample per pixel instead of three, about 3x cheaper than bilinear on float32, which
    matters on a CPU where this pass costs as much as the JPEG decode. Flips, quarter turns and integer shifts are
    exact; borders are filled by reflection, so no black corners appear.
    """
    augment = tuple(augment)
    if not augment:
        return images
    shape = tf.shape(images)
    rgba = tf.concat([images, tf.zeros_like(images[..., :1])], axis=-1)
    packed = tf.bitcast(rgba, tf.int32)[..., None]  # [B, S, S, 1]: R, G, B, 0 bytes in one word
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=packed,
        transforms=_transforms(shape[0], images.shape[1], augment, seed),
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="NEAREST",
        fill_mode="REFLECT",
    )
    return tf.bitcast(moved[..., 0], tf.uint8)[..., :3]


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
) -> tf.data.Dataset:
    """The input pipeline: yields (images, labels) batches, or images alone when `labels` is None.

    training=True shuffles, augments and drops the last partial batch; training=False keeps the input order and
    yields every readable image exactly once. Unreadable files are skipped; pass a `SkipLog` to learn which (by
    index into `paths`). `cache` is None, "memory" or a folder for the decoded, resized images. `epoch` (an int64
    tf.Variable, advanced by the caller) keys the shuffle and the augmentation so that they depend only on
    (seed, epoch); without it every pass draws a new seeded key.
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

    if training and cache is None:
        # Shuffle the (cheap) file list before decoding: a full shuffle with no buffer of decoded images.
        if epoch is not None:
            order = tf.data.Dataset.range(n).map(lambda i: _permuted(i, n, seed, epoch))
        else:
            order = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)
        path_table, label_table = tf.constant(paths), tf.constant(label_array)
        ds = order.map(lambda j: (tf.gather(path_table, j), tf.gather(label_table, j), j))
    else:
        # In order for evaluation; for training with a cache, one fixed seeded permutation is cached and a
        # shuffle buffer mixes it anew each epoch.
        order = np.random.default_rng(seed).permutation(n) if training else np.arange(n)
        ds = tf.data.Dataset.from_tensor_slices(([paths[i] for i in order], label_array[order], order.astype(np.int64)))

    def decode(path, label, index):
        return tf.cast(decode_resize(path, image_size), tf.uint8), label, index  # uint8: 4x smaller to cache and batch

    # A file that fails to read or decode raises inside the map and its element is dropped; `skips` learns which.
    ds = ds.map(decode, num_parallel_calls=_PARALLEL).ignore_errors()
    if cache is not None:
        ds = ds.cache("" if cache == "memory" else _cache_file(cache, paths, image_size, cache_tag))
        if training:
            ds = ds.shuffle(min(n, CACHE_SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    if skips is not None:
        if skips.size != n:
            raise ValueError(f"make_dataset: SkipLog has size {skips.size}, expected {n}")
        ds = ds.map(lambda image, label, index: (image, label, skips.mark_delivered(index)))
    ds = ds.map(lambda image, label, index: (image, label))
    ds = ds.batch(batch_size, drop_remainder=training)

    if augment:
        # Per-batch augmentation keys: (seed, epoch) and the batch number, so each image's draw is reproducible.
        keys = (
            tf.data.Dataset.from_tensors(0).repeat().map(lambda _: epoch.read_value())
            if epoch is not None
            else tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        )

        def augment_and_preprocess(numbered, key):
            step, (images, label) = numbered
            images = augment_batch(images, augment, tf.stack([key * 1_000_003 + seed, step]))
            return preprocess(tf.cast(images, tf.float32), preprocessing), label

        ds = tf.data.Dataset.zip((ds.enumerate(), keys)).map(augment_and_preprocess, num_parallel_calls=_PARALLEL)
    else:
        ds = ds.map(lambda images, label: (preprocess(tf.cast(images, tf.float32), preprocessing), label),
                    num_parallel_calls=_PARALLEL)
    if labels is None:
        ds = ds.map(lambda images, label: images)
    return ds.prefetch(tf.data.AUTOTUNE)


def _permuted(i: tf.Tensor, n: int, seed: int, epoch: tf.Variable) -> tf.Tensor:
    """Position i of a permutation of range(n) that depends only on (seed, epoch)."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch.read_value(), tf.int64)])
    return tf.random.experimental.index_shuffle(i, seed=key, max_index=n - 1)
