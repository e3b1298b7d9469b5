"""Benchmark the training input pipeline, and training speed with real against synthetic input, per backbone.

Input pipeline, images per second at 299 px on generated ~500x700 JPEGs, all in one process and in alternating
rounds so that whatever else runs on the machine weighs on every side alike. Each timed pass reads the files
`--passes` times over (960 images by default), as a training epoch would, so that filling and draining the
pipeline at the start and end of a pass weigh little; all use the same tf.data options (`pipeline_options`):

- ceiling: read, decode and resize alone (`train.data.decode_resize` in a parallel tf.data map, batched);
- pipeline: `train.data.make_dataset(training=True)` with the default augmentations (flip, translate, rotate),
  the inception preprocessing, batching and prefetch, and the epoch key and skip log that training passes: what
  training consumes; also with augmentation "none", which shows what the pipeline's own machinery costs apart
  from the augmentation pass;
- legacy: tf-keras's `ImageDataGenerator.flow_from_dataframe` with the same augmentations (rotation 15 degrees,
  shifts of 10%, horizontal flips, reflected borders), bilinear resize and the same preprocessing.

Each series keeps its best round (the least disturbed by other processes, as timeit advises) and its median;
ratios are given best against best and as the median of the per-round ratios. CPU milliseconds per image (user
+ system time of this process) are printed too: they hardly depend on other processes' load.

Training, per backbone at 299 px (stage 1: frozen backbone, head trained): images per second with in-memory
synthetic batches and with the real input pipeline, a few steps each after warm-up steps that absorb tracing.

    python -m bench.pipeline [--images 320] [--passes 3] [--rounds 5] [--legacy-images 96] [--train-steps 4]
                             [--skip-train]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from common.synthetic import photo, photo_sizes, write_jpeg
from train.backbones import get_backbone
from train.data import DEFAULT_AUGMENT, SkipLog, decode_resize, make_dataset, pipeline_options
from train.model import build_model, freeze_backbone

MAIN_BACKBONES = ("inception_resnet_v2", "xception", "inception_v4")


@dataclass(frozen=True, kw_only=True)
class PipelineBenchConfig:
    """Settings of the input-pipeline and training-speed benchmark."""

    images: int = 320  # a multiple of batch_size: the training pipeline drops a last partial batch
    image_size: int = 299
    batch_size: int = 32
    width: int = 500
    height: int = 700
    passes: int = 3  # times each timed pass reads the files
    rounds: int = 5
    legacy_images: int = 96  # the legacy generator is slow; it reads a prefix of the images each round
    train_batch_size: int = 8
    train_warmup_steps: int = 2
    train_steps: int = 4
    backbones: tuple[str, ...] = MAIN_BACKBONES
    skip_train: bool = False
    workdir: Path | None = None  # where the JPEGs go (kept, reused); default: a temporary folder
    seed: int = 0
    n_classes: int = 13


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_jpegs(folder: Path, config: PipelineBenchConfig) -> list[str]:
    """Write (or reuse) `config.images` synthetic photos of about height x width (+-40 px) as JPEGs in `folder`;
    returns their paths. Each picture depends on its index alone, so reusing some files leaves the others alike."""
    paths = []
    for i, (h, w) in enumerate(photo_sizes(config.images, config.height, config.width, seed=config.seed)):
        path = folder / f"p{i:05d}_{w}x{h}.jpg"
        if not path.exists():
            write_jpeg(path, photo(h, w, seed=(config.seed, i)), quality=90)
        paths.append(str(path))
    return paths


def _ceiling_dataset(paths: list[str], config: PipelineBenchConfig) -> tf.data.Dataset:
    size = config.image_size
    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.repeat(config.passes).map(lambda p: decode_resize(p, size), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())


LEGACY_MISSING = "tf-keras is not installed (`make install-bench` installs it)"


def _legacy_iterator(paths: list[str], labels: np.ndarray, config: PipelineBenchConfig):
    """tf-keras's ImageDataGenerator with the same augmentations and preprocessing (None if tf-keras is missing)."""
    try:
        from tf_keras.preprocessing.image import ImageDataGenerator
    except ImportError:
        return None
    classes = [f"c{k}" for k in range(labels.shape[1])]
    frame = pd.DataFrame(labels, columns=classes)
    frame.insert(0, "path", paths)
    generator = ImageDataGenerator(
        rotation_range=15,
        width_shift_range=0.1,
        height_shift_range=0.1,
        horizontal_flip=True,
        fill_mode="reflect",
        preprocessing_function=lambda x: x / 127.5 - 1.0,
    )
    return generator.flow_from_dataframe(
        frame, x_col="path", y_col=classes, class_mode="raw", target_size=(config.image_size,) * 2,
        batch_size=config.batch_size, shuffle=True, seed=config.seed, interpolation="bilinear",
        validate_filenames=False,
    )


