"""Two-stage fine-tuning into a RUN_DIR: frozen backbone, then its top layers; exact val mAP, best model, resume.

`train(config)` is the whole stage. It reads the DATA_DIR(s), splits off validation, writes config.json before any
training, then runs stage 1 (backbone frozen, Adam at --lr) and stage 2 (top --unfreeze of the backbone trainable,
BatchNormalization frozen, recompiled with Adam at --finetune-lr), epochs numbered on across the stages. After each
epoch the whole validation set is predicted once for the exact mAP; the best epoch's model is saved. Each stage has
its own BackupAndRestore folder, and the best mAP so far is kept next to them, so the same command run again after
a kill resumes at the last finished epoch and ends with the same RUN_DIR files as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from common.atomic import atomic_write_csv, atomic_write_json
from crawl.manifest import DataDirError, manifest_sha256, read_data_dir, write_classes
from train.backbones import get_backbone
from train.config import RUNTIME_SETTINGS, ConfigError, TrainConfig
from train.data import SkipLog, make_dataset
from train.devices import has_gpu, make_strategy
from train.metrics import f2_samples, mean_average_precision, per_class_average_precision, tune_thresholds
from train.model import build_model, estimate_batchnorm_statistics, freeze_backbone, unfreeze_top
from train.plots import plot_curves
from train.split import stratified_split

HISTORY_COLUMNS = ["epoch", "stage", "lr", "loss", "val_loss", "val_map", "seconds", "images_per_second"]
BACKUP_DIR = "backup"  # BackupAndRestore folders (one per stage) and progress.json; removed when the run ends
PROGRESS_FILE = "progress.json"
_EPSILON = 1e-7  # the probability clip of keras.losses.binary_crossentropy


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the best model so far (if any) is kept in the RUN_DIR."""


