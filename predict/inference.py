"""Score images with one run or an ensemble of runs: tf.data decode and resize, TTA views, preprocessing, one model
call per batch.

The decode/resize is `train.data.load_image` and the preprocessing `train.preprocess.preprocess` with the run's
mode: the very code training used, so there is no train/serve skew. TTA views (predict.tta) act on the decoded
0..255 batch, are stacked along the batch axis and go through the model in one `predict_on_batch` call; the
sigmoid probabilities of the views are then averaged. An ensemble averages its runs' probabilities, each run
decoding at its own input size with its own preprocessing.

The model call is the run's engine (`Run.score`, `predict.engines`): Keras on the preprocessed batch, or the run's
OpenVINO / ONNX export, which holds the preprocessing, on the 0..255 batch (the pipeline then skips it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from predict.errors import PredictError
from predict.runs import Run
from predict.tta import average_views, tta_views
from train.data import load_image, pipeline_options
from train.preprocess import preprocess

DEFAULT_BATCH_SIZE = 16  # images per model call before TTA: the model sees batch_size * tta images at once
UNREADABLE_MODES = ("error", "keep")
_LISTED = 20  # ids named in an error message before "... and N more"


@dataclass(frozen=True)
class Prediction:
    """Probabilities for a list of images, in the order given."""

    probabilities: np.ndarray  # (n_images, n_classes) float64; rows of unreadable images are meaningless
    readable: np.ndarray  # (n_images,) bool: False where the file is absent or could not be decoded
    seconds: float  # wall time of the prediction loops (decode + views + model), warm-up excluded
    tta: int

    @property
    def images_per_second(self) -> float:
        return len(self.readable) / self.seconds if self.seconds > 0 else float("nan")


def describe_images(ids: Sequence[str], paths: Sequence[str], indices: Sequence[int]) -> str:
    """'id (path), ...' for the first few indices, then '... and N more'."""
    shown = [f"{ids[i]} ({paths[i]})" for i in indices[:_LISTED]]
    more = len(indices) - len(shown)
    return ", ".join(shown) + (f", ... and {more} more" if more > 0 else "")


def image_dataset(
    paths: Sequence[str], *, image_size: int, preprocessing: str | None, batch_size: int, tta: int = 1
) -> tf.data.Dataset:
    """Batches of (model input of shape (tta*B, S, S, 3), readable flags of shape (B,)) for `paths`, in order.

    Decoding runs in parallel (deterministic order); the views are built from the decoded batch, then
    preprocessed (unless `preprocessing` is None: an exported model that preprocesses itself gets the 0..255
    views), so each batch is one model call. The tf.data options are training's (`pipeline_options`).
    """

    def model_input(images):
        views = tta_views(images, tta)
        return views if preprocessing is None else preprocess(views, preprocessing)

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    ds = ds.map(lambda p: load_image(p, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda images, ok: (model_input(images), ok), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())


def predict_run(
    run: Run,
    paths: Sequence[str],
    *,
    tta: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    warmup: bool = False,
) -> Prediction:
    """Probabilities of one run for existing image files `paths` (averaged over `tta` views).

    warmup=True first scores batches of zeros of the shapes this pass uses, so that tracing the model (for the
    export engines: exporting or compiling it) is not counted in `seconds` (used when the speed is reported). `tta`
    and `batch_size` are taken as checked (the configs' `resolve()` checks them).
    """
    n, k = len(paths), len(run.classes)
    probabilities = np.zeros((n, k), dtype=np.float64)
    readable = np.zeros(n, dtype=bool)
    if n == 0:
        return Prediction(probabilities, readable, 0.0, tta)
    size = run.image_size
    run.prepare()  # an export engine exports or compiles first: outside `seconds`
    if warmup:
        # Both batch shapes this pass will use: a full batch and the last, partial one (a second shape makes
        # the traced function generalise its batch size, which is another trace).
        for b in sorted({min(batch_size, n), n % batch_size or batch_size}, reverse=True):
            run.score(np.zeros((b * tta, size, size, 3), dtype=np.float32))
    preprocessing = None if run.takes_pixels else run.preprocessing
    dataset = image_dataset(paths, image_size=size, preprocessing=preprocessing, batch_size=batch_size, tta=tta)
    start = time.perf_counter()
    done = 0
    with tqdm(total=n, desc=f"{run.name} (tta {tta})", unit="img", disable=not progress, leave=False) as bar:
        for inputs, ok in dataset:
            b = int(ok.shape[0])
            scores = np.asarray(run.score(inputs))
            if scores.shape != (b * tta, k):
                expected = (b * tta, k)
                raise PredictError(f"{run.path}: model returned scores of shape {scores.shape}, expected {expected}")
            probabilities[done : done + b] = average_views(scores, tta)
            readable[done : done + b] = ok.numpy()
            done += b
            bar.update(b)
    return Prediction(probabilities, readable, time.perf_counter() - start, tta)


def predict_ensemble(
    runs: Sequence[Run],
    paths: Sequence[str],
    *,
    ids: Sequence[str] | None = None,
    tta: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    unreadable: str = "error",
    warmup: bool = False,
) -> Prediction:
    """Mean probabilities of `runs` over images `paths` (one run is an ensemble of one).

    unreadable="error" raises PredictError naming every image that is absent or cannot be decoded (absent files
    before any model runs, undecodable ones after the first run's pass); "keep" returns them with
    readable=False so the caller can fill their rows.
    """
    if unreadable not in UNREADABLE_MODES:
        raise ValueError(f"unreadable must be one of {UNREADABLE_MODES}, got {unreadable!r}")
    paths = [str(p) for p in paths]
    ids = list(ids) if ids is not None else paths
    present = np.array([os.path.isfile(p) for p in paths], dtype=bool)
    absent = np.flatnonzero(~present).tolist()
    if absent and unreadable == "error":
        raise PredictError(
            f"{len(absent)} image file(s) listed in the manifest do not exist: {describe_images(ids, paths, absent)}. "
            f"Re-run the crawl on this DATA_DIR to fetch them again."
        )
    # Absent files never reach the decoder; their rows stay zero and are flagged unreadable.
    kept = np.flatnonzero(present)
    kept_paths = [paths[i] for i in kept]
    total = np.zeros((len(paths), len(runs[0].classes)), dtype=np.float64)
    readable = present.copy()
    seconds = 0.0
    for index, run in enumerate(runs):
        pred = predict_run(run, kept_paths, tta=tta, batch_size=batch_size, progress=progress, warmup=warmup)
        total[kept] += pred.probabilities
        readable[kept] &= pred.readable
        seconds += pred.seconds
        if index == 0 and unreadable == "error" and not readable.all():
            bad = np.flatnonzero(~readable).tolist()
            raise PredictError(
                f"{len(bad)} image(s) cannot be decoded: {describe_images(ids, paths, bad)}. "
                f"Re-crawl them (delete them from the DATA_DIR and run the crawl again)."
            )
    return Prediction(total / len(runs), readable, seconds, tta)