def _time_dataset(ds: tf.data.Dataset) -> tuple[int, float, float]:
    start, cpu = time.perf_counter(), _cpu_seconds()
    n = 0
    for batch in ds:
        images = batch[0] if isinstance(batch, tuple) else batch
        n += int(images.shape[0])
    return n, time.perf_counter() - start, _cpu_seconds() - cpu


def _time_legacy(iterator, n_images: int) -> tuple[int, float, float]:
    start, cpu = time.perf_counter(), _cpu_seconds()
    n = 0
    while n < n_images:
        x, _ = next(iterator)
        n += len(x)
    return n, time.perf_counter() - start, _cpu_seconds() - cpu


@dataclass
class _Series:
    images: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def add(self, n: int, seconds: float, cpu: float) -> None:
        self.images.append(n)
        self.rates.append(n / seconds)
        self.cpu_ms.append(1000.0 * cpu / n)


def whole_batches(paths: list[str], batch_size: int) -> list[str]:
    """The prefix of `paths` that fills whole batches (the training pipeline drops a last partial batch)."""
    return paths[: max(len(paths) // batch_size, 1) * batch_size]


def bench_labels(n: int, config: PipelineBenchConfig) -> np.ndarray:
    """Seeded random multi-label targets for `n` images (the pipeline's cost does not depend on them)."""
    rng = np.random.default_rng(config.seed)
    return (rng.random((n, config.n_classes)) < 0.3).astype(np.float32)


def input_datasets(paths: list[str], labels: np.ndarray, config: PipelineBenchConfig) -> dict[str, tf.data.Dataset]:
    """The tf.data series that `bench_input` times, by name; each reads `paths` `config.passes` times."""

    def pipeline(augment: tuple[str, ...]) -> tf.data.Dataset:
        ds = make_dataset(paths, labels, image_size=config.image_size, preprocessing="inception",
                          batch_size=config.batch_size, training=True, augment=augment, seed=config.seed,
                          epoch=tf.Variable(0, dtype=tf.int64), skips=SkipLog(len(paths)))
        return ds.repeat(config.passes)

    return {
        "ceiling": _ceiling_dataset(paths, config),
        "pipeline": pipeline(DEFAULT_AUGMENT),
        "pipeline_no_augment": pipeline(()),
    }


def bench_input(paths: list[str], config: PipelineBenchConfig) -> dict:
    """Images per second of ceiling, pipeline (default and no augmentation) and legacy, in alternating rounds.

    Each series also reports `images_per_pass`, the images one timed pass read (the same in every round), and
    without tf-keras `legacy_missing` says why the legacy series is absent.
    """
    paths = whole_batches(paths, config.batch_size)  # a partial last batch would count decoded images as lost
    labels = bench_labels(len(paths), config)
    datasets = input_datasets(paths, labels, config)
    legacy = _legacy_iterator(paths, labels, config)
    for ds in datasets.values():  # warm-up: traces the functions and fills the page cache
        _time_dataset(ds)
    if legacy is not None:
        _time_legacy(legacy, config.batch_size)
    series = {name: _Series() for name in [*datasets, "legacy"]}
    for _ in range(config.rounds):
        for name, ds in datasets.items():
            series[name].add(*_time_dataset(ds))
        if legacy is not None:
            series["legacy"].add(*_time_legacy(legacy, config.legacy_images))
    for name, s in series.items():
        if len(set(s.images)) > 1:
            raise RuntimeError(f"series {name} read a different number of images in different rounds: {s.images}")

    def ratios(a: str, b: str) -> tuple[float | None, float | None]:
        if not series[a].rates or not series[b].rates:
            return None, None
        best = max(series[a].rates) / max(series[b].rates)
        return float(best), float(np.median([x / y for x, y in zip(series[a].rates, series[b].rates, strict=True)]))

    result: dict = {
        name: {
            "images_per_pass": s.images[0],
            "images_per_second": float(max(s.rates)),
            "images_per_second_median": float(np.median(s.rates)),
            "cpu_ms_per_image": float(np.median(s.cpu_ms)),
        }
        for name, s in series.items()
        if s.rates
    }
    if legacy is None:
        result["legacy_missing"] = LEGACY_MISSING
    for key, (a, b) in {
        "pipeline_vs_ceiling": ("pipeline", "ceiling"),
        "pipeline_no_augment_vs_ceiling": ("pipeline_no_augment", "ceiling"),
        "pipeline_vs_legacy": ("pipeline", "legacy"),
    }.items():
        result[key], result[key + "_median_of_rounds"] = ratios(a, b)
    result["cpu_ceiling_vs_pipeline"] = result["ceiling"]["cpu_ms_per_image"] / result["pipeline"]["cpu_ms_per_image"]
    return result


class _StepClock(keras.callbacks.Callback):
    """Timestamps of every training batch end, to time the steps after the warm-up."""

    def __init__(self):
        super().__init__()
        self.stamps: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.stamps.append(time.perf_counter())


def bench_training(name: str, paths: list[str], config: PipelineBenchConfig) -> dict:
    """Stage-1 training images per second for one backbone: synthetic in-memory batches vs the real pipeline."""
    backbone = get_backbone(name)
    size, batch = config.image_size, config.train_batch_size
    keras.utils.set_random_seed(config.seed)
    model, features = build_model(backbone, config.n_classes, image_size=size, weights="none", dropout=0.5, l2=0.0)
    freeze_backbone(features)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.BinaryCrossentropy())
    labels = bench_labels(len(paths), config)
    synthetic = tf.data.Dataset.from_tensors(
        (tf.random.uniform([batch, size, size, 3], -1.0, 1.0, seed=config.seed), tf.constant(labels[:batch]))
    ).repeat()
    real = make_dataset(paths, labels, image_size=size, preprocessing=backbone.preprocessing, batch_size=batch,
                        training=True, augment=DEFAULT_AUGMENT, seed=config.seed).repeat()
    steps = config.train_warmup_steps + config.train_steps
    out = {"params": int(model.count_params())}
    for label, ds in (("synthetic", synthetic), ("real", real)):
        clock = _StepClock()
        model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[clock], shuffle=False)
        timed = clock.stamps[config.train_warmup_steps - 1 :]
        out[f"{label}_images_per_second"] = config.train_steps * batch / (timed[-1] - timed[0])
    out["real_vs_synthetic"] = out["real_images_per_second"] / out["synthetic_images_per_second"]
    return out


