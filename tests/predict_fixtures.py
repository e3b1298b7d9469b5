"""Tiny RUN_DIRs and DATA_DIRs for the predict tests, built by hand (no training), to the docs/CONTRACTS.md formats.

The "colour detector" model has outputs known in advance: for a solid-colour image, stage one saturates to an
exact 0 or 1 per RGB channel ("is this channel bright?"), and stage two maps that bit to one of two chosen
probabilities per class. So the expected flags and probabilities are computed here from the colours alone,
independently of the code under test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from common import synthetic
from common.atomic import atomic_write_bytes
from crawl import manifest as mf
from train import rundir
from train.rundir import RunRecord

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
    a = np.array([logit(p1) - logit(p0) for p0, p1 in zip(off, on, strict=True)], dtype=np.float32)
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
    """A RUN_DIR with model.keras, config.json, classes.txt and metrics.json (no training), via train.rundir."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    size = int(model.inputs[0].shape[1])
    rundir.save_model(model, root)
    classes = list(classes)
    record = RunRecord(
        backbone={"name": backbone, "input_size": size, "preprocessing": preprocessing, "min_input_size": 8},
        image_size=size,
        classes=tuple(classes),
        train={"epochs": 3, "batch_size": 4},
        versions={"tensorflow": "test", "keras": keras.__version__},
        manifest_sha256="0" * 64,
        val_manifest_sha256=None,
        class_prevalence=tuple(prevalence) if prevalence is not None else (0.5,) * len(classes),
        n_train=0,
        n_val=0,
        runtime={"replicas": 1, "mixed_precision": False},
    )
    rundir.write_config(root, record)
    rundir.write_classes(root, classes)
    thresholds = list(thresholds) if thresholds is not None else [0.5] * len(classes)
    stored = {
        "best_epoch": 2,
        "val_map": 0.5,
        "per_class_ap": dict.fromkeys(classes, 0.5),
        "f2_at_0.5": 0.5,
        "thresholds": dict(zip(classes, thresholds, strict=True)),
        "f2_at_tuned": 0.6,
        "epochs_trained": 3,
        "train_seconds": 12.5,
        "params": int(model.count_params()),
    }
    stored.update(metrics or {})
    rundir.write_metrics(root, stored)
    return root


def write_jpeg(path: Path, rgb: np.ndarray) -> bytes:
    """Store an RGB image as a quality-95 JPEG (common.synthetic's encoder); returns the bytes written."""
    return synthetic.write_jpeg(path, rgb, quality=95)


def solid(colour: str, height: int = 40, width: int = 56) -> np.ndarray:
    return np.broadcast_to(np.asarray(COLOURS[colour], dtype=np.uint8), (height, width, 3)).copy()


def textured(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A synthetic photo with structure (colour waves plus shapes), so that views differ visibly."""
    return synthetic.photo(height, width, seed=seed)


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
    ids in `corrupt` get a stored file that is not an image. Written through crawl.manifest's writers."""
    root = Path(root)
    list_ids = list(list_ids) if list_ids is not None else list(images)
    classes = list(classes) if classes else []
    labels = labels or {}

    def url(id_: str) -> str:
        return f"http://example.invalid/{id_}.jpg"

    def labels_of(id_: str) -> tuple[int, ...]:
        return tuple(int(v) for v in labels.get(id_, [0] * len(classes)))

    stored = []
    for id_, rgb in images.items():
        rel = mf.image_path(id_, ".jpg")
        if id_ in corrupt:
            data = b"<html>not an image</html>"
            atomic_write_bytes(root / rel, data)
        else:
            data = write_jpeg(root / rel, rgb)
        height, width = rgb.shape[:2]
        stored.append(
            mf.ManifestRow.of_file(
                data, id=id_, path=rel, url=url(id_), width=width, height=height, labels=labels_of(id_)
            )
        )
    failed = [
        mf.FailedRow(id=i, url=url(i), reason="http_404", detail="Not Found", attempts=3)
        for i in list_ids
        if i not in images
    ]
    return mf.write_data_dir(
        root,
        classes=classes,
        entries=[mf.ListRow(id=i, url=url(i), labels=labels_of(i)) for i in list_ids],
        stored=stored,
        failed=failed,
        summary={"stored": len(stored), "failed": len(failed)},
    )


def expected_probabilities(
    colours: Sequence[str], off: Sequence[float], on: Sequence[float], channels=(0, 1, 2)
) -> np.ndarray:
    """What `detector_model` outputs for solid images of these colours, computed from the colours alone."""
    b = np.array([[bits(c)[ch] for ch in channels] for c in colours])
    return np.where(b == 1, np.asarray(on)[None, :], np.asarray(off)[None, :])


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