class RunDirError(ConfigError):
    """The RUN_DIR holds something else: another run's settings, or files that are not a run."""


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: where, its best epoch and val mAP, how many epochs, and why it stopped early if so."""

    run_dir: Path
    best_epoch: int
    val_map: float
    epochs_trained: int
    stopped_early: str | None = None
    already_complete: bool = False


@dataclass(frozen=True)
class Split:
    """Training and validation images: paths, 0/1 labels and ids, in a fixed order."""

    classes: list[str]
    train_paths: list[str]
    train_labels: np.ndarray
    train_ids: list[str]
    val_paths: list[str]
    val_labels: np.ndarray
    val_ids: list[str]


def load_split(cfg: TrainConfig) -> Split:
    """Read the training DATA_DIR and the validation images (--val DATA_DIR, or a stratified --val-split)."""
    data = read_data_dir(cfg.data_dir)
    if not data.labelled:
        raise DataDirError(f"{cfg.data_dir}: no classes.txt; training needs a labelled DATA_DIR")
    paths, labels, ids = data.image_paths(), data.labels(), list(data.manifest["id"])
    if not paths:
        raise DataDirError(f"{cfg.data_dir}: manifest.csv lists no images")
    if cfg.val is not None:
        val = read_data_dir(cfg.val)
        if val.classes != data.classes:
            raise ConfigError(
                f"--val {cfg.val}: its classes.txt ({', '.join(val.classes) or 'none'}) differs from "
                f"{cfg.data_dir}'s ({', '.join(data.classes)})"
            )
        if val.manifest.empty:
            raise DataDirError(f"{cfg.val}: manifest.csv lists no images")
        return Split(data.classes, paths, labels, ids, val.image_paths(), val.labels(), list(val.manifest["id"]))
    try:
        train_idx, val_idx = stratified_split(labels, cfg.val_split, cfg.seed)
    except ValueError as err:  # too few images for the fraction: a settings problem, exit 2 like the others
        raise ConfigError(f"{cfg.data_dir}: {err}") from None
    pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
    return Split(
        data.classes,
        pick(paths, train_idx), labels[train_idx], pick(ids, train_idx),
        pick(paths, val_idx), labels[val_idx], pick(ids, val_idx),
    )


def binary_crossentropy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean binary cross-entropy over all labels, with Keras's clipping of probabilities to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(y_prob, np.float64), _EPSILON, 1.0 - _EPSILON)
    y = np.asarray(y_true, np.float64)
    return float(np.mean(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))))


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save the model (without its optimizer) as a .keras file via a temporary file and a rename."""
    # A fresh functional model over the same layers carries no optimizer: the file holds only what predict needs.
    export = keras.Model(model.inputs, model.outputs, name=model.name)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        export.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Run:
    """The state of one training run shared by the stages and the epoch callback."""

    def __init__(self, cfg: TrainConfig, split: Split, strategy: tf.distribute.Strategy, verbose: int):
        self.cfg, self.split, self.strategy, self.verbose = cfg, split, strategy, verbose
        self.out = cfg.out
        self.backup = cfg.out / BACKUP_DIR
        self.backbone = get_backbone(cfg.backbone)
        with tf.device("/cpu:0"):
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
        self.train_skips = SkipLog(len(split.train_paths))
        self.val_skips = SkipLog(len(split.val_paths))
        common = dict(image_size=cfg.image_size, preprocessing=self.backbone.preprocessing, cache=cfg.cache, seed=cfg.seed)
        self.train_ds = make_dataset(
            split.train_paths, split.train_labels, batch_size=cfg.batch_size, training=True, augment=cfg.augment,
            epoch=self.epoch, skips=self.train_skips, cache_tag="train", **common,
        )
        self.val_ds = make_dataset(
            split.val_paths, None, batch_size=cfg.batch_size, training=False, skips=self.val_skips,
            cache_tag="val", **common,
        )
        self.history = self._read_history()
        progress = self._read_progress()
        self.best_map = progress.get("best_map", -math.inf)
        self.best_epoch = progress.get("best_epoch")
        self.stop_reason: str | None = None
        self.last_skipped: dict[str, list[str]] = {"train": [], "val": []}

    # --- files ---------------------------------------------------------------------------------------------------
    def _read_history(self) -> pd.DataFrame:
        path = self.out / "history.csv"
        if path.exists():
            return pd.read_csv(path)
        return pd.DataFrame(columns=HISTORY_COLUMNS)

    def _read_progress(self) -> dict:
        path = self.backup / PROGRESS_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def write_history(self) -> None:
        atomic_write_csv(self.out / "history.csv", self.history[HISTORY_COLUMNS])

    def write_progress(self) -> None:
        atomic_write_json(self.backup / PROGRESS_FILE, {"best_map": self.best_map, "best_epoch": self.best_epoch})

    def restart_at(self, epoch: int) -> None:
        """Forget epochs from `epoch` (0-based) on: a resumed fit() redoes them, so their rows must not stay."""
        self.history = self.history[self.history["epoch"] <= epoch].reset_index(drop=True)
        if self.best_epoch is not None and self.best_epoch > epoch:
            # The saved model came from an epoch being redone; let the redone epoch replace it whatever its mAP.
            self.best_map, self.best_epoch = -math.inf, None
        self.write_history()

    # --- validation ----------------------------------------------------------------------------------------------
    def predict_val(self, model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities for every readable validation image, exactly once, and their indices into the val list."""
        self.val_skips.reset()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Your input ran out of data")  # see _fit_stage
            probs = np.asarray(model.predict(self.val_ds, verbose=0), np.float64)
        delivered = np.asarray(self.val_skips.delivered(), dtype=int)
        if len(delivered) != len(probs):
            raise RuntimeError(f"validation gave {len(probs)} predictions for {len(delivered)} readable images")
        if len(delivered) == 0:
            raise DataDirError(f"none of the {len(self.split.val_paths)} validation images could be read")
        return probs, delivered


def _reseed_random_layers(model: keras.Model, epoch: int) -> None:
    """Key the random layers (the head's Dropout) on the epoch, as the data's shuffle and augmentation are.

    Keras's BackupAndRestore does not save the layers' SeedGenerator states, so a resumed run would otherwise draw
    other dropout masks than the uninterrupted one from its first resumed epoch on. Each state is (seed, counter);
    the counter, advanced once per training step, restarts every epoch at epoch * 2**20.
    """
    for variable in model.variables:
        if variable.path.endswith("seed_generator_state"):
            seed = int(keras.ops.convert_to_numpy(variable)[0])
            variable.assign(np.array([seed, epoch << 20], dtype=variable.dtype))


class _EpochMonitor(keras.callbacks.Callback):
    """Per epoch: advance the data epoch, stop on a NaN loss, then validate, record, keep the best model, report."""

    def __init__(self, run: _Run, stage: int):
        super().__init__()
        self.run, self.stage = run, stage
        self.first_epoch_of_fit = True

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch_of_fit:
            self.first_epoch_of_fit = False
            self.run.restart_at(epoch)
        self.run.epoch.assign(epoch)
        _reseed_random_layers(self.model, epoch)
        self.run.train_skips.reset()
        self.started = time.perf_counter()
        self.first_batch_done = None
        self.batches = 0
        self.loss = float("nan")
        self.diverged = False

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches == 1:
            self.first_batch_done = time.perf_counter()
        loss = float((logs or {}).get("loss", 0.0))
        self.loss = loss  # the running mean over the epoch's batches so far
        if not math.isfinite(loss):
            self.diverged = True
            self.run.stop_reason = f"the loss became {loss} in epoch {self.run.epoch.numpy() + 1}, batch {batch + 1}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            return
        run, cfg = self.run, self.run.cfg
        train_end = time.perf_counter()
        if self.batches == 0:
            readable = len(run.split.train_paths) - len(run.train_skips.skipped())
            raise DataDirError(
                f"epoch {epoch + 1} had no training batch: {readable} readable training images, fewer than "
                f"--batch-size {cfg.batch_size}"
            )
        if self.batches > 1:
            images_per_second = (self.batches - 1) * cfg.batch_size / max(train_end - self.first_batch_done, 1e-9)
        else:
            images_per_second = cfg.batch_size / max(train_end - self.started, 1e-9)
        skipped_train = run.train_skips.take()
        probs, kept = run.predict_val(self.model)
        if not np.isfinite(probs).all():
            run.stop_reason = f"the validation predictions became NaN or infinite in epoch {epoch + 1}"
            self.model.stop_training = True
            return
        truth = run.split.val_labels[kept]
        val_map = mean_average_precision(truth, probs)
        val_loss = binary_crossentropy(truth, probs)
        delivered = set(kept.tolist())
        skipped_val = [i for i in range(len(run.split.val_paths)) if i not in delivered]
        run.last_skipped = {
            "train": [run.split.train_ids[i] for i in skipped_train],
            "val": [run.split.val_ids[i] for i in skipped_val],
        }
        logs = logs if logs is not None else {}
        # Keras 3.15 averages the epoch loss over one batch too many when the dataset's length is unknown and
        # batches drop their remainder (ours: skipped files make the length unknown); the running mean at the
        # last batch is the right value. Later callbacks (TensorBoard, the progress bar) see the corrected logs.
        logs["loss"] = self.loss
        logs["val_loss"], logs["val_map"] = val_loss, val_map
        improved = val_map > run.best_map
        if improved:
            save_model_atomic(self.model, run.out / "model.keras")
            run.best_map, run.best_epoch = val_map, epoch + 1
        row = {
            "epoch": epoch + 1,
            "stage": self.stage,
            "lr": float(f"{float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)):.7g}"),
            "loss": self.loss,
            "val_loss": val_loss,
            "val_map": val_map,
            "seconds": round(time.perf_counter() - self.started, 3),
            "images_per_second": round(images_per_second, 2),
        }
        new_row = pd.DataFrame([row])
        run.history = pd.concat([run.history, new_row], ignore_index=True) if len(run.history) else new_row
        run.write_history()
        run.write_progress()
        print(
            f"epoch {epoch + 1}/{cfg.epochs} stage {self.stage}: loss {row['loss']:.4f}, val_loss {val_loss:.4f}, "
            f"val mAP {val_map:.4f}{' (best)' if improved else ''}, {images_per_second:.1f} images/s, "
            f"{row['seconds']:.1f} s",
            flush=True,
        )
        if skipped_train or skipped_val:
            shown = ", ".join((run.last_skipped["train"] + run.last_skipped["val"])[:10])
            print(
                f"epoch {epoch + 1}: skipped {len(skipped_train)} unreadable training and {len(skipped_val)} "
                f"unreadable validation image(s): {shown}{' ...' if len(skipped_train) + len(skipped_val) > 10 else ''}",
                flush=True,
            )


def _run_record(cfg: TrainConfig, split: Split, replicas: int) -> dict:
    """config.json: every resolved setting, the backbone entry, classes, versions and the data's fingerprint."""
    backbone = get_backbone(cfg.backbone)
    return {
        "backbone": backbone.to_config(),
        "image_size": cfg.image_size,
        "classes": split.classes,
        "train": cfg.to_json(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": sys.version.split()[0]},
        "manifest_sha256": manifest_sha256(cfg.data_dir),
        "val_manifest_sha256": manifest_sha256(cfg.val) if cfg.val is not None else None,
        "class_prevalence": [round(float(p), 6) for p in split.train_labels.mean(axis=0)],
        "n_train": len(split.train_paths),
        "n_val": len(split.val_paths),
        "runtime": {"replicas": replicas, "mixed_precision": cfg.mixed_precision},
    }


def _has_progress(out: Path) -> bool:
    """Whether a RUN_DIR holds any finished epoch: a model, a backup or a history row."""
    history = out / "history.csv"
    rows = len(pd.read_csv(history)) if history.exists() and history.stat().st_size else 0
    return (out / "model.keras").exists() or (out / BACKUP_DIR).exists() or rows > 0


def _check_run_dir(cfg: TrainConfig, record: dict) -> str:
    """"fresh", "resume" or "complete" for this RUN_DIR; RunDirError if it holds something else."""
    out = cfg.out
    config_path = out / "config.json"
    if not config_path.exists():
        if out.exists() and any(out.iterdir()):
            raise RunDirError(f"{out} exists, is not empty and has no config.json; choose an empty or new --out")
        return "fresh"
    try:
        old = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"{config_path}: unreadable ({err}); choose a new --out") from err
    ignore = set(RUNTIME_SETTINGS)
    before = {k: v for k, v in old.get("train", {}).items() if k not in ignore}
    after = {k: v for k, v in record["train"].items() if k not in ignore}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for key in ("manifest_sha256", "val_manifest_sha256", "classes"):
        if old.get(key) != record[key]:
            changed.append(key)
    if changed and not _has_progress(out):
        return "fresh"  # nothing trained yet (e.g. a start that failed on its weights): the new settings replace it
    if changed:
        before_after = ((k, old.get("train", {}).get(k, old.get(k)), record["train"].get(k, record.get(k))) for k in changed)
        details = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in before_after)
        raise RunDirError(
            f"{out} holds a run with other settings or data ({details}); resume with the same command or use a new --out"
        )
    if (out / "metrics.json").exists() and not (out / BACKUP_DIR).exists():
        return "complete"
    return "resume"


def _fit_stage(run: _Run, model: keras.Model, stage: int, lr: float, first: int, last: int, extra: Sequence) -> None:
    """Compile for `stage` and fit epochs first..last-1 (0-based), resuming from the stage's backup if any."""
    with run.strategy.scope():
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=keras.losses.BinaryCrossentropy())
    # Keras keeps the epoch a BackupAndRestore restored on the model object; clear it so a previous stage's
    # restored epoch cannot leak into this stage's fit().
    model._initial_epoch = None
    callbacks = [
        _EpochMonitor(run, stage),
        keras.callbacks.BackupAndRestore(str(run.backup / f"stage{stage}"), double_checkpoint=True, delete_checkpoint=False),
        keras.callbacks.TensorBoard(log_dir=str(run.out / "logs"), write_graph=False, profile_batch=0),
        *extra,
    ]
    with warnings.catch_warnings():
        # Our datasets have no known length (skipped files), so Keras warns at each epoch's end that the input
        # "ran out of data": that is how every epoch ends here.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        model.fit(run.train_ds, epochs=last, initial_epoch=first, callbacks=callbacks, verbose=run.verbose, shuffle=False)


