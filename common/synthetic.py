"""Synthetic pictures for the benchmarks and test helpers: photo-like RGB arrays, and their JPEG bytes or files.

One maker, so that every bench and test draws the same kind of picture: smooth colour waves with random discs and
rectangles and mild noise. Its JPEG size and decode cost are like a photo's (flat colour would encode to a few KB
and decode far faster), and its structure makes flips, shifts and crops visibly different. The same seed and size
give the same pixels. No TensorFlow: the crawl benchmark uses it on machines without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from common.atomic import atomic_write_bytes

Seed = int | Sequence[int]


def photo(height: int, width: int, seed: Seed = 0, *, shapes: int = 12, noise: float = 6.0) -> np.ndarray:
    """A photo-like RGB uint8 image (height, width, 3): colour waves, `shapes` filled shapes, Gaussian noise.

    Shape sizes follow the image (about 1.5% to 17% of its longer side); the waves are gentle at any size.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [127 + 100 * np.sin(xx / rng.uniform(20, 90) + yy / rng.uniform(20, 90) + k) for k in range(3)], axis=-1
    )
    longer = max(height, width)
    for k in range(shapes):
        colour = rng.integers(0, 256, 3).tolist()
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        size = max(2, int(longer * rng.uniform(0.015, 0.17)))
        if k % 2 == 0:
            cv2.circle(image, centre, size, colour, -1)
        else:
            cv2.rectangle(image, centre, (centre[0] + size, centre[1] + size), colour, -1)
    if noise:
        image += rng.normal(0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def photo_sizes(n: int, height: int, width: int, jitter: int = 40, seed: Seed = 0) -> list[tuple[int, int]]:
    """`n` (height, width) pairs, each side drawn uniformly within +-`jitter` pixels of the given one."""
    rng = np.random.default_rng(seed)
    return [
        (height + int(rng.integers(-jitter, jitter + 1)), width + int(rng.integers(-jitter, jitter + 1)))
        for _ in range(n)
    ]


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    """A baseline JPEG of an RGB uint8 image (OpenCV's encoder)."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {rgb.shape} as JPEG")
    return encoded.tobytes()


def write_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 90) -> bytes:
    """Write an RGB image as a JPEG file, atomically (creating its folder); returns the bytes written."""
    data = jpeg_bytes(rgb, quality)
    atomic_write_bytes(path, data)
    return data


def with_jpeg_comment(jpeg: bytes, comment: bytes) -> bytes:
    """The JPEG with a comment (COM) segment right after its start marker: the same picture, other bytes."""
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG: no start-of-image marker")
    if len(comment) > 65533:
        raise ValueError(f"a JPEG comment holds at most 65533 bytes, not {len(comment)}")
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]
