"""Tiny RUN_DIRs and DATA_DIRs for the predict tests, built by hand (no training), to the docs/CONTRACTS.md formats.

The "colour detector" model has outputs known in advance: for a solid-colour image, stage one saturates to an
exact 0 or 1 per RGB channel ("is this channel bright?"), and stage two maps that bit to one of two chosen
probabilities per class. So the expected flags and probabilities are computed here from the colours alone,
independently of the code under test.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import cv2
import keras
import numpy as np
import pandas as pd

from common.atomic import atomic_write_csv, atomic_write_json, atomic_write_text
from crawl.manifest import FAILED_COLUMNS, MANIFEST_COLUMNS, write_classes

CLASSES = ["red_ish", "green_ish", "blue_ish"]

# Solid colours (RGB) and which channels are "bright" in them.
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
}


def bits(colour: str) -> np.ndarray:
    """1 for each bright channel of a named colour."""
    return (np.asarray(COLOURS[colour]) > 127).astype(int)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def detector_model(
    image_size: int,
    off: Sequence[float],
    on: Sequence[float],
    preprocessing: str = "inception",
    channels: Sequence[int] = (0, 1, 2),
) -> keras.Model:
    """Class k outputs on[k] when RGB channel channels[k] of a solid image is bright, else off[k].

    Values of `off`/`on` with at most 6 decimals come out of the model within ~1e-7 of themselves, so their
    6-decimal text is known exactly.
    """
    k = len(off)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    detect = keras.layers.Dense(k, activation="sigmoid", name="detect")
    x = detect(x)
    mix = keras.layers.Dense(k, activation="sigmoid", name="mix")
    outputs = mix(x)
    model = keras.Model(inputs, outputs)
    # Stage one: a steep sigmoid on the chosen channel mean saturates to exactly 0 or 1 in float32.
    kernel = np.zeros((3, k), dtype=np.float32)
    if preprocessing == "inception":  # pixels in [-1, 1]
        scale, bias = 60.0, 0.0
    elif preprocessing == "raw":  # pixels in [0, 255]
        scale, bias = 0.5, -64.0
    else:
        raise ValueError(preprocessing)
    for j, c in enumerate(channels):
        kernel[c, j] = scale
    detect.set_weights([kernel, np.full(k, bias, dtype=np.float32)])
    # Stage two: bit b -> sigmoid(a*b + c) with c = logit(off), a = logit(on) - logit(off).
    a = np.array([logit(p1) - logit(p0) for p0, p1 in zip(off, on)], dtype=np.float32)
    c = np.array([logit(p0) for p0 in off], dtype=np.float32)
    mix.set_weights([np.diag(a).astype(np.float32), c])
    return model


def conv_model(image_size: int, n_classes: int = 3, seed: int = 0) -> keras.Model:
    """A small position-sensitive model (Conv2D then Flatten), so flips and shifts change its outputs."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(n_classes, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def make_run_dir(
    root: Path,
    model: keras.Model,
    classes: Sequence[str] = CLASSES,
    *,
    preprocessing: str = "inception",
    backbone: str = "tiny",
    thresholds: Sequence[float] | None = None,
    prevalence: Sequence[float] | None = None,
    metrics: dict | None = None,
) -> Path:
    """A RUN_DIR with model.keras, config.json, classes.txt and metrics.json (no training)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    size = int(model.inputs[0].shape[1])
    model.save(root / "model.keras")
    classes = list(classes)
    config = {
        "backbone": {"name": backbone, "input_size": size, "preprocessing": preprocessing, "min_input_size": 8},
        "image_size": size,
        "classes": classes,
        "train": {"epochs": 3, "batch_size": 4},
        "versions": {"tensorflow": "test", "keras": keras.__version__},
        "manifest_sha256": "0" * 64,
        "class_prevalence": list(prevalence) if prevalence is not None else [0.5] * len(classes),
    }
    atomic_write_json(root / "config.json", config)
    atomic_write_text(root / "classes.txt", "".join(f"{c}\n" for c in classes))
    thresholds = list(thresholds) if thresholds is not None else [0.5] * len(classes)
    stored = {
        "best_epoch": 2,
        "val_map": 0.5,
        "per_class_ap": {c: 0.5 for c in classes},
        "f2_at_0.5": 0.5,
        "thresholds": dict(zip(classes, thresholds)),
        "f2_at_tuned": 0.6,
        "epochs_trained": 3,
        "train_seconds": 12.5,
        "params": int(model.count_params()),
    }
    stored.update(metrics or {})
    atomic_write_json(root / "metrics.json", stored)
    return root


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f"cv2 could not write {path}")


def solid(colour: str, height: int = 40, width: int = 56) -> np.ndarray:
    return np.broadcast_to(np.asarray(COLOURS[colour], dtype=np.uint8), (height, width, 3)).copy()


def textured(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth random image with structure (gradients plus blobs), so views differ visibly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([255 * (a * xx + b * yy) % 256 for a, b in rng.uniform(0.5, 3, size=(3, 2))], axis=-1)
    for _ in range(4):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(4, 12)
        img[(yy * max(height, width) - cy) ** 2 + (xx * max(height, width) - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def make_data_dir(
    root: Path,
    images: dict[str, np.ndarray],
    *,
    list_ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    labels: dict[str, Sequence[int]] | None = None,
    corrupt: Sequence[str] = (),
) -> Path:
    """A DATA_DIR: `images` (id -> RGB array) are stored, in the dict's order (the manifest order);
    ids of `list_ids` (the list order, default: the images' order) without an image go to failed.csv;
    ids in `corrupt` get a stored file that is not an image."""
    root = Path(root)
    list_ids = list(list_ids) if list_ids is not None else list(images)
    classes = list(classes) if classes else []
    labels = labels or {}
    url = "http://example.invalid/{}.jpg".format
    rows = []
    for id_, rgb in images.items():
        path = root / "images" / f"{id_}.jpg"
        if id_ in corrupt:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"<html>not an image</html>")
        else:
            write_jpeg(path, rgb)
        rows.append(
            {
                "id": id_,
                "path": f"images/{id_}.jpg",
                "url": url(id_),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "width": rgb.shape[1],
                "height": rgb.shape[0],
                **{c: int(v) for c, v in zip(classes, labels.get(id_, [0] * len(classes)))},
            }
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + classes)
    items = pd.DataFrame(
        [{"id": i, "url": url(i), **{c: int(v) for c, v in zip(classes, labels.get(i, [0] * len(classes)))}} for i in list_ids],
        columns=["id", "url"] + classes,
    )
    failed = pd.DataFrame(
        [{"id": i, "url": url(i), "reason": "http_404", "detail": "Not Found", "attempts": 3} for i in list_ids if i not in images],
        columns=FAILED_COLUMNS,
    )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(root / "list.csv", items)
    atomic_write_csv(root / "manifest.csv", manifest)
    atomic_write_csv(root / "failed.csv", failed)
    if classes:
        write_classes(root, classes)
    atomic_write_json(root / "crawl.json", {"stored": len(images), "failed": len(failed)})
    return root


def expected_probabilities(colours: Sequence[str], off: Sequence[float], on: Sequence[float], channels=(0, 1, 2)) -> np.ndarray:
    """What `detector_model` outputs for solid images of these colours, computed from the colours alone."""
    b = np.array([[bits(c)[ch] for ch in channels] for c in colours])
    return np.where(b == 1, np.asarray(on)[None, :], np.asarray(off)[None, :])


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
