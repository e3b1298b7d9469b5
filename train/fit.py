"""Two-stage fine-tuning into a RUN_DIR: frozen backbone, then its top layers; exact val mAP, best model, resume.

`train(config)` is the whole stage. It reads the DATA_DIR(s), splits off validation, writes config.json before any
training, then runs stage 1 (backbone frozen, Adam at --lr) and stage 2 (top --unfreeze of the backbone trainable,
BatchNormalization frozen, recompiled with Adam at --finetune-lr), epochs numbered on across the stages. The
per-epoch validation and bookkeeping is `train.epoch_monitor`; each stage has its own BackupAndRestore folder, and
the best mAP so far is kept next to them (`train.run_state`), so the same command run again after a kill resumes at
the last finished epoch and ends with the same RUN_DIR files as an uninterrupted run.

With `--head rnn` the stages fit the teacher-forcing model of `train.rnn_head` (masked sequence loss, Adam with
gradient clipping), while validation, model.keras and the final record use its tagger, which shares the weights.

`--recipe scratch` replaces the two stages by one: every layer trains from the first epoch (BatchNormalization in
training mode), Adam following `train.schedules`' warm-up and cosine decay to --epochs; history.csv records stage 1
throughout. A fold of a k-fold run (`--folds K`, train.kfold) is such a run validated on its held-out part.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from crawl.manifest import DataDirError, manifest_sha256, read_data_dir
from train import rundir
from train.backbones import get_backbone
from train.config import ConfigError, TrainConfig
from train.data import make_dataset
from train.devices import has_gpu, make_strategy
from train.epoch_monitor import EpochMonitor
from train.keras_workarounds import EpochAlignedSteps, ReconcileReplicaStatistics, clear_restored_epoch
from train.losses import training_loss
from train.metrics import (
    binary_crossentropy,
    f2_samples,
    mean_average_precision,
    per_class_average_precision,
    tune_thresholds,
)
from train.model import build_model, estimate_batchnorm_statistics, freeze_backbone, train_every_layer, unfreeze_top
from train.plots import plot_curves
from train.rnn_head import CLIPNORM, DecoderSpec, class_order, sequence_loss, training_model
from train.run_state import Split, TrainingRun, run_dir_state
from train.rundir import LOGS_DIR, MODEL_FILE, RunDirError, RunRecord
from train.schedules import warmup_cosine
from train.split import stratified_kfold, stratified_split

__all__ = ["RunDirError", "Split", "TrainResult", "TrainingDiverged", "load_split", "run_record", "train"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the best model so far (if any) is kept in the RUN_DIR."""


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: where, its best epoch and val mAP, how many epochs, and why it stopped early if so."""

    run_dir: Path
    best_epoch: int
    val_map: float
    epochs_trained: int
    stopped_early: str | None = None
    already_complete: bool = False


def load_split(cfg: TrainConfig) -> Split:
    """Read the training DATA_DIR and the validation images (--val DATA_DIR, a stratified --val-split, or with
    --folds the held-out part of --fold)."""
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
        if cfg.folds is not None:
            train_idx, val_idx = stratified_kfold(labels, cfg.folds, cfg.seed)[cfg.fold]
        else:
            train_idx, val_idx = stratified_split(labels, cfg.val_split, cfg.seed)
    except ValueError as err:  # too few images for the fraction: a settings problem, exit 2 like the others
        raise ConfigError(f"{cfg.data_dir}: {err}") from None
    pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
    return Split(
        data.classes,
        pick(paths, train_idx), labels[train_idx], pick(ids, train_idx),
        pick(paths, val_idx), labels[val_idx], pick(ids, val_idx),
    )


def run_record(cfg: TrainConfig, split: Split, replicas: int) -> RunRecord:
    """This run's config.json: every resolved setting, the backbone entry, classes, versions, the data's fingerprint."""
    return RunRecord(
        backbone=get_backbone(cfg.backbone).to_config(),
        image_size=cfg.image_size,
        classes=tuple(split.classes),
        train=cfg.to_json(),
        versions={"tensorflow": tf.__version__, "keras": keras.__version__, "python": sys.version.split()[0]},
        manifest_sha256=manifest_sha256(cfg.data_dir),
        val_manifest_sha256=manifest_sha256(cfg.val) if cfg.val is not None else None,
        class_prevalence=tuple(round(float(p), 6) for p in split.train_labels.mean(axis=0)),
        n_train=len(split.train_paths),
        n_val=len(split.val_paths),
        runtime={"replicas": replicas, "mixed_precision": cfg.mixed_precision},
        head=_head_record(cfg, split),
    )


def _allow_empty(split: Split) -> bool:
    """Whether the rnn head may decode the empty set: only if some training image has no label."""
    return not bool(split.train_labels.any(axis=1).all())


def _head_record(cfg: TrainConfig, split: Split) -> dict:
    """config.json's "head": the sigmoid default, or the rnn decoder's settings and the class order it learns."""
    if cfg.head == "sigmoid":
        return dict(rundir.SIGMOID_HEAD)
    order = class_order(split.train_labels, cfg.label_order)
    return {"name": "rnn", "cell": cfg.rnn_cell, "units": cfg.rnn_units, "label_embedding": cfg.label_embedding,
            "label_order": cfg.label_order, "class_order": [split.classes[i] for i in order],
            "allow_empty": _allow_empty(split)}


def _decoder_spec(cfg: TrainConfig, split: Split) -> DecoderSpec | None:
    if cfg.head == "sigmoid":
        return None
    return DecoderSpec(cell=cfg.rnn_cell, units=cfg.rnn_units, embedding_dim=cfg.label_embedding,
                       allow_empty=_allow_empty(split))


def _fit_stage(run: TrainingRun, model: keras.Model, stage: int,
               lr: float | keras.optimizers.schedules.LearningRateSchedule, first: int, last: int,
               extra: Sequence[keras.callbacks.Callback], ahead: Sequence[keras.callbacks.Callback] = ()) -> None:
    """Compile for `stage` and fit epochs first..last-1 (0-based), resuming from the stage's backup if any.
    `lr` is Adam's learning rate: a number, or a schedule of the optimizer's steps (the scratch recipe); `ahead` are
    callbacks that run before the per-epoch record."""
    with run.strategy.scope():
        if run.cfg.head == "rnn":  # the training model's logits over the label sequences, gradients clipped
            model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr, clipnorm=CLIPNORM), loss=sequence_loss())
        else:
            model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                          loss=training_loss(run.cfg.loss, **run.cfg.loss_settings()))
    clear_restored_epoch(model)  # a previous stage's restored epoch must not leak into this stage's fit()
    callbacks = [
        *ahead,
        EpochMonitor(run, stage),
        keras.callbacks.BackupAndRestore(
            str(run.backup / f"stage{stage}"), double_checkpoint=True, delete_checkpoint=False
        ),
        keras.callbacks.TensorBoard(log_dir=str(run.out / LOGS_DIR), write_graph=False, profile_batch=0),
        *extra,
    ]
    with warnings.catch_warnings():
        # Our datasets have no known length (skipped files), so Keras warns at each epoch's end that the input
        # "ran out of data": that is how every epoch ends here.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        model.fit(
            run.train_ds, epochs=last, initial_epoch=first, callbacks=callbacks, verbose=run.verbose, shuffle=False
        )


def _finalize(run: TrainingRun, params: int) -> TrainResult:
    """Write metrics.json, val_predictions.csv and curves.png from the best model; then drop the backups."""
    cfg, split, out = run.cfg, run.split, run.out
    best = keras.saving.load_model(out / MODEL_FILE)  # safe mode: proves the file loads for predict
    probs, kept = run.predict_val(best)
    truth = split.val_labels[kept]
    ap = per_class_average_precision(truth, probs)
    thresholds = tune_thresholds(truth, probs, beta=2)
    rundir.write_val_predictions(out, [split.val_ids[i] for i in kept], probs, split.classes)
    history = run.history
    metrics = {
        "best_epoch": int(run.best_epoch),
        "val_map": mean_average_precision(truth, probs),
        "per_class_ap": {c: (None if np.isnan(v) else float(v)) for c, v in zip(split.classes, ap, strict=True)},
        "f2_at_0.5": f2_samples(truth, probs >= 0.5),
        "thresholds": {c: float(t) for c, t in zip(split.classes, thresholds, strict=True)},
        "f2_at_tuned": f2_samples(truth, probs >= thresholds),
        "val_bce": binary_crossentropy(truth, probs),  # plain BCE whatever the loss: runs compare on it
        "epochs_trained": int(history["epoch"].max()) if len(history) else 0,
        "train_seconds": round(float(history["seconds"].sum()), 3),
        "params": int(params),
        "n_val_images": int(len(kept)),
        "skipped_images": run.last_skipped,
        "stopped_early": run.stop_reason,
    }
    rundir.write_metrics(out, metrics)
    plot_curves(history, cfg.frozen_epochs or 0, out / rundir.CURVES_FILE,
                title=f"{cfg.backbone} at {cfg.image_size} px{' from scratch' if cfg.recipe == 'scratch' else ''}")
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


def _estimate_batchnorm(run: TrainingRun, backbone: keras.Model, max_images: int = 64) -> None:
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


def _fit_scratch(run: TrainingRun, model: keras.Model, backbone: keras.Model,
                 extra: Sequence[keras.callbacks.Callback]) -> None:
    """The scratch recipe's one stage: every layer trains (BatchNormalization in training mode, so no statistics
    are estimated first), Adam following the warm-up and cosine schedule from epoch 1 to --epochs."""
    cfg = run.cfg
    schedule = warmup_cosine(cfg.lr, cfg.epochs, cfg.warmup_epochs, len(run.split.train_paths), cfg.batch_size)
    train_every_layer(backbone, schedule.steps_per_epoch)
    _fit_stage(run, model, stage=1, lr=schedule.keras_schedule(), first=0, last=cfg.epochs, extra=extra,
               ahead=[EpochAlignedSteps(schedule.steps_per_epoch), ReconcileReplicaStatistics()])


def _check_split(cfg: TrainConfig, split: Split) -> None:
    if not split.val_labels.any():
        raise ConfigError(f"the {len(split.val_ids)} validation images have no positive label: mAP is undefined")
    if len(split.train_paths) < cfg.batch_size:
        raise ConfigError(f"only {len(split.train_paths)} training images, fewer than --batch-size {cfg.batch_size}")


def _start_run_dir(cfg: TrainConfig, split: Split, record: RunRecord, state: str, replicas: int) -> None:
    """A fresh RUN_DIR gets config.json first, so even a crash leaves a record of the settings; then say what runs."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    if state == "fresh":
        rundir.write_config(cfg.out, record)
        rundir.write_classes(cfg.out, split.classes)
        rundir.write_val_ids(cfg.out, split.val_ids)
    print(
        f"{cfg.backbone} at {cfg.image_size} px: {len(split.train_paths)} training and {len(split.val_paths)} "
        f"validation images, {len(split.classes)} classes, {replicas} replica(s), global batch {cfg.batch_size}"
        f"{' (resuming)' if state == 'resume' else ''}",
        flush=True,
    )


