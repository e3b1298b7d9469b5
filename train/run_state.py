"""A training run's state: which state its RUN_DIR is in (fresh, resume, complete), and what the stages share.

`TrainingRun` holds what the two stages and the epoch callback share: the settings, the datasets, the history
rows and the best epoch so far. History and best are kept in the RUN_DIR after every epoch, so the same command
run again after a kill picks them up where the last finished epoch left them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from crawl.manifest import DataDirError
from train import rundir
from train.backbones import get_backbone
from train.config import RUNTIME_SETTINGS, TrainConfig
from train.data import SkipLog, make_dataset
from train.rnn_head import class_order, sequence_rows, teacher_forcing
from train.rundir import BACKUP_DIR, CONFIG_FILE, METRICS_FILE, MODEL_FILE, RunDirError, RunRecord
from train.shards import Shard

RunDirState = Literal["fresh", "resume", "complete"]
_DEFAULT_SETTINGS = {  # TrainConfig's defaults as config.json spells them
    f.name: list(f.default) if isinstance(f.default, tuple) else f.default
    for f in dataclasses.fields(TrainConfig)
    if f.default is not dataclasses.MISSING
}


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


def has_progress(out: Path) -> bool:
    """Whether a RUN_DIR holds any finished epoch: a model, a backup or a history row."""
    return (out / MODEL_FILE).exists() or (out / BACKUP_DIR).exists() or len(rundir.read_history(out)) > 0


def run_dir_state(out: Path, record: RunRecord) -> RunDirState:
    """"fresh", "resume" or "complete" for `out` and this run's record; RunDirError if it holds something else."""
    if not (out / CONFIG_FILE).exists():
        if out.exists() and any(out.iterdir()):
            raise RunDirError(f"{out} exists, is not empty and has no {CONFIG_FILE}; choose an empty or new --out")
        return "fresh"
    try:
        old = rundir.read_config(out)
    except RunDirError as err:
        raise RunDirError(f"{err}; choose a new --out") from None
    ignore = set(RUNTIME_SETTINGS)
    # A setting added to TrainConfig after the run was written (e.g. --head) is no change when it is at its default.
    added = {k: v for k, v in _DEFAULT_SETTINGS.items() if k not in old.train and k in record.train}
    before = {k: v for k, v in {**added, **old.train}.items() if k not in ignore}
    after = {k: v for k, v in record.train.items() if k not in ignore}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for key in ("manifest_sha256", "val_manifest_sha256", "classes"):
        if getattr(old, key) != getattr(record, key):
            changed.append(key)
    if changed and not has_progress(out):
        return "fresh"  # nothing trained yet (e.g. a start that failed on its weights): the new settings replace it
    if changed:
        before_after = ((k, before.get(k, getattr(old, k, None)), after.get(k, getattr(record, k, None)))
                        for k in changed)
        details = "; ".join(f"{k}: {_plain(a)!r} -> {_plain(b)!r}" for k, a, b in before_after)
        raise RunDirError(
            f"{out} holds a run with other settings or data ({details}); "
            "resume with the same command or use a new --out"
        )
    if (out / METRICS_FILE).exists() and not (out / BACKUP_DIR).exists():
        return "complete"
    return "resume"


def _plain(value):
    return list(value) if isinstance(value, tuple) else value  # classes as config.json spells them


class TrainingRun:
    """The state of one training run shared by the stages and the epoch callback."""

    def __init__(self, cfg: TrainConfig, split: Split, strategy: tf.distribute.Strategy, verbose: int | str):
        self.cfg, self.split, self.strategy, self.verbose = cfg, split, strategy, verbose
        self.out = cfg.out
        self.backup = cfg.out / BACKUP_DIR
        self.backbone = get_backbone(cfg.backbone)
        with tf.device("/cpu:0"):
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
        self.train_skips = SkipLog(len(split.train_paths))
        self.val_skips = SkipLog(len(split.val_paths))
        common = dict(
            image_size=cfg.image_size, preprocessing=self.backbone.preprocessing, cache=cfg.cache, seed=cfg.seed
        )
        # The rnn head learns label sequences: each image's classes in `class_order`, carried through the same
        # pipeline as label rows, then split into the teacher-forcing inputs and targets.
        self.class_order = class_order(split.train_labels, cfg.label_order)
        self.train_ds = self.train_dataset(cfg.batch_size)
        # Every replica gets at least one image of the last validation batch: it is padded to a multiple of them.
        self.val_ds = make_dataset(
            split.val_paths, None, batch_size=cfg.batch_size, training=False, skips=self.val_skips,
            cache_tag="val", pad_to_multiple=strategy.num_replicas_in_sync, **common,
        )
        self.history = rundir.read_history(self.out)
        self.best_map, self.best_epoch = rundir.read_progress(self.out)
        self.stop_reason: str | None = None
        self.last_skipped: dict[str, list[str]] = {"train": [], "val": []}
        # The model that validates, is saved and predicts (one score per class): the fitted model itself for the
        # sigmoid head, the tagger sharing the training model's weights for the rnn head. Set by train().
        self.tagger: keras.Model | None = None

    def train_dataset(self, batch_size: int, shard: Shard | None = None) -> tf.data.Dataset:
        """The training pipeline in batches of `batch_size`; with `shard`, one multi-worker input pipeline's share."""
        cfg, split = self.cfg, self.split
        rnn = cfg.head == "rnn"
        labels = sequence_rows(split.train_labels, self.class_order) if rnn else split.train_labels
        ds = make_dataset(
            split.train_paths, labels, image_size=cfg.image_size, preprocessing=self.backbone.preprocessing,
            cache=cfg.cache, seed=cfg.seed, batch_size=batch_size, training=True, augment=cfg.augment,
            epoch=self.epoch, skips=self.train_skips, cache_tag="train", shard=shard,
        )
        return teacher_forcing(ds, len(split.classes)) if rnn else ds

    def restart_at(self, epoch: int) -> None:
        """Forget epochs from `epoch` (0-based) on: a resumed fit() redoes them, so their rows must not stay."""
        self.history = self.history[self.history["epoch"] <= epoch].reset_index(drop=True)
        if self.best_epoch is not None and self.best_epoch > epoch:
            # The saved model came from an epoch being redone; let the redone epoch replace it whatever its mAP.
            self.best_map, self.best_epoch = -math.inf, None
        rundir.write_history(self.out, self.history)

    def add_epoch(self, row: dict) -> None:
        """Append one finished epoch's history row and keep history and best-so-far in the RUN_DIR."""
        new_row = pd.DataFrame([row])
        self.history = pd.concat([self.history, new_row], ignore_index=True) if len(self.history) else new_row
        rundir.write_history(self.out, self.history)
        rundir.write_progress(self.out, self.best_map, self.best_epoch)

    def predict_val(self, model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities for every readable validation image, exactly once, and their indices into the val list."""
        self.val_skips.reset()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Your input ran out of data")  # unknown-length datasets end so
            probs = np.asarray(model.predict(self.val_ds, verbose=0), np.float64)
        delivered = np.asarray(self.val_skips.delivered(), dtype=int)
        padding = len(probs) - len(delivered)  # the last batch's padding rows (fewer than the replicas)
        if not 0 <= padding < self.strategy.num_replicas_in_sync:
            raise RuntimeError(f"validation gave {len(probs)} predictions for {len(delivered)} readable images")
        probs = probs[: len(delivered)]
        if len(delivered) == 0:
            raise DataDirError(f"none of the {len(self.split.val_paths)} validation images could be read")
        return probs, delivered