def _finalize(run: _Run, params: int) -> TrainResult:
    """Write metrics.json, val_predictions.csv and curves.png from the best model; then drop the backups."""
    cfg, split, out = run.cfg, run.split, run.out
    best = keras.saving.load_model(out / "model.keras")  # safe mode: proves the file loads for predict
    probs, kept = run.predict_val(best)
    truth = split.val_labels[kept]
    ap = per_class_average_precision(truth, probs)
    thresholds = tune_thresholds(truth, probs, beta=2)
    ids = [split.val_ids[i] for i in kept]
    predictions = pd.DataFrame(probs, columns=split.classes)
    predictions.insert(0, "id", ids)
    atomic_write_csv(out / "val_predictions.csv", predictions)
    history = run.history
    metrics = {
        "best_epoch": int(run.best_epoch),
        "val_map": mean_average_precision(truth, probs),
        "per_class_ap": {c: (None if np.isnan(v) else float(v)) for c, v in zip(split.classes, ap)},
        "f2_at_0.5": f2_samples(truth, probs >= 0.5),
        "thresholds": {c: float(t) for c, t in zip(split.classes, thresholds)},
        "f2_at_tuned": f2_samples(truth, probs >= thresholds),
        "epochs_trained": int(history["epoch"].max()) if len(history) else 0,
        "train_seconds": round(float(history["seconds"].sum()), 3),
        "params": int(params),
        "n_val_images": int(len(kept)),
        "skipped_images": run.last_skipped,
        "stopped_early": run.stop_reason,
    }
    atomic_write_json(out / "metrics.json", metrics)
    plot_curves(history, cfg.frozen_epochs, out / "curves.png", title=f"{cfg.backbone} at {cfg.image_size} px")
    shutil.rmtree(run.backup, ignore_errors=True)
    return TrainResult(out, metrics["best_epoch"], metrics["val_map"], metrics["epochs_trained"], run.stop_reason)