def _already_complete(out: Path) -> TrainResult:
    metrics = rundir.read_metrics(out)
    print(f"{out} already holds the finished run (best epoch {metrics['best_epoch']}); nothing to do", flush=True)
    return TrainResult(out, metrics["best_epoch"], metrics["val_map"], metrics["epochs_trained"],
                       metrics.get("stopped_early"), already_complete=True)


@contextlib.contextmanager
def _precision(cfg: TrainConfig) -> Iterator[None]:
    """mixed_float16 as Keras's global policy for the run if asked for; the previous policy restored after."""
    previous_policy = keras.mixed_precision.global_policy()
    try:
        if cfg.mixed_precision:
            if not has_gpu():
                print("warning: --mixed-precision on a CPU is slow; it pays off on GPUs", file=sys.stderr, flush=True)
            keras.mixed_precision.set_global_policy("mixed_float16")
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _finish(run: TrainingRun, params: int) -> TrainResult:
    """The final record from the best model; TrainingDiverged when the loss stopped the run."""
    out = run.out
    if not run.stop_reason:
        result = _finalize(run, params)
        print(f"best epoch {result.best_epoch}: val mAP {result.val_map:.4f}; RUN_DIR {out}", flush=True)
        return result
    if run.best_epoch is None or not (out / MODEL_FILE).exists():
        shutil.rmtree(run.backup, ignore_errors=True)
        raise TrainingDiverged(
            f"training stopped: {run.stop_reason}, before any epoch finished; no model was saved. "
            f"Try a lower --lr / --finetune-lr"
        )
    result = _finalize(run, params)
    raise TrainingDiverged(
        f"training stopped: {run.stop_reason}. The best model so far (epoch {result.best_epoch}, val mAP "
        f"{result.val_map:.4f}) is kept in {out / MODEL_FILE}. Try a lower --lr / --finetune-lr"
    )


