"""Benchmark the heads: the sigmoid head (with tuned thresholds, the bar to beat) against the CNN -> RNN decoder.

Issue 11's honest comparison, on the demo's generated data (demo.generate: exactly one garment and one colour per
image, then patterns, sleeves and a belt): the train and test lists are drawn once, written as DATA_DIRs through
crawl.manifest (each image checked by the crawl's own `process_image`; the list's broken entries become
failed.csv rows, as a crawl leaves them), and every head is trained by `train.fit.train` with the SAME backbone,
input size, weights (none), schedule and epochs as the demo (96 px, 3 frozen + 5 fine-tuning epochs), on one
replica (see `HeadsBenchConfig.devices`). Runs of one seed share the validation split. Each run is then scored on
the labelled test set through `predict` (`load_run`, `predict_ensemble`, `evaluation_report`, train.metrics):

- mAP; samples-F2 at 0.5 and at the run's tuned per-class thresholds (metrics.json, tuned on validation);
- mean predicted labels per image (at 0.5 and tuned) against the mean true count, the share of empty
  predictions, and the rate of structure violations: a predicted set without exactly one garment and exactly
  one colour (`structure`, a pure function);
- parameters (metrics.json), training images/s per stage (history.csv) and prediction images/s (warm-up excluded).

`--data shapes` runs the same comparison on a second kind of labelled data, with no structure: the coloured shapes
of the train tests' generator (`tests.datagen.make_data_dir`; bench modules may use the test helpers, imported
only for this data kind). A training DATA_DIR (seed --data-seed) and a separate labelled test DATA_DIR (seed
--data-seed + 1) of the demo's sizes (--n-train, --n-test), --n-classes of tests.datagen's 5 shapes (all 5 by
default), each image square with the demo's mean side ((--min-side + --max-side) // 2 = 550 px), written through
crawl.manifest. Each class is drawn independently (prevalence 0.4), with `every_image_labelled`: an image that drew
no class gets one at random, so no image has an empty label set, as on the demo. The rnn head would not need it
(train lets the decoder emit the empty set when some training image has none), but with it both data kinds
ask the same of the heads: never predict the empty set. As the classes are independent there is no structure to
break: the structure-violation figures are not applicable (null in the JSON, "n/a" in the tables); every other
figure is computed as for the demo.

Everything goes under --work (default bench_out/heads): a second call reuses the generated images and every
finished RUN_DIR, and resumes a killed one (train's own resume), so a crash loses nothing. The demo's data and runs
are directly under it (generated/, lists/, data/, runs/, heads.md); the shapes' under its shapes/ folder (data/,
runs/, heads.md, with the same run names), so each kind reuses its own runs.

    python -m bench.heads [--data demo|shapes] [--seeds 0,1,2] [--heads sigmoid,lstm] [--backbone xception]
                          [--work bench_out/heads] [--epochs 8 --frozen-epochs 3] [--n-classes 5] [--json FILE]

`--heads` takes sigmoid, lstm and gru (the rnn head with that cell).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_text
from crawl import manifest as mf
from crawl.images import ImageRejected, process_image
from crawl.listfile import parse_list
from demo.__main__ import DemoConfig
from demo.generate import COLOURS, GARMENTS, DemoDataConfig, generate, with_base_url

HEADS = ("sigmoid", "lstm", "gru")  # "lstm" and "gru" are --head rnn with that --rnn-cell
BASE_URL = "http://demo.invalid"  # the lists' URL token replaced by a fixed address: the DATA_DIRs are reproducible
STRUCTURE = (tuple(GARMENTS), tuple(COLOURS))  # exactly one class of each group is true on every demo image
MAX_PIXELS = 50_000_000  # the crawl's default --max-pixels
DATA_KINDS = ("demo", "shapes")
SHAPES_DIR = "shapes"  # the shapes' work folder under --work (the demo's files stay directly under it)
N_SHAPE_CLASSES = 5  # len(tests.datagen.SHAPES): the generator draws at most this many classes


@dataclass(frozen=True, kw_only=True)
class HeadsBenchConfig:
    """Settings of the head comparison; the data and training defaults are the demo's (demo.__main__.DemoConfig)."""

    work: Path = Path("bench_out/heads")
    data: str = "demo"  # or "shapes" (tests.datagen's independent classes)
    n_classes: int = N_SHAPE_CLASSES  # shapes only: the demo's classes are demo.generate's
    n_train: int = DemoConfig.n_train
    n_test: int = DemoConfig.n_test
    data_seed: int = DemoConfig.seed
    min_side: int = 300  # demo.generate's image sizes; the shapes are square with the mean side
    max_side: int = 800
    backbone: str = "xception"  # the demo's fastest backbone that learns well from random weights
    image_size: int = DemoConfig.image_size
    batch_size: int = DemoConfig.batch_size
    frozen_epochs: int = DemoConfig.frozen_epochs
    epochs: int = DemoConfig.epochs
    unfreeze: float = DemoConfig.unfreeze
    lr: float = DemoConfig.lr
    finetune_lr: float = DemoConfig.finetune_lr
    # Not the demo's 2: with 2 replicas, validation crashes when the validation set leaves one image in its last
    # batch (one replica gets an empty batch; BatchNormalization fails on it), as seed 1's split does here.
    devices: int = 1
    val_split: float = 0.2  # the demo's
    heads: tuple[str, ...] = ("sigmoid", "lstm")
    seeds: tuple[int, ...] = (0, 1, 2)
    rnn_units: int = 512  # train's defaults for the rnn head
    label_embedding: int = 64
    predict_batch_size: int = 16

    def __post_init__(self):
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown or not self.heads:
            raise ValueError(f"--heads: unknown head(s) {unknown or 'none given'}; known: {', '.join(HEADS)}")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.data not in DATA_KINDS:
            raise ValueError(f"--data: unknown data kind {self.data!r}; known: {', '.join(DATA_KINDS)}")
        if self.data == "shapes" and not 1 <= self.n_classes <= N_SHAPE_CLASSES:
            raise ValueError(f"--n-classes: {self.n_classes}; the shapes generator draws 1 to {N_SHAPE_CLASSES}")

    @property
    def kind_dir(self) -> Path:
        """This data kind's work folder: --work itself for the demo (as before --data), --work/shapes otherwise."""
        return self.work if self.data == "demo" else self.work / SHAPES_DIR

    @property
    def shapes_side(self) -> int:
        """The side of every shapes image: the mean of the demo's sides."""
        return (self.min_side + self.max_side) // 2

    @property
    def groups(self) -> tuple[tuple[str, ...], ...] | None:
        """The structure of the data's label sets (exactly one class of each group), or None when it has none."""
        return STRUCTURE if self.data == "demo" else None


