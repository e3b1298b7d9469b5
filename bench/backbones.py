"""Benchmark backbones, losses, k-fold ensembles and recipes on the demo's data (issue 14's comparison).

Every row is one model trained by train's own functions on the demo's training DATA_DIR at the demo's size and
schedule (demo.__main__.DemoConfig: 96 px, batch 16, 3 frozen + 5 fine-tuning epochs, lr 1e-3 / 1e-4, unfreeze
1.0, --weights none, seed 0, validation split 0.2), on ONE replica by default (the demo uses 2; one saves CPU on a
shared machine and needs no BatchNormalization synchronisation). A row is named by a spec, which is also its RUN_DIR
name under --work:

    BACKBONE                      the transfer recipe with bce (the reference entry's setting)
    BACKBONE-asl, BACKBONE-focal  the transfer recipe with that loss (train's --loss)
    BACKBONE-scratch              --recipe scratch: every layer from epoch 1, warm-up + cosine to --epochs
    BACKBONE-Kfold                --folds K: a k-fold folder (fold_0 ...), scored as one model (its folds' mean)

Each model is then scored on the labelled test DATA_DIR by `predict.compare.compare_run` (what `predict compare`
does per run; no TTA): mAP, samples-F2 at 0.5 and at the model's tuned thresholds (a single run's are tuned on its
validation split, a k-fold folder's on its out-of-fold predictions), parameters, and prediction images/s (plain
prediction, warm-up excluded). Training images/s is read from the runs' history.csv: all training images seen over
all epochs (and folds) divided by the epochs' wall time. The replicas column says how many replicas trained the row.

Resumable: a finished RUN_DIR (or k-fold folder) is reused, a killed one resumed by train itself, so the command
can be run again in a later session to add the rows still missing. Each row's test figures are kept in
--work/scores/SPEC.json with the sha256 of its model file(s) and of the test manifest, and reused while both are
unchanged (`--rescore` measures them again, prediction speed included). `--no-train` only scores what has finished and
lists the rest as not measured. `--reuse RUNS` takes the transfer-bce rows that --work has not finished from another
folder of finished RUN_DIRs (e.g. the demo's `demo_out/runs`) when their settings are the bench's (replicas aside).

    python -m bench.backbones [--work bench_out/backbones] [--rows SPEC,...] [--train DATA_DIR] [--test DATA_DIR]
                              [--reuse RUNS] [--no-train] [--rescore] [--devices 1] [--image-size 96 ...]

Writes --work/backbones.md (the table, sorted as the rows were given) and --work/backbones.csv (every figure
unrounded), and prints the table. A separate command, not part of `make bench`: it trains models for an hour or more
on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.atomic import atomic_write_csv, atomic_write_json, atomic_write_text
from demo.__main__ import DEMO_BACKBONES, DemoConfig, chance_map

NEW_BACKBONES = ("efficientnetv2_s", "efficientnetv2_b0", "convnext_tiny", "convnext_small")
LOSSES = ("bce", "focal", "asl")
RECIPES = ("transfer", "scratch")
# Issue 14's comparison, most valuable first: the reference three and the new four (transfer, bce), bce vs asl for
# two backbones, a 5-fold ensemble vs the single run of the same backbone, and scratch vs transfer for the three.
DEFAULT_ROWS = (
    *DEMO_BACKBONES, *NEW_BACKBONES,
    "xception-asl", "efficientnetv2_b0-asl",
    "xception-5fold",
    *(f"{b}-scratch" for b in DEMO_BACKBONES),
)
TABLE_MD, TABLE_CSV = "backbones.md", "backbones.csv"
SCORES_DIR = "scores"  # under --work: each row's test figures with the fingerprints they were measured on
DEMO_DATA = Path("demo_out/data")  # `make demo`'s DATA_DIRs: train/ and test_labelled/
# The settings a reused run must share with the bench's (devices and cache are runtime settings: they may differ).
REUSED_SETTINGS = ("image_size", "batch_size", "frozen_epochs", "epochs", "lr", "finetune_lr", "unfreeze", "weights",
                   "seed", "val_split", "val", "dropout", "l2", "augment", "head")
_KFOLD = re.compile(r"^(\d+)fold$")


@dataclass(frozen=True)
class Row:
    """One row of the table: a backbone with a loss, a recipe and optionally K folds."""

    spec: str  # the row's name and RUN_DIR name
    backbone: str
    loss: str = "bce"
    recipe: str = "transfer"
    folds: int | None = None

    @property
    def label(self) -> str:
        """What the row compares, for the table."""
        return f"{self.recipe}, {self.loss}" + (f", {self.folds}-fold ensemble" if self.folds else "")


def parse_row(spec: str, backbones: Sequence[str]) -> Row:
    """A Row from its spec (see the module docstring); ValueError naming the spec when it is not one."""
    backbone, *options = spec.split("-")
    if backbone not in backbones:
        raise ValueError(f"row {spec!r}: unknown backbone {backbone!r}; known: {', '.join(sorted(backbones))}")
    row = {"spec": spec, "backbone": backbone}
    for option in options:
        kfold = _KFOLD.match(option)
        key = "loss" if option in LOSSES else "recipe" if option in RECIPES else "folds" if kfold else None
        if key is None or key in row:
            raise ValueError(f"row {spec!r}: {option!r} is not a loss ({', '.join(LOSSES)}), a recipe "
                             f"({', '.join(RECIPES)}) or Kfold (e.g. 5fold), or repeats one")
        row[key] = int(kfold.group(1)) if kfold else option
    parsed = Row(**row)
    if parsed.folds is not None and parsed.folds < 2:
        raise ValueError(f"row {spec!r}: k-fold needs at least 2 folds")
    return parsed


@dataclass(frozen=True, kw_only=True)
class BackbonesBenchConfig:
    """Settings of the comparison; the data and training defaults are the demo's (demo.__main__.DemoConfig)."""

    work: Path = Path("bench_out/backbones")
    train_data: Path = DEMO_DATA / "train"
    test_data: Path = DEMO_DATA / "test_labelled"
    rows: tuple[str, ...] = DEFAULT_ROWS
    reuse: Path | None = None  # a folder of finished transfer-bce RUN_DIRs named by backbone (the demo's runs)
    train: bool = True  # False: score only the finished rows, list the others as not measured
    rescore: bool = False  # True: measure every row's test figures again, even for an unchanged model
    image_size: int = DemoConfig.image_size
    batch_size: int = DemoConfig.batch_size
    frozen_epochs: int = DemoConfig.frozen_epochs
    epochs: int = DemoConfig.epochs
    unfreeze: float = DemoConfig.unfreeze
    lr: float = DemoConfig.lr
    finetune_lr: float = DemoConfig.finetune_lr
    seed: int = DemoConfig.seed
    val_split: float = 0.2  # the demo's
    devices: int = 1  # not the demo's 2: one replica saves CPU on a shared machine
    predict_batch_size: int = 16

    def parsed_rows(self) -> list[Row]:
        """The rows, checked (ValueError on a bad or repeated spec)."""
        from train.backbones import BACKBONES

        if not self.rows:
            raise ValueError("--rows: give at least one row")
        repeated = sorted({s for s in self.rows if self.rows.count(s) > 1})
        if repeated:
            raise ValueError(f"--rows: repeated row(s) {repeated}")
        return [parse_row(s, tuple(BACKBONES)) for s in self.rows]