def train(
    config: TrainConfig,
    *,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy: tf.distribute.Strategy | None = None,
    run_factory: type[TrainingRun] = TrainingRun,
) -> TrainResult:
    """Train `config.backbone` on `config.data_dir` into `config.out` (see the module docstring).

    `verbose` is Keras's progress setting ("auto": a progress bar on a terminal, one line per epoch otherwise).
    `callbacks` are extra Keras callbacks for both stages. `strategy` defaults to `make_strategy(config.devices)`.
    `run_factory` makes the run's shared state (train.multiworker passes its per-worker kind).
    Raises ConfigError (bad settings or RUN_DIR), DataDirError, WeightsError, TrainingDiverged.
    """
    cfg = config.resolve()
    if cfg.folds is not None and cfg.fold is None:
        raise ConfigError("train() trains one RUN_DIR: give the fold (--fold), or train every fold with "
                          "train.kfold.train_kfold")
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
    _check_split(cfg, split)
    record = run_record(cfg, split, replicas)
    state = run_dir_state(cfg.out, record)
    if state == "complete":
        return _already_complete(cfg.out)
    _start_run_dir(cfg, split, record, state, replicas)

    with _precision(cfg):
        keras.utils.set_random_seed(cfg.seed)
        run = run_factory(cfg, split, strategy, verbose)
        with strategy.scope():
            model, backbone = build_model(run.backbone, len(split.classes), image_size=cfg.image_size,
                                          weights=cfg.weights, dropout=cfg.dropout, l2=cfg.l2,
                                          decoder=_decoder_spec(cfg, split),
                                          backbone_training=None if cfg.recipe == "scratch" else False)
            # The sigmoid model is fitted as it is; the rnn tagger through its teacher-forcing model.
            run.tagger = model
            fit_model = training_model(model) if cfg.head == "rnn" else model
        transfer = cfg.recipe == "transfer"
        if not transfer:  # scratch: one stage, every layer, no frozen backbone and no estimated statistics
            _fit_scratch(run, fit_model, backbone, callbacks)
        elif cfg.weights == "none":
            _estimate_batchnorm(run, backbone)
        # Stage 1: the backbone frozen, the head learns at --lr.
        if transfer and cfg.frozen_epochs > 0:
            freeze_backbone(backbone)
            _fit_stage(run, fit_model, stage=1, lr=cfg.lr, first=0, last=cfg.frozen_epochs, extra=callbacks)
        # Stage 2: the top --unfreeze of the backbone trains too (BatchNormalization stays frozen), at --finetune-lr.
        if transfer and cfg.epochs > cfg.frozen_epochs and not run.stop_reason:
            unfreeze_top(backbone, cfg.unfreeze)
            _fit_stage(run, fit_model, stage=2, lr=cfg.finetune_lr, first=cfg.frozen_epochs, last=cfg.epochs,
                       extra=callbacks)
        params = model.count_params()
    return _finish(run, params)
