"""Benchmark prediction: images per second with --tta 1 and --tta 8 in the same run, and what the 8 views cost.

A real backbone (default: Xception, weights=None, at 150 px, with a sigmoid head) predicts on a couple hundred
generated ~500x700 JPEGs through `predict.inference.predict_run`, the code `python -m predict` uses. Besides the
end-to-end figures it measures, in the same process, the two parts: the input pipeline alone (read, decode,
resize, views, preprocessing; no model) and the model alone on in-memory tensors (one view, and eight views
stacked in one call). With all views in one call per batch, 8 views should cost about
decode + 8 x (model per view), not more: the report gives that prediction next to the measured ratio.

`python -m bench.predict [--images 200] [--image-size 150] [--backbone xception] [--batch-size 16]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

from common.atomic import atomic_write_text
from common.synthetic import photo, photo_sizes, write_jpeg
from crawl import manifest as mf
from crawl.manifest import JD_FASHION_CLASSES
from predict.inference import Prediction, image_dataset, predict_run
from predict.runs import load_run
from train import rundir
from train.backbones import get_backbone
from train.model import build_model
from train.rundir import RunRecord


@dataclass(frozen=True, kw_only=True)
class PredictBenchConfig:
    """Settings of the prediction benchmark."""

    images: int = 200
    image_size: int = 150
    backbone: str = "xception"
    batch_size: int = 16
    width: int = 500
    height: int = 700
    tta: int = 8
    rounds: int = 2  # end-to-end timings alternate tta 1 / tta N this many times; the best counts
    workdir: Path | None = None  # default: a temporary folder, removed afterwards
    seed: int = 0


def make_data(root: Path, config: PredictBenchConfig) -> list[str]:
    """Write `config.images` synthetic photos of about width x height as JPEGs, in an unlabelled DATA_DIR written
    through crawl.manifest; returns the image paths."""
    rows = []
    for i, (h, w) in enumerate(photo_sizes(config.images, config.height, config.width, seed=config.seed)):
        image_id = f"b{i:04d}"
        rel = mf.image_path(image_id, ".jpg")
        data = write_jpeg(root / rel, photo(h, w, seed=(config.seed, i)), quality=90)
        url = f"http://bench.invalid/{i}.jpg"
        rows.append(mf.ManifestRow.of_file(data, id=image_id, path=rel, url=url, width=w, height=h))
    mf.write_data_dir(root, classes=[], entries=rows, stored=rows)
    return [str(root / r.path) for r in rows]


def make_run(root: Path, config: PredictBenchConfig) -> Path:
    """A RUN_DIR with training's model (backbone + head), untrained: speed does not depend on the weights."""
    backbone = get_backbone(config.backbone)
    keras.utils.set_random_seed(config.seed)
    model, _ = build_model(
        backbone, len(JD_FASHION_CLASSES), image_size=config.image_size, weights=None, dropout=0.5, l2=0.0
    )
    root.mkdir(parents=True, exist_ok=True)
    rundir.save_model(model, root)
    k = len(JD_FASHION_CLASSES)
    record = RunRecord(
        backbone=backbone.to_config(),
        image_size=config.image_size,
        classes=tuple(JD_FASHION_CLASSES),
        train={},
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
        manifest_sha256="",
        val_manifest_sha256=None,
        class_prevalence=(1.0 / k,) * k,
        n_train=0,
        n_val=0,
        runtime={"replicas": 1, "mixed_precision": False},
    )
    rundir.write_config(root, record)
    rundir.write_classes(root, JD_FASHION_CLASSES)
    return root


def _time_pipeline(paths: list[str], run, batch_size: int, tta: int) -> float:
    """Seconds to run the input pipeline alone (decode, resize, views, preprocessing) over all images."""
    ds = image_dataset(
        paths, image_size=run.image_size, preprocessing=run.preprocessing, batch_size=batch_size, tta=tta
    )
    start = time.perf_counter()
    for x, _ in ds:
        x.numpy()  # make sure the batch is materialised
    return time.perf_counter() - start


def _time_model(run, batch_size: int, views: int, repeats: int) -> float:
    """Seconds per image for the model alone on in-memory batches of batch_size * views images (fastest call).

    The fastest call, not the mean: on a shared machine, calls slowed by other processes should not count.
    """
    size = run.image_size
    x = tf.random.uniform((batch_size * views, size, size, 3), -1.0, 1.0, seed=1)
    run.model.predict_on_batch(x)  # trace and warm up
    calls = []
    for _ in range(repeats):
        start = time.perf_counter()
        run.model.predict_on_batch(x)
        calls.append(time.perf_counter() - start)
    return min(calls) / batch_size


@dataclass(frozen=True)
class PredictBenchResult:
    """What the benchmark measured: the figures (printed by `report`, written by --json) and the predictions."""

    figures: dict
    predictions: dict[int, Prediction] = field(repr=False)  # view count -> the last timed end-to-end prediction