# --- training -------------------------------------------------------------------------------------------------------


def train_config(config: BackbonesBenchConfig, row: Row):
    """The TrainConfig of one row: the demo's schedule, the row's loss, recipe and folds."""
    from train.config import TrainConfig

    # Absolute paths, as the CLI records what it is given: `python -m train` with absolute paths resumes the same runs.
    common = dict(data_dir=Path(config.train_data).resolve(), backbone=row.backbone,
                  out=Path(config.work).resolve() / row.spec,
                  image_size=config.image_size, batch_size=config.batch_size, epochs=config.epochs, lr=config.lr,
                  weights="none", devices=config.devices, seed=config.seed)
    if row.loss != "bce":
        common["loss"] = row.loss
    if row.folds is not None:
        common["folds"] = row.folds  # k-fold replaces the validation split
    else:
        common["val_split"] = config.val_split
    if row.recipe == "scratch":
        return TrainConfig(recipe="scratch", **common)
    return TrainConfig(frozen_epochs=config.frozen_epochs, finetune_lr=config.finetune_lr, unfreeze=config.unfreeze,
                       **common)


def finished(row: Row, path: Path) -> bool:
    """Whether the row's RUN_DIR (or k-fold folder) holds a finished model."""
    if row.folds is not None:
        try:
            from train.kfold_dir import KFOLD_FILE
        except ImportError:  # a checkout from before `--folds`: it cannot have trained one
            return False
        return (path / KFOLD_FILE).is_file()
    from train import rundir

    return rundir.read_metrics(path) is not None and not (path / rundir.BACKUP_DIR).exists()


def reusable(config: BackbonesBenchConfig, row: Row) -> Path | None:
    """The finished RUN_DIR under --reuse for a transfer-bce row, when its settings are the bench's; else None."""
    if config.reuse is None or row.loss != "bce" or row.recipe != "transfer" or row.folds is not None:
        return None
    from train import rundir

    path = Path(config.reuse).resolve() / row.backbone
    if not (path / rundir.CONFIG_FILE).is_file() or not finished(row, path):
        return None
    theirs = rundir.read_config(path).train
    ours = train_config(config, row).resolve().to_json()
    same = all(theirs.get(k) == ours.get(k) for k in REUSED_SETTINGS) and theirs.get("loss", "bce") == "bce"
    return path if same and rundir.read_config(path).backbone["name"] == row.backbone else None