# --- the structure of a predicted set (pure) ------------------------------------------------------------------------


def structure(
    y_pred: np.ndarray, classes: Sequence[str], groups: Sequence[Sequence[str]] | None = STRUCTURE
) -> dict:
    """What a 0/1 prediction matrix (images x classes) looks like as sets: mean labels per image, the share of empty
    sets, and the share of sets that break the structure (not exactly one class of each group; None when `groups`
    is None: data without structure has nothing to break)."""
    y = np.asarray(y_pred).astype(bool)
    classes = list(classes)
    if y.ndim != 2 or y.shape[1] != len(classes):
        raise ValueError(f"predictions have shape {y.shape}, expected (images, {len(classes)})")
    if y.shape[0] == 0:
        raise ValueError("no predictions")
    missing = [c for group in groups or () for c in group if c not in classes]
    if missing:
        raise ValueError(f"structure classes not among the classes: {missing}")
    counts = y.sum(axis=1)
    ok = np.ones(len(y), dtype=bool)
    for group in groups or ():
        ok &= y[:, [classes.index(c) for c in group]].sum(axis=1) == 1
    return {
        "labels_per_image": float(counts.mean()),
        "empty_share": float((counts == 0).mean()),
        "violation_rate": None if groups is None else float((~ok).mean()),
    }


def spread(values: Sequence[float | None]) -> dict | None:
    """Mean, sample standard deviation (0 for one value), min and max of a run metric over seeds; None when the
    metric is not applicable (None) for the runs."""
    if any(v is None for v in values):
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


# --- data --------------------------------------------------------------------------------------------------------


