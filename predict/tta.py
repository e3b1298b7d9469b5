"""Test-time augmentation: a fixed, documented list of views of a decoded, resized image batch.

Views act on the float32 0..255 RGB batch that `train.data.load_image` produces, *before* the run's
preprocessing, so every backbone sees the same views whatever its input range. Each view is a fixed affine map
resampled by training's own augmentation resampler (`train.data.resample`: nearest neighbour, borders filled by
reflection that repeats the edge pixel), so a shifted or mirrored view shows the model exactly what a training
augmentation with the same shift or mirror showed it. `--tta N` uses the first N views of `TTA_VIEWS`, in this
order (s = round(size / 16), at least 1 pixel):

====  ======================  ====================================================================
 #    name                    what it does
====  ======================  ====================================================================
 0    identity                the image as is (``--tta 1`` is plain prediction)
 1    flip                    horizontal (left-right) mirror
 2    shift_down_right        content moved s px down and s px right
 3    shift_down_right_flip   view 2, mirrored
 4    shift_up_left           content moved s px up and s px left
 5    shift_up_left_flip      view 4, mirrored
 6    zoom_center             the central 7/8 of the image, scaled back to full size (nearest neighbour)
 7    zoom_center_flip        view 6, mirrored
 8    shift_down_left         content moved s px down and s px left
 9    shift_down_left_flip    view 8, mirrored
 10   shift_up_right          content moved s px up and s px right
 11   shift_up_right_flip     view 10, mirrored
====  ======================  ====================================================================

Every odd view is the mirror of the even view before it, so any even N averages over both orientations.
The views are deterministic (no randomness) and TensorFlow ops, so they run inside the tf.data pipeline.
`tta_views` stacks the N views along the batch axis (view-major: all images of view 0, then of view 1...), so one
model call scores them all; `average_views` undoes that stacking and averages the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from predict.errors import PredictError
from train.data import affine_maps, resample

SHIFT_FRACTION = 1 / 16  # a small shift: well inside the 10% random translation training uses
ZOOM_FRACTION = 7 / 8  # the central part of the side that the zoom views scale to full size


@dataclass(frozen=True)
class TTAView:
    """One view: an optional shift (in units of the shift step, + is down/right), an optional zoom, then a mirror."""

    name: str
    shift: tuple[int, int] = (0, 0)  # (rows, columns) in units of the shift step
    zoom: bool = False
    flip: bool = False


def _with_flip(views: list[TTAView]) -> list[TTAView]:
    out = []
    for v in views:
        out.append(v)
        out.append(TTAView(v.name + "_flip" if v.name != "identity" else "flip", v.shift, v.zoom, True))
    return out


TTA_VIEWS: tuple[TTAView, ...] = tuple(
    _with_flip(
        [
            TTAView("identity"),
            TTAView("shift_down_right", shift=(1, 1)),
            TTAView("shift_up_left", shift=(-1, -1)),
            TTAView("zoom_center", zoom=True),
            TTAView("shift_down_left", shift=(1, -1)),
            TTAView("shift_up_right", shift=(-1, 1)),
        ]
    )
)
MAX_TTA = len(TTA_VIEWS)


def shift_pixels(size: int) -> int:
    """The shift step in pixels for an image side of `size`."""
    return max(1, int(round(size * SHIFT_FRACTION)))


def check_tta(n: int) -> int:
    """Validate a view count (the `--tta` option); returns it. Raises PredictError naming the allowed range."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= MAX_TTA:
        raise PredictError(f"--tta must be an integer from 1 to {MAX_TTA} (the number of defined views), got {n!r}")
    return int(n)


def view_map(view: TTAView, size: int) -> tf.Tensor:
    """The affine map [6] of one view of a square image of side `size`, for `train.data.resample`.

    The view shifts, then zooms, then mirrors; `train.data.affine_maps` mirrors first, so the shift it is given is
    the view's shift mirrored (and scaled by the zoom).
    """
    step = shift_pixels(size)
    dy, dx = view.shift[0] * step, view.shift[1] * step
    flip = -1.0 if view.flip else 1.0
    crop = ZOOM_FRACTION if view.zoom else 1.0
    return affine_maps(size, flip=flip, shift_x=flip * dx / crop, shift_y=dy / crop, crop=crop)


def apply_view(images: tf.Tensor, view: TTAView) -> tf.Tensor:
    """One view of a batch (B, S, S, C) of square images (S static); keeps the dtype."""
    images = tf.convert_to_tensor(images)
    maps = tf.tile(view_map(view, images.shape[1])[None], [tf.shape(images)[0], 1])
    return resample(images, maps)


def tta_views(images: tf.Tensor, n: int) -> tf.Tensor:
    """The first `n` views of a batch (B, S, S, C), stacked view-major along the batch axis: shape (n*B, S, S, C).

    All views go through the resampler in one call. With n == 1 the batch is returned unchanged, so `--tta 1` is
    exactly plain prediction.
    """
    images = tf.convert_to_tensor(images)
    if n == 1:
        return images
    maps = tf.stack([view_map(v, images.shape[1]) for v in TTA_VIEWS[:n]])  # [n, 6]
    return resample(tf.tile(images, [n, 1, 1, 1]), tf.repeat(maps, tf.shape(images)[0], axis=0))


def average_views(probabilities: np.ndarray, n: int) -> np.ndarray:
    """Undo `tta_views`' stacking: (n*B, K) scores -> (B, K) mean over the n views, in float64."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape[0] % n:
        raise ValueError(f"{probabilities.shape[0]} rows do not split into {n} views")
    return probabilities.reshape(n, -1, probabilities.shape[-1]).astype(np.float64).mean(axis=0)
