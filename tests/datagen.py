"""Small labelled DATA_DIRs written straight to disk for the train tests: coloured shapes whose presence is the label.

Class k present means its shape is drawn in its colour somewhere on a noisy grey background, so a small
colour-sensitive network learns the labels in a few epochs (the real backbones would need their ImageNet weights,
which are not available offline: at random initialisation their pooled features are too faint for the head).
The tables are written by crawl/manifest.py's writers, the JPEGs by common/synthetic.py's encoder; the crawler is
not needed. Some entries can be made corrupt (garbage bytes) or missing (a manifest row without a file).

The pictures are not common.synthetic's photos: what is drawn here is the label, and the noisy grey background
keeps every colour but the shapes' out of the picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.atomic import atomic_write_bytes
from common.synthetic import write_jpeg
from crawl import manifest as mf

# name -> (BGR colour, shape); strongly different colours keep the task easy at 75 px.
SHAPES = {
    "red_disc": ((30, 30, 230), "disc"),
    "green_bar": ((40, 200, 40), "bar"),
    "blue_square": ((220, 60, 20), "square"),
    "yellow_triangle": ((20, 220, 230), "triangle"),
    "magenta_ring": ((200, 40, 200), "ring"),
}


@dataclass(frozen=True)
class Fixture:
    """What `make_data_dir` wrote: the folder, its classes, the label matrix in manifest order, and the bad ids."""

    root: Path
    classes: list[str]
    ids: list[str]
    labels: np.ndarray
    corrupt_ids: list[str]
    missing_ids: list[str]


def _draw(image: np.ndarray, colour: tuple[int, int, int], shape: str, rng: np.random.Generator) -> None:
    h, w = image.shape[:2]
    r = int(min(h, w) * rng.uniform(0.22, 0.3))
    cx, cy = int(rng.uniform(r, w - r)), int(rng.uniform(r, h - r))
    if shape == "disc":
        cv2.circle(image, (cx, cy), r, colour, -1)
    elif shape == "ring":
        cv2.circle(image, (cx, cy), r, colour, max(2, r // 3))
    elif shape == "square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    elif shape == "bar":
        cv2.rectangle(image, (cx - r, 0), (cx + r // 2, h - 1), colour, -1)
    else:  # triangle
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(image, [pts], colour)


def draw_image(
    labels: Sequence[int], classes: Sequence[str], size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A BGR uint8 image (height, width) with the shape of every present class drawn on a noisy background."""
    h, w = size
    image = rng.normal(128, 12, (h, w, 3)).clip(0, 255).astype(np.uint8)
    for present, name in zip(labels, classes, strict=True):
        if present:
            colour, shape = SHAPES[name]
            _draw(image, colour, shape, rng)
    return image


def sample_labels(
    n: int, n_classes: int, rng: np.random.Generator, prevalence: float = 0.4, *, every_image_labelled: bool = False
) -> np.ndarray:
    """An n x n_classes 0/1 matrix where every class has at least two positives and two negatives (and, with
    `every_image_labelled`, every row at least one positive)."""
    while True:
        labels = (rng.random((n, n_classes)) < prevalence).astype(int)
        if every_image_labelled:
            empty = np.flatnonzero(labels.sum(axis=1) == 0)
            labels[empty, rng.integers(0, n_classes, len(empty))] = 1
        counts = labels.sum(axis=0)
        if n < 4 or ((counts >= 2) & (counts <= n - 2)).all():
            return labels


def make_data_dir(
    root: str | Path,
    n: int = 40,
    n_classes: int = 3,
    *,
    seed: int = 0,
    size: tuple[int, int] = (90, 80),
    corrupt: int = 0,
    missing: int = 0,
    id_prefix: str = "img",
    every_image_labelled: bool = False,
) -> Fixture:
    """Write a labelled DATA_DIR of `n` JPEGs (height, width = `size`) to `root`; the last `corrupt` + `missing`
    manifest rows get garbage bytes or no file at all."""
    root = Path(root)
    classes = list(SHAPES)[:n_classes]
    rng = np.random.default_rng(seed)
    labels = sample_labels(n, n_classes, rng, every_image_labelled=every_image_labelled)
    ids = [f"{id_prefix}{i:04d}" for i in range(n)]
    bad_start = n - corrupt - missing
    h, w = size
    rows = []
    for i, (image_id, row) in enumerate(zip(ids, labels, strict=True)):
        rel = mf.image_path(image_id, ".jpg")
        path = root / rel
        if i < bad_start:
            bgr = draw_image(row, classes, size, rng)
            data = write_jpeg(path, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), quality=92)
        elif i < bad_start + corrupt:
            data = b"\xff\xd8\xff\xe0 this is not really a JPEG " + rng.bytes(200)
            atomic_write_bytes(path, data)
        else:
            data = b""  # a manifest row whose file has gone
            path.unlink(missing_ok=True)
        url = f"http://127.0.0.1:9/{image_id}.jpg"
        rows.append(mf.ManifestRow.of_file(data, id=image_id, path=rel, url=url, width=w, height=h, labels=row))
    mf.write_data_dir(root, classes=classes, entries=rows, stored=rows)
    return Fixture(
        root=root,
        classes=classes,
        ids=ids,
        labels=labels.astype(np.float32),
        corrupt_ids=ids[bad_start : bad_start + corrupt],
        missing_ids=ids[bad_start + corrupt :],
    )