def _write_data_dir(list_path: Path, classes_path: Path, images: Path, root: Path) -> Path:
    """A labelled DATA_DIR from a generated list: each listed file checked as the crawl checks a download, hard-linked
    (or copied) under root/images/; a missing or rejected file becomes a failed.csv row with the crawl's reason."""
    parsed = parse_list(list_path, classes_path)
    (root / mf.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    stored, failed = [], []
    for item in parsed.items:
        source = images / item.url.rsplit("/", 1)[-1]
        if not source.is_file():
            failed.append(mf.FailedRow(item.id, item.url, "http_404", f"{source.name} does not exist", 1))
            continue
        data = source.read_bytes()
        try:
            image = process_image(data, max_pixels=MAX_PIXELS)
        except ImageRejected as err:
            failed.append(mf.FailedRow(item.id, item.url, err.reason, err.detail, 1))
            continue
        if not image.unchanged:  # the demo writes plain RGB JPEGs, which the crawl stores byte for byte
            raise RuntimeError(f"{source}: the crawl would convert this file; demo.generate changed?")
        rel = mf.image_path(item.id, ".jpg")
        target = root / rel
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        stored.append(mf.ManifestRow.of_file(data, id=item.id, path=rel, url=item.url, width=image.width,
                                             height=image.height, labels=item.labels))
    return mf.write_data_dir(root, classes=parsed.classes, entries=parsed.items, stored=stored, failed=failed)


def make_data(config: HeadsBenchConfig) -> dict[str, Path]:
    """The train and labelled test DATA_DIRs of the config's data kind; returns {"train": DATA_DIR, "test": ...}."""
    return make_demo_data(config) if config.data == "demo" else make_shapes_data(config)


def make_demo_data(config: HeadsBenchConfig) -> dict[str, Path]:
    """Draw the demo's train and test images (reused when already drawn) and write the train and labelled test
    DATA_DIRs; returns {"train": DATA_DIR, "test": DATA_DIR}."""
    generated = config.work / "generated"
    lists = generate(DemoDataConfig(out=generated, n_train=config.n_train, n_test=config.n_test,
                                    min_side=config.min_side, max_side=config.max_side, seed=config.data_seed))
    dirs = {}
    for name, key in (("train", "train_list"), ("test", "test_labels")):
        resolved = with_base_url(lists[key], BASE_URL, config.work / "lists" / lists[key].name)
        dirs[name] = _write_data_dir(resolved, lists["classes"], generated / "images", config.work / "data" / name)
    return dirs


def make_shapes_data(config: HeadsBenchConfig) -> dict[str, Path]:
    """Write tests.datagen's labelled DATA_DIRs of independent shapes: train (seed data_seed) and test (seed
    data_seed + 1), every image labelled. Redrawn on every call: the same settings write the same bytes (so the
    manifests, which the runs record, are unchanged and finished runs are reused); other settings other data."""
    from tests.datagen import make_data_dir  # a test helper: imported only for this data kind

    side = config.shapes_side
    dirs = {}
    for i, (name, n) in enumerate((("train", config.n_train), ("test", config.n_test))):
        root = config.kind_dir / "data" / name
        make_data_dir(root, n, config.n_classes, seed=config.data_seed + i, size=(side, side), id_prefix=f"{name}_",
                      every_image_labelled=True)
        dirs[name] = root
    return dirs


# --- training and scoring ----------------------------------------------------------------------------------------


def run_name(config: HeadsBenchConfig, head: str, seed: int) -> str:
    return f"{config.backbone}-{config.image_size}px-{head}-seed{seed}"


def train_config(config: HeadsBenchConfig, data_dir: Path, head: str, seed: int):
    """The TrainConfig of one run: everything but the head (and the seed) is the same for every run."""
    from train.config import TrainConfig

    rnn = {} if head == "sigmoid" else {"head": "rnn", "rnn_cell": head, "rnn_units": config.rnn_units,
                                        "label_embedding": config.label_embedding}
    return TrainConfig(
        data_dir=data_dir, backbone=config.backbone, out=config.kind_dir / "runs" / run_name(config, head, seed),
        val_split=config.val_split, image_size=config.image_size, batch_size=config.batch_size,
        frozen_epochs=config.frozen_epochs, epochs=config.epochs, lr=config.lr, finetune_lr=config.finetune_lr,
        unfreeze=config.unfreeze, weights="none", devices=config.devices, seed=seed, **rnn,
    )


def score_run(run_dir: Path, test_dir: Path, *, batch_size: int, head: str, seed: int,
              groups: Sequence[Sequence[str]] | None = STRUCTURE) -> dict:
    """One finished RUN_DIR scored on the labelled test DATA_DIR, with its training figures from the RUN_DIR
    (`groups`: the data's structure, None for none: the violation rates are then None)."""
    from predict.evaluate import evaluation_report, load_labelled
    from predict.inference import predict_ensemble
    from predict.runs import load_run
    from predict.thresholds import apply_thresholds
    from train import rundir

    run = load_run(run_dir)
    images = load_labelled(test_dir, run.classes)
    prediction = predict_ensemble([run], images.paths, ids=images.ids, batch_size=batch_size, progress=False,
                                  warmup=True)
    probs, truth = prediction.probabilities, images.labels
    thresholds = {"0.5": np.full(len(run.classes), 0.5), "tuned": run.tuned_thresholds}
    row = {"head": head, "seed": seed, "run_dir": str(run_dir)}
    for name, t in thresholds.items():
        report = evaluation_report(truth, probs, run.classes, t)  # mAP is threshold-free; F2 at these thresholds
        row["map"] = report["map"]
        row[f"f2_at_{name}"] = report["f2"]
        for key, value in structure(apply_thresholds(probs, t), run.classes, groups).items():
            row[f"{key}_at_{name}"] = value
    row["true_labels_per_image"] = structure(truth, run.classes, groups)["labels_per_image"]
    metrics = rundir.read_metrics(run_dir) or {}
    history = rundir.read_history(run_dir)
    per_stage = history.groupby("stage")["images_per_second"].mean()
    row.update(
        {
            "val_map": float(metrics["val_map"]),
            "best_epoch": int(metrics["best_epoch"]),
            "params": int(metrics["params"]),
            "train_seconds": float(metrics["train_seconds"]),
            "train_images_per_second_stage1": float(per_stage.get(1, float("nan"))),
            "train_images_per_second_stage2": float(per_stage.get(2, float("nan"))),
            "predict_images_per_second": float(prediction.images_per_second),
            "test_images": len(images.ids),
        }
    )
    return row


SUMMARY_KEYS = (
    "map", "f2_at_0.5", "f2_at_tuned", "labels_per_image_at_0.5", "labels_per_image_at_tuned", "true_labels_per_image",
    "empty_share_at_0.5", "empty_share_at_tuned", "violation_rate_at_0.5", "violation_rate_at_tuned", "params",
    "train_images_per_second_stage1", "train_images_per_second_stage2", "predict_images_per_second", "val_map",
)


def summarise(rows: Sequence[dict], heads: Sequence[str]) -> dict:
    """Per head: the spread over seeds of every SUMMARY_KEYS figure."""
    return {h: {k: spread([r[k] for r in rows if r["head"] == h]) for k in SUMMARY_KEYS}
            for h in heads if any(r["head"] == h for r in rows)}


def run_benchmark(config: HeadsBenchConfig) -> dict:
    """Make the data, train (or reuse) every head x seed run one at a time, score each on the test set."""
    from common.tf_logging import quiet_tensorflow_startup

    quiet_tensorflow_startup()  # before the first TensorFlow import
    from train.devices import make_strategy
    from train.fit import train

    started = time.monotonic()
    strategy = make_strategy(config.devices)  # before any other TF op: splits the CPU into logical devices
    dirs = make_data(config)
    print(f"DATA_DIRs: {dirs['train']} and {dirs['test']} ({time.monotonic() - started:.0f} s)", flush=True)
    rows = []
    for seed in config.seeds:
        for head in config.heads:
            cfg = train_config(config, dirs["train"], head, seed)
            print(f"\n== {head}, seed {seed}: {cfg.out}", flush=True)
            result = train(cfg, strategy=strategy, verbose=2)
            row = score_run(result.run_dir, dirs["test"], batch_size=config.predict_batch_size, head=head, seed=seed,
                            groups=config.groups)
            row["reused"] = result.already_complete
            rows.append(row)
            print(f"   test mAP {row['map']:.4f}, F2 @0.5 {row['f2_at_0.5']:.4f}, F2 @tuned {row['f2_at_tuned']:.4f}",
                  flush=True)
    data = mf.read_data_dir(dirs["test"])
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "data": {
            "kind": config.data, "train_dir": str(dirs["train"]), "test_dir": str(dirs["test"]),
            "classes": list(data.classes), "test_images": len(data.manifest),
            "truth": structure(data.labels(), data.classes, config.groups),
        },
        "runs": rows,
        "summary": summarise(rows, config.heads),
        "seconds": round(time.monotonic() - started, 1),
    }


