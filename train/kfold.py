"""K-fold training: K stratified folds of the training DATA_DIR, each a RUN_DIR, then the out-of-fold predictions.

`train_kfold(config)` trains the folds one after another (or the one `config.fold`) with `train.fit.train`, each
into `--out/fold_<i>` and validated on its held-out part (`train.split.stratified_kfold`: iterative stratification
seeded by --seed, so every run of the command sees the same folds). A fold is an ordinary run: killed, it resumes
like one; finished, it is skipped. Once every fold is finished, `summarize` joins their held-out predictions (each
fold's best model on its held-out part: its val_predictions.csv) into oof_predictions.csv, one row per readable
training image, and writes kfold.json with the OOF mAP and the per-class F2 thresholds tuned on them
(train.kfold_dir owns both files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from crawl.manifest import read_data_dir
from train import kfold_dir, rundir
from train.config import TrainConfig
from train.devices import make_strategy
from train.fit import TrainResult, train
from train.metrics import f2_samples, mean_average_precision, tune_thresholds
from train.rundir import RunDirError


@dataclass(frozen=True)
class KFoldResult:
    """What a k-fold command left: the folder, each trained fold's result, and the summary once all are finished."""

    root: Path
    results: list[TrainResult]  # the folds trained (or found finished) by this call, in fold order
    summary: dict | None  # kfold.json's content; None while some fold is unfinished
    unfinished: list[int]


def fold_config(cfg: TrainConfig, fold: int) -> TrainConfig:
    """The settings of one fold's RUN_DIR: the k-fold settings with its own --out and --fold."""
    return dataclasses.replace(cfg, out=kfold_dir.fold_dir(cfg.out, fold), fold=fold)


def train_kfold(
    config: TrainConfig,
    *,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy: tf.distribute.Strategy | None = None,
) -> KFoldResult:
    """Train every fold of `config.folds` (or only `config.fold`) under `config.out`; then, when all are finished,
    write oof_predictions.csv and kfold.json. Raises what `train.fit.train` raises, and RunDirError when --out
    holds something else."""
    cfg = config.resolve()
    if cfg.folds is None:
        raise ValueError("train_kfold needs config.folds")
    kfold_dir.check_kfold_out(cfg.out)
    strategy = strategy or make_strategy(cfg.devices)
    cfg.out.mkdir(parents=True, exist_ok=True)
    results = []
    for fold in [cfg.fold] if cfg.fold is not None else range(cfg.folds):
        print(f"fold {fold + 1}/{cfg.folds} ({kfold_dir.fold_dir(cfg.out, fold).name})", flush=True)
        results.append(train(fold_config(cfg, fold), verbose=verbose, callbacks=callbacks, strategy=strategy))
    unfinished = [i for i in range(cfg.folds) if not kfold_dir.fold_finished(kfold_dir.fold_dir(cfg.out, i))]
    if unfinished:
        print(f"folds still to train: {', '.join(str(i) for i in unfinished)}; the out-of-fold predictions follow "
              f"when every fold is finished", flush=True)
        return KFoldResult(cfg.out, results, None, unfinished)
    summary = summarize(cfg)
    print(f"{cfg.folds} folds: OOF mAP {summary['oof_map']:.4f} on {summary['n_oof']} images (fold val mAP "
          f"{', '.join(f'{m:.4f}' for m in summary['fold_val_map'])}); k-fold folder {cfg.out}", flush=True)
    return KFoldResult(cfg.out, results, summary, [])


def summarize(cfg: TrainConfig) -> dict:
    """Join the finished folds' held-out predictions into oof_predictions.csv (manifest order) and write kfold.json.

    Every readable training image is in exactly one held-out part; the unreadable ones (named in the folds'
    metrics.json) are listed in kfold.json instead. RunDirError when the folds do not fit together.
    """
    cfg = cfg.resolve()
    data = read_data_dir(cfg.data_dir)
    classes, ids = list(data.classes), [str(i) for i in data.manifest["id"]]
    parts, fold_maps, unreadable, epochs, seconds = [], [], set(), [], 0.0
    for fold in range(cfg.folds):
        path = kfold_dir.fold_dir(cfg.out, fold)
        record, metrics = rundir.read_config(path), rundir.read_metrics(path)
        if (record.train.get("folds"), record.train.get("fold"), record.train.get("seed")) != (cfg.folds, fold,
                                                                                                 cfg.seed):
            raise RunDirError(f"{path}: not fold {fold} of {cfg.folds} with seed {cfg.seed} (its config.json says "
                              f"fold {record.train.get('fold')} of {record.train.get('folds')}, seed "
                              f"{record.train.get('seed')})")
        if list(record.classes) != classes:
            raise RunDirError(f"{path}: its classes differ from {cfg.data_dir}'s")
        parts.append(rundir.read_val_predictions(path))
        fold_maps.append(float(metrics["val_map"]))
        unreadable.update(metrics.get("skipped_images", {}).get("val", []))
        epochs.append(int(metrics["epochs_trained"]))
        seconds += float(metrics["train_seconds"])
    oof = pd.concat(parts, ignore_index=True)
    repeated = sorted(set(oof["id"][oof["id"].duplicated()]))
    if repeated:
        raise RunDirError(f"{cfg.out}: id(s) held out by more than one fold: {', '.join(repeated[:10])}")
    predicted = set(oof["id"])
    unknown = sorted(predicted - set(ids))
    absent = [i for i in ids if i not in predicted and i not in unreadable]
    if unknown or absent:
        raise RunDirError(
            f"{cfg.out}: the folds' held-out predictions do not cover {cfg.data_dir}'s manifest (ids not in it: "
            f"{unknown[:10] or 'none'}; ids without a prediction: {absent[:10] or 'none'})"
        )
    oof = oof.set_index("id").reindex([i for i in ids if i not in unreadable])
    probs = oof[classes].to_numpy(dtype=np.float64)
    kfold_dir.write_oof_predictions(cfg.out, list(oof.index), probs, classes)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    labels = data.labels()[[row_of[i] for i in oof.index]]
    thresholds = tune_thresholds(labels, probs, beta=2)
    summary = {
        "format_version": kfold_dir.FORMAT_VERSION,
        "folds": cfg.folds,
        "seed": cfg.seed,
        "classes": classes,
        "fold_val_map": fold_maps,
        "oof_map": mean_average_precision(labels, probs),
        "f2_at_0.5": f2_samples(labels, probs >= 0.5),
        "thresholds": {c: float(t) for c, t in zip(classes, thresholds, strict=True)},
        "f2_at_tuned": f2_samples(labels, probs >= thresholds),
        "n_oof": len(oof),
        "unreadable_ids": [i for i in ids if i in unreadable],
        "epochs_trained": max(epochs),
        "train_seconds": round(seconds, 3),
    }
    kfold_dir.write_summary(cfg.out, summary)
    return summary