def run(config: PipelineBenchConfig) -> dict:
    """Run both benchmarks, print their tables, and return the figures."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        folder = Path(config.workdir) if config.workdir else Path(tmp)
        paths = make_jpegs(folder, config)
        print(f"{len(paths)} JPEGs of about {config.width}x{config.height} in {folder}, read {config.passes} times a "
              f"pass; {config.image_size} px, batch {config.batch_size}, {config.rounds} rounds", flush=True)
        figures = {"input": bench_input(paths, config)}
        _print_input(figures["input"], config)
        if not config.skip_train:
            figures["training"] = {}
            for name in config.backbones:
                figures["training"][name] = bench_training(name, paths[: max(config.train_batch_size * 4, 32)], config)
                t = figures["training"][name]
                print(f"  {name:<20} synthetic {t['synthetic_images_per_second']:7.2f} img/s   real "
                      f"{t['real_images_per_second']:7.2f} img/s   real/synthetic {t['real_vs_synthetic']:.2f}",
                      flush=True)
    return figures


def _print_input(result: dict, config: PipelineBenchConfig) -> None:
    print(f"\ninput pipeline at {config.image_size} px ({config.rounds} alternating rounds)")
    print(f"  {'':<22}{'best img/s':>11}{'median img/s':>14}{'CPU ms/image':>14}")
    for name in ("ceiling", "pipeline", "pipeline_no_augment", "legacy"):
        if name in result:
            r = result[name]
            print(f"  {name:<22}{r['images_per_second']:>11.1f}{r['images_per_second_median']:>14.1f}"
                  f"{r['cpu_ms_per_image']:>14.2f}")
    if "legacy_missing" in result:
        print(f"  {'legacy':<22}n/a: {result['legacy_missing']}")
    fmt = lambda v: "  n/a" if v is None else f"{v:5.2f}"  # noqa: E731
    print(f"  {'':<38}{'best':>5}  {'median':>6}")
    for key, label, target in (
        ("pipeline_vs_ceiling", "pipeline / ceiling", "(target >= 0.90)"),
        ("pipeline_no_augment_vs_ceiling", "pipeline, no augmentation / ceiling", ""),
        ("pipeline_vs_legacy", "pipeline / legacy generator", "(target >= 3)"),
    ):
        print(f"  {label:<38}{fmt(result[key])}  {fmt(result[key + '_median_of_rounds'])}   {target}")
    print(f"  {'CPU time per image, ceiling / pipeline':<38}{fmt(result['cpu_ceiling_vs_pipeline'])}")
    if not config.skip_train:
        print(f"\ntraining at {config.image_size} px, stage 1, batch {config.train_batch_size}, "
              f"{config.train_steps} timed steps after {config.train_warmup_steps} warm-up")


def parse_args(argv: list[str] | None) -> PipelineBenchConfig:
    d = PipelineBenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--passes", type=int, default=d.passes)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--legacy-images", type=int, default=d.legacy_images)
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--train-steps", type=int, default=d.train_steps)
    p.add_argument("--backbones", default=",".join(d.backbones))
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--workdir", type=Path)
    a = p.parse_args(argv)
    return PipelineBenchConfig(
        images=a.images, image_size=a.image_size, batch_size=a.batch_size, passes=a.passes, rounds=a.rounds,
        legacy_images=a.legacy_images, train_batch_size=a.train_batch_size, train_steps=a.train_steps,
        backbones=tuple(b for b in a.backbones.split(",") if b), skip_train=a.skip_train, workdir=a.workdir,
    )


def main(argv: list[str] | None = None) -> dict:
    """Entry point for `python -m bench.pipeline` and `python -m bench`; returns the figures."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