# --- report ------------------------------------------------------------------------------------------------------

# (JSON key, column header, format): the one place the tables' rounding is defined.
COLUMNS = (
    ("map", "mAP", ".4f"),
    ("f2_at_0.5", "F2 @0.5", ".4f"),
    ("f2_at_tuned", "F2 @tuned", ".4f"),
    ("labels_per_image_at_0.5", "labels/img @0.5", ".2f"),
    ("labels_per_image_at_tuned", "labels/img @tuned", ".2f"),
    ("true_labels_per_image", "true labels/img", ".2f"),
    ("empty_share_at_0.5", "empty @0.5", ".3f"),
    ("empty_share_at_tuned", "empty @tuned", ".3f"),
    ("violation_rate_at_0.5", "struct. viol. @0.5", ".3f"),
    ("violation_rate_at_tuned", "struct. viol. @tuned", ".3f"),
    ("params", "params (M)", "params"),
    ("train_images_per_second_stage1", "train img/s st.1", ".1f"),
    ("train_images_per_second_stage2", "train img/s st.2", ".1f"),
    ("predict_images_per_second", "predict img/s", ".1f"),
)


NOT_APPLICABLE = "n/a"  # the cell of a figure the data has no use for (None in the JSON)


def cell(value: float | None, fmt: str) -> str:
    """One table cell: parameters in millions, anything else with its format; "n/a" for None."""
    if value is None:
        return NOT_APPLICABLE
    return f"{value / 1e6:.2f}" if fmt == "params" else format(value, fmt)