class _DropRetracingNotes(logging.Filter):
    """Each stage's recompile and the reloaded best model trace a new predict function, by design; TF's note
    that "N out of the last N calls triggered tf.function retracing" is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def _quiet_retracing_notes() -> None:
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _DropRetracingNotes) for f in logger.filters):
        logger.addFilter(_DropRetracingNotes())


def _estimate_batchnorm(run: _Run, backbone: keras.Model, max_images: int = 64) -> None:
    """Random weights: give BatchNormalization the statistics of the first training images (no augmentation).

    Deterministic (same images, same order), so a resumed run starts from the same state; BackupAndRestore then
    restores the trained values on top.
    """
    paths = run.split.train_paths[:max_images]
    batch = make_dataset(paths, None, image_size=run.cfg.image_size, preprocessing=run.backbone.preprocessing,
                         batch_size=len(paths), training=False, seed=run.cfg.seed)
    images = next(iter(batch))
    n = estimate_batchnorm_statistics(backbone, images)
    print(f"--weights none: BatchNormalization statistics of {n} layers estimated on {len(paths)} training images",
          flush=True)


def train(
    config: TrainConfig,
    *,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy: tf.distribute.Strategy | None = None,
) -> TrainResult:
    """Train `config.backbone` on `config.data_dir` into `config.out` (see the module docstring).

    `verbose` is Keras's progress setting ("auto": a progress bar on a terminal, one line per epoch otherwise).
    `callbacks` are extra Keras callbacks for both stages. `strategy` defaults to `make_strategy(config.devices)`.
    Raises ConfigError (bad settings or RUN_DIR), DataDirError, WeightsError, TrainingDiverged.
    """
    cfg = config.resolve()
    _quiet_retracing_notes()
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    strategy = strategy or make_strategy(cfg.devices)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} does not divide by the {replicas} replicas; use a multiple of {replicas}"
        )
    split = load_split(cfg)
    if not split.val_labels.any():
        raise ConfigError(f"the {len(split.val_ids)} validation images have no positive label: mAP is undefined")
    if len(split.train_paths) < cfg.batch_size:
        raise ConfigError(f"only {len(split.train_paths)} training images, fewer than --batch-size {cfg.batch_size}")
    record = _run_record(cfg, split, replicas)
    state = _check_run_dir(cfg, record)
    out = cfg.out
    if state == "complete":
        metrics = json.loads((out / "metrics.json").read_text())
        print(f"{out} already holds the finished run (best epoch {metrics['best_epoch']}); nothing to do", flush=True)
        return TrainResult(out, metrics["best_epoch"], metrics["val_map"], metrics["epochs_trained"],
                           metrics.get("stopped_early"), already_complete=True)
    out.mkdir(parents=True, exist_ok=True)
    if state == "fresh":
        atomic_write_json(out / "config.json", record)  # first, so even a crash leaves a record of the settings
        write_classes(out, split.classes)
        atomic_write_csv(out / "val_ids.csv", pd.DataFrame({"id": split.val_ids}))
    print(
        f"{cfg.backbone} at {cfg.image_size} px: {len(split.train_paths)} training and {len(split.val_paths)} validation "
        f"images, {len(split.classes)} classes, {replicas} replica(s), global batch {cfg.batch_size}"
        f"{' (resuming)' if state == 'resume' else ''}",
        flush=True,
    )

    previous_policy = keras.mixed_precision.global_policy()
    try:
        if cfg.mixed_precision:
            if not has_gpu():
                print("warning: --mixed-precision on a CPU is slow; it pays off on GPUs", file=sys.stderr, flush=True)
            keras.mixed_precision.set_global_policy("mixed_float16")
        keras.utils.set_random_seed(cfg.seed)
        run = _Run(cfg, split, strategy, verbose)
        with strategy.scope():
            model, backbone = build_model(
                run.backbone, len(split.classes), image_size=cfg.image_size, weights=cfg.weights,
                dropout=cfg.dropout, l2=cfg.l2,
            )
        if cfg.weights == "none":
            _estimate_batchnorm(run, backbone)
        stages = [(1, cfg.lr, 0, cfg.frozen_epochs), (2, cfg.finetune_lr, cfg.frozen_epochs, cfg.epochs)]
        for stage, lr, first, last in stages:
            if last <= first or run.stop_reason:
                continue
            if stage == 1:
                freeze_backbone(backbone)
            else:
                unfreeze_top(backbone, cfg.unfreeze)
            _fit_stage(run, model, stage, lr, first, last, callbacks)
        params = model.count_params()
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    if run.stop_reason:
        if run.best_epoch is None or not (out / "model.keras").exists():
            shutil.rmtree(run.backup, ignore_errors=True)
            raise TrainingDiverged(
                f"training stopped: {run.stop_reason}, before any epoch finished; no model was saved. "
                f"Try a lower --lr / --finetune-lr"
            )
        result = _finalize(run, params)
        raise TrainingDiverged(
            f"training stopped: {run.stop_reason}. The best model so far (epoch {result.best_epoch}, val mAP "
            f"{result.val_map:.4f}) is kept in {out / 'model.keras'}. Try a lower --lr / --finetune-lr"
        )
    result = _finalize(run, params)
    print(f"best epoch {result.best_epoch}: val mAP {result.val_map:.4f}; RUN_DIR {out}", flush=True)
    return result
