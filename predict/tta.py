"""Test-time augmentation: a fixed, documented list of views of a decoded, resized image batch.

Views act on the float32 0..255 RGB batch that `train.data.load_image` produces, *before* the run's
preprocessing, so every backbone sees the same views whatever its input range. `--tta N` uses the first N
views of `TTA_VIEWS`, in this order (s = round(size / 16), at least 1 pixel; shifts fill the uncovered border by
reflection, so no black bars appear that the model never saw in training):

====  ======================  ====================================================================
 #    name                    what it does
====  ======================  ====================================================================
 0    identity                the image as is (``--tta 1`` is plain prediction)
 1    flip                    horizontal (left-right) mirror
 2    shift_down_right        content moved s px down and s px right
 3    shift_down_right_flip   view 2, mirrored
 4    shift_up_left           content moved s px up and s px left
 5    shift_up_left_flip      view 4, mirrored
 6    zoom_center             the central 7/8 of the image, resized back to full size (bilinear)
 7    zoom_center_flip        view 6, mirrored
 8    shift_down_left         content moved s px down and s px left
 9    shift_down_left_flip    view 8, mirrored
 10   shift_up_right          content moved s px up and s px right
 11   shift_up_right_flip     view 10, mirrored
====  ======================  ====================================================================

Every odd view is the mirror of the even view before it, so any even N averages over both orientations.
The views are deterministic (no randomness) and plain TensorFlow ops, so they run inside the tf.data pipeline.
`tta_views` stacks the N views along the batch axis (view-major: all images of view 0, then of view 1...), so one
model call scores them all; `average_views` undoes that stacking and averages the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

SHIFT_FRACTION = 1 / 16  # a small shift: well inside the 10% random translation training uses
ZOOM_FRACTION = 7 / 8  # the central crop kept by the zoom views


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
    """Validate a view count; returns it. Raises ValueError naming the allowed range."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= MAX_TTA:
        raise ValueError(f"--tta must be an integer from 1 to {MAX_TTA} (the number of defined views), got {n!r}")
    return int(n)


def _shift(images: tf.Tensor, dy: int, dx: int) -> tf.Tensor:
    # Pad by reflection on the side the content moves away from, then cut the original size back out:
    # output[y, x] = input[y - dy, x - dx], with reflected pixels where that falls outside the image.
    if dy == 0 and dx == 0:
        return images
    h, w = images.shape[1], images.shape[2]
    padded = tf.pad(
        images, [[0, 0], [max(dy, 0), max(-dy, 0)], [max(dx, 0), max(-dx, 0)], [0, 0]], mode="REFLECT"
    )
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[:, top : top + h, left : left + w, :]


def _zoom(images: tf.Tensor) -> tf.Tensor:
    h, w = images.shape[1], images.shape[2]
    ch, cw = int(round(h * ZOOM_FRACTION)), int(round(w * ZOOM_FRACTION))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = images[:, top : top + ch, left : left + cw, :]
    return tf.image.resize(crop, (h, w), method="bilinear")


def apply_view(images: tf.Tensor, view: TTAView) -> tf.Tensor:
    """One view of a batch (B, H, W, C) of float 0..255 images; H and W must be static."""
    h, w = images.shape[1], images.shape[2]
    if h is None or w is None:
        raise ValueError("TTA views need a batch with a static image size (B, H, W, C)")
    out = images
    if view.shift != (0, 0):
        out = _shift(out, view.shift[0] * shift_pixels(h), view.shift[1] * shift_pixels(w))
    if view.zoom:
        out = _zoom(out)
    if view.flip:
        out = tf.reverse(out, axis=[2])
    return out


def tta_views(images: tf.Tensor, n: int) -> tf.Tensor:
    """The first `n` views of a batch (B, H, W, C), stacked view-major along the batch axis: shape (n*B, H, W, C).

    With n == 1 the batch is returned unchanged, so `--tta 1` is exactly plain prediction.
    """
    n = check_tta(n)
    images = tf.convert_to_tensor(images)
    if n == 1:
        return images
    return tf.concat([apply_view(images, v) for v in TTA_VIEWS[:n]], axis=0)


def average_views(probabilities: np.ndarray, n: int) -> np.ndarray:
    """Undo `tta_views`' stacking: (n*B, K) scores -> (B, K) mean over the n views, in float64."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape[0] % n:
        raise ValueError(f"{probabilities.shape[0]} rows do not split into {n} views")
    return probabilities.reshape(n, -1, probabilities.shape[-1]).astype(np.float64).mean(axis=0)