def head_label(head: str) -> str:
    return "sigmoid" if head == "sigmoid" else f"rnn ({head})"


def markdown(result: dict) -> str:
    """The per-run table, then per head the mean ± std over seeds (min and max are in the JSON)."""
    headers = [h for _, h, _ in COLUMNS]
    lines = ["| head | seed | " + " | ".join(headers) + " |", "| --- | ---: |" + " ---: |" * len(headers)]
    for r in result["runs"]:
        lines.append(f"| {head_label(r['head'])} | {r['seed']} | "
                     + " | ".join(cell(r[k], f) for k, _, f in COLUMNS) + " |")
    lines += ["", "| head | runs | " + " | ".join(headers) + " |", "| --- | ---: |" + " ---: |" * len(headers)]
    for head, figures in result["summary"].items():
        n = figures["map"]["n"]
        cells = [NOT_APPLICABLE if figures[k] is None
                 else f"{cell(figures[k]['mean'], f)} ± {cell(figures[k]['std'], f)}" for k, _, f in COLUMNS]
        lines.append(f"| {head_label(head)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def title(config: HeadsBenchConfig, result: dict) -> str:
    """One line saying what the tables measured."""
    data = "" if config.data == "demo" else (
        f"shapes data ({len(result['data']['classes'])} independent classes, {config.shapes_side} px), ")
    return (f"heads benchmark: {data}{config.backbone} at {config.image_size} px, weights none, {config.frozen_epochs} "
            f"frozen + {config.epochs - config.frozen_epochs} fine-tuning epochs, {config.devices} replica(s), "
            f"{config.n_train} train / {result['data']['test_images']} test images, seeds "
            f"{','.join(map(str, config.seeds))} ({result['seconds']:.0f} s)")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def main(argv: list[str] | None = None) -> int:
    d = HeadsBenchConfig
    parser = argparse.ArgumentParser(prog="python -m bench.heads", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=d.work, help="data and RUN_DIRs; finished runs are reused")
    parser.add_argument("--data", choices=DATA_KINDS, default=d.data,
                        help="demo: demo.generate's garments; shapes: tests.datagen's independent shapes")
    parser.add_argument("--n-classes", type=int, default=d.n_classes, help="--data shapes: how many shape classes")
    parser.add_argument("--data-seed", type=int, default=d.data_seed, help="the generators' seed")
    parser.add_argument("--heads", type=_names, default=d.heads, help=f"comma-separated, of {', '.join(HEADS)}")
    parser.add_argument("--seeds", type=_ints, default=d.seeds, help="comma-separated training seeds")
    parser.add_argument("--backbone", default=d.backbone)
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--n-train", type=int, default=d.n_train)
    parser.add_argument("--n-test", type=int, default=d.n_test)
    parser.add_argument("--min-side", type=int, default=d.min_side,
                        help="generated image sizes (px); the shapes are square with the mean side")
    parser.add_argument("--max-side", type=int, default=d.max_side)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--frozen-epochs", type=int, default=d.frozen_epochs)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    parser.add_argument("--devices", type=int, default=d.devices)
    parser.add_argument("--rnn-units", type=int, default=d.rnn_units)
    parser.add_argument("--label-embedding", type=int, default=d.label_embedding)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        config = HeadsBenchConfig(
            work=args.work, data=args.data, n_classes=args.n_classes, data_seed=args.data_seed, heads=args.heads,
            seeds=args.seeds, backbone=args.backbone, image_size=args.image_size,
            n_train=args.n_train, n_test=args.n_test, min_side=args.min_side, max_side=args.max_side,
            batch_size=args.batch_size, frozen_epochs=args.frozen_epochs, epochs=args.epochs, lr=args.lr,
            finetune_lr=args.finetune_lr, devices=args.devices, rnn_units=args.rnn_units,
            label_embedding=args.label_embedding,
        )
    except ValueError as err:
        parser.error(str(err))
    result = run_benchmark(config)
    table = markdown(result)
    print(f"\n{title(config, result)}\n")
    print(table)
    atomic_write_text(config.kind_dir / "heads.md", table + "\n")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