@contextlib.contextmanager
def work_folder(workdir: str | Path | None, prefix: str) -> Iterator[Path]:
    """`workdir` when given (kept afterwards, for a look at what the bench made), else a temporary folder that is
    removed at the end."""
    if workdir:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


def run_benchmark(config: PredictBenchConfig) -> PredictBenchResult:
    """Measure the figures (seconds, images/s, ratios) and keep the predictions the timed passes made."""
    with work_folder(config.workdir, "bench_predict_") as work:
        t0 = time.perf_counter()
        paths = make_data(work / "data", config)
        print(f"generated {len(paths)} JPEGs (~{config.width}x{config.height}) in {time.perf_counter() - t0:.1f}s",
              flush=True)
        run = load_run(make_run(work / "run", config))
        n, b = len(paths), config.batch_size

        # Input pipeline alone, with 1 and with `tta` views (the views are built in the pipeline too).
        _time_pipeline(paths[: 2 * b], run, b, 1)  # warm the file cache and tf.data
        pipe_1 = _time_pipeline(paths, run, b, 1)
        pipe_n = _time_pipeline(paths, run, b, config.tta)
        # Model alone, per image, on one view and on `tta` views stacked in one call.
        repeats = max(3, n // b // 2)
        model_1 = _time_model(run, b, 1, repeats * 2)
        model_n = _time_model(run, b, config.tta, repeats)
        # End to end, as `python -m predict submit` runs it; warm-up excluded. The two settings alternate and
        # the best of `rounds` counts (as timeit does), so load from other processes does not skew the ratio.
        predictions: dict[int, Prediction] = {}
        seconds = {1: float("inf"), config.tta: float("inf")}
        for _ in range(config.rounds):
            for views in seconds:
                predictions[views] = predict_run(run, paths, tta=views, batch_size=b, progress=False, warmup=True)
                seconds[views] = min(seconds[views], predictions[views].seconds)
        e2e_1, e2e_n = seconds[1], seconds[config.tta]
        expected_n = pipe_1 + config.tta * model_1 * n  # decode once, model once per view
        figures = {
            "backbone": run.backbone,
            "image_size": run.image_size,
            "images": n,
            "width": config.width,
            "height": config.height,
            "batch_size": b,
            "rounds": config.rounds,
            "tta": config.tta,
            "cpu_count": os.cpu_count(),
            "pipeline_seconds_tta1": pipe_1,
            f"pipeline_seconds_tta{config.tta}": pipe_n,
            "model_seconds_per_image_1_view": model_1,
            f"model_seconds_per_image_{config.tta}_views": model_n,
            "pipeline_images_per_second_tta1": n / pipe_1,
            f"pipeline_images_per_second_tta{config.tta}": n / pipe_n,
            "model_images_per_second_1_view": 1 / model_1,
            f"model_images_per_second_{config.tta}_views": 1 / model_n,
            "model_cost_ratio": model_n / model_1,
            "predict_images_per_second_tta1": n / e2e_1,
            f"predict_images_per_second_tta{config.tta}": n / e2e_n,
            "predict_seconds_tta1": e2e_1,
            f"predict_seconds_tta{config.tta}": e2e_n,
            "cost_ratio": e2e_n / e2e_1,
            "expected_seconds": expected_n,
            "measured_over_expected": e2e_n / expected_n,
        }
        return PredictBenchResult(figures, predictions)


def report(f: dict) -> str:
    """The figures as a small table."""
    n = f["tta"]
    return "\n".join(
        [
            f"prediction benchmark: {f['backbone']} at {f['image_size']} px, {f['images']} JPEGs ~{f['width']}x"
            f"{f['height']}, batch {f['batch_size']} (images/s count source images: with tta {n} each one is {n} "
            "model inputs)",
            f"{'':34}{'tta 1':>12}{'tta ' + str(n):>12}{'ratio':>9}",
            f"{'predict (end to end), images/s':34}{f['predict_images_per_second_tta1']:12.2f}"
            f"{f[f'predict_images_per_second_tta{n}']:12.2f}{f['cost_ratio']:9.2f}",
            f"{'model alone, images/s':34}{f['model_images_per_second_1_view']:12.2f}"
            f"{f[f'model_images_per_second_{n}_views']:12.2f}{f['model_cost_ratio']:9.2f}",
            f"{'input pipeline alone, images/s':34}{f['pipeline_images_per_second_tta1']:12.2f}"
            f"{f[f'pipeline_images_per_second_tta{n}']:12.2f}",
            f"tta {n} took {f[f'predict_seconds_tta{n}']:.1f}s against {f['expected_seconds']:.1f}s expected "
            f"(decode once + {n} x model per view): measured/expected = {f['measured_over_expected']:.2f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--backbone", default="xception")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating end-to-end timings; the best counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_benchmark(
        PredictBenchConfig(
            images=args.images,
            image_size=args.image_size,
            backbone=args.backbone,
            batch_size=args.batch_size,
            tta=args.tta,
            rounds=args.rounds,
        )
    ).figures
    print(report(figures))
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