def train_row(config: BackbonesBenchConfig, row: Row, strategy) -> Path:
    """Train (or resume, or reuse) the row's model; returns its RUN_DIR or k-fold folder."""
    cfg = train_config(config, row)
    if row.folds is not None:
        from train.kfold import train_kfold

        train_kfold(cfg, strategy=strategy, verbose=2)
    else:
        from train.fit import train

        train(cfg, strategy=strategy, verbose=2)
    return cfg.out


# --- scoring --------------------------------------------------------------------------------------------------------


def run_dirs(row: Row, path: Path) -> list[Path]:
    """The RUN_DIRs that trained a row: its folds for a k-fold folder, else the RUN_DIR itself."""
    if row.folds is None:
        return [path]
    from train.kfold_dir import fold_dirs

    return fold_dirs(path)


def training_figures(row: Row, path: Path) -> dict:
    """Training images/s over all epochs (and folds), per stage, the replicas and the epochs, from the RUN_DIRs."""
    from train import rundir

    history = pd.concat([rundir.read_history(d) for d in run_dirs(row, path)], ignore_index=True)
    images = history["seconds"] * history["images_per_second"]  # history.csv's images_per_second is per epoch

    def rate(mask) -> float:
        seconds = float(history["seconds"][mask].sum())
        return float(images[mask].sum()) / seconds if seconds > 0 else float("nan")

    replicas = {int(rundir.read_config(d).runtime["replicas"]) for d in run_dirs(row, path)}
    return {
        "train_images_per_second": rate(history["stage"] > 0),
        "train_images_per_second_stage1": rate(history["stage"] == 1),
        "train_images_per_second_stage2": rate(history["stage"] == 2),
        "train_seconds_epochs": float(history["seconds"].sum()),
        "epochs_run": int(len(history)),
        "replicas": max(replicas),
    }


def model_fingerprint(row: Row, path: Path) -> str:
    """The sha256 of the row's model file(s): a row's test figures are reused while it is unchanged."""
    from train import rundir

    return ",".join(rundir.model_sha256(d) for d in run_dirs(row, path))


def test_figures(config: BackbonesBenchConfig, row: Row, path: Path) -> dict:
    """predict's compare row for the model on the labelled test DATA_DIR (no TTA), kept in --work/scores/ with the
    model's and the test data's fingerprints: a later call reuses it while both are unchanged (--rescore: never)."""
    from crawl.manifest import manifest_sha256
    from predict.compare import compare_run

    key = {"model_sha256": model_fingerprint(row, path), "test_manifest_sha256": manifest_sha256(config.test_data),
           "predict_batch_size": config.predict_batch_size}
    cache = Path(config.work) / SCORES_DIR / f"{row.spec}.json"
    if not config.rescore and cache.is_file():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return kept["figures"]
    figures = compare_run(path, config.test_data, tta=1, batch_size=config.predict_batch_size, progress=False)
    atomic_write_json(cache, {"key": key, "figures": figures})
    return figures


def score_row(config: BackbonesBenchConfig, row: Row, path: Path) -> dict:
    """The row's figures: predict's compare row on the labelled test DATA_DIR and the training figures."""
    scored = test_figures(config, row, path)
    return {
        "row": row.spec, "backbone": row.backbone, "loss": row.loss, "recipe": row.recipe, "folds": row.folds or 1,
        "map": scored["map"], "f2_at_0.5": scored["f2_at_0.5"], "f2_at_tuned": scored["f2_at_tuned"],
        "params": scored["params"], **training_figures(row, path),
        "predict_images_per_second": scored["images_per_second"], "run_dir": str(path),
    }


def run_benchmark(config: BackbonesBenchConfig) -> dict:
    """Train (or reuse) and score every row in order; returns {"rows": [...], "missing": [...], "seconds"}."""
    from common.tf_logging import quiet_tensorflow_startup

    quiet_tensorflow_startup()  # before the first TensorFlow import
    rows = config.parsed_rows()
    from train.devices import make_strategy

    started = time.monotonic()
    strategy = make_strategy(config.devices) if config.train else None  # before any other TF op
    scored, missing = [], []
    for row in rows:
        own = Path(config.work).resolve() / row.spec
        reused = None if finished(row, own) else reusable(config, row)  # the bench's own run comes first
        path = reused or own
        if not finished(row, path):
            if not config.train:
                missing.append(row.spec)
                continue
            print(f"\n== {row.spec} ({row.label}): {path}", flush=True)
            path = train_row(config, row, strategy)
        figures = score_row(config, row, path)
        figures["reused_from"] = str(reused) if reused else ""
        scored.append(figures)
        print(f"   {row.spec}: test mAP {figures['map']:.4f}, F2 @0.5 {figures['f2_at_0.5']:.4f}, "
              f"@tuned {figures['f2_at_tuned']:.4f}", flush=True)
    return {"rows": scored, "missing": missing, "chance_map": chance_map(config.test_data),
            "seconds": round(time.monotonic() - started, 1)}


# --- report ---------------------------------------------------------------------------------------------------------

# (key, header, format): the one place the table's rounding is defined; the CSV keeps every figure unrounded.
COLUMNS = (
    ("row", "row", "s"),
    ("backbone", "backbone", "s"),
    ("recipe", "recipe", "s"),
    ("loss", "loss", "s"),
    ("folds", "models", "d"),
    ("map", "mAP", ".4f"),
    ("f2_at_0.5", "F2 @0.5", ".4f"),
    ("f2_at_tuned", "F2 @tuned", ".4f"),
    ("params", "params (M)", "params"),
    ("train_images_per_second", "train img/s", ".1f"),
    ("predict_images_per_second", "predict img/s", ".1f"),
    ("replicas", "replicas", "d"),
)


def cell(value, fmt: str) -> str:
    """One table cell: parameters in millions, anything else with its format."""
    return f"{value / 1e6:.2f}" if fmt == "params" else format(value, fmt)


def markdown(result: dict) -> str:
    """The table in row order, then the rows not measured."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "| " + " | ".join("---" if f == "s" else "---:" for _, _, f in COLUMNS) + " |"]
    for r in result["rows"]:
        lines.append("| " + " | ".join(cell(r[k], f) for k, _, f in COLUMNS) + " |")
    lines += ["", f"Chance level (a random scorer's mAP, about the test set's mean class prevalence): "
                  f"{result['chance_map']:.3f}."]
    if result["missing"]:
        lines += ["", f"Not measured yet: {', '.join(result['missing'])}."]
    return "\n".join(lines) + "\n"


def write_report(config: BackbonesBenchConfig, result: dict) -> str:
    """Write backbones.md and backbones.csv under --work; returns the Markdown."""
    table = markdown(result)
    config.work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.work / TABLE_MD, table)
    atomic_write_csv(config.work / TABLE_CSV, pd.DataFrame(result["rows"]))
    return table


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def main(argv: list[str] | None = None) -> int:
    d = BackbonesBenchConfig
    parser = argparse.ArgumentParser(prog="python -m bench.backbones", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=d.work, help="RUN_DIRs and the tables; finished runs are reused")
    parser.add_argument("--train", type=Path, default=d.train_data, help="labelled training DATA_DIR")
    parser.add_argument("--test", type=Path, default=d.test_data, help="labelled test DATA_DIR the rows are scored on")
    parser.add_argument("--rows", type=_names, default=d.rows,
                        help="comma-separated row specs: BACKBONE[-LOSS][-scratch][-Kfold] (default: issue 14's)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="take transfer-bce rows from this folder of finished RUN_DIRs named by backbone")
    parser.add_argument("--no-train", action="store_true", help="score only the finished rows")
    parser.add_argument("--rescore", action="store_true",
                        help="measure the test figures again (else kept per row while its model is unchanged)")
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--frozen-epochs", type=int, default=d.frozen_epochs)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    parser.add_argument("--unfreeze", type=float, default=d.unfreeze)
    parser.add_argument("--val-split", type=float, default=d.val_split)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--devices", type=int, default=d.devices)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    config = BackbonesBenchConfig(
        work=args.work, train_data=args.train, test_data=args.test, rows=args.rows, reuse=args.reuse,
        train=not args.no_train, rescore=args.rescore, image_size=args.image_size, batch_size=args.batch_size,
        frozen_epochs=args.frozen_epochs, epochs=args.epochs, lr=args.lr, finetune_lr=args.finetune_lr,
        unfreeze=args.unfreeze, val_split=args.val_split, seed=args.seed, devices=args.devices,
    )
    try:
        config.parsed_rows()
    except ValueError as err:
        parser.error(str(err))
    result = run_benchmark(config)
    table = write_report(config, result)
    print(f"\nbackbones benchmark: {config.image_size} px, {config.frozen_epochs} frozen + "
          f"{config.epochs - config.frozen_epochs} fine-tuning epochs (scratch: {config.epochs} epochs), weights "
          f"none, seed {config.seed}, {config.devices} replica(s) ({result['seconds']:.0f} s)\n")
    print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps({"config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
                                                 **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
