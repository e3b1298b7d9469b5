"""The per-epoch bookkeeping of a training run, as a Keras callback: measure, validate, record, report.

After each epoch the whole validation set is predicted once for the exact mAP (by the run's tagger: the fitted model
itself, or for the rnn head the tagger sharing its weights); the best epoch's tagger is saved,
the epoch's row goes to history.csv and one line to stdout. A NaN or infinite loss stops the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import keras
import numpy as np

from crawl.manifest import DataDirError
from train import rundir
from train.keras_workarounds import correct_epoch_loss, reseed_random_layers
from train.losses import validation_loss
from train.metrics import mean_average_precision
from train.run_state import TrainingRun

MAX_NAMED_SKIPS = 10  # unreadable ids named per epoch line; the rest are counted


@dataclass(frozen=True)
class Validation:
    """One epoch's validation: exact mAP and loss over the readable images, and the indices of the unreadable."""

    val_map: float
    val_loss: float
    skipped: list[int]


class EpochMonitor(keras.callbacks.Callback):
    """Per epoch: advance the data epoch, stop on a NaN loss, then validate, record, keep the best model, report."""

    def __init__(self, run: TrainingRun, stage: int):
        super().__init__()
        self.run, self.stage = run, stage
        self.first_epoch_of_fit = True
        # val_loss is the loss trained on (--loss); the rnn head's sequence loss has no per-class form: BCE there.
        self.val_loss = validation_loss(run.cfg.loss, **run.cfg.loss_settings())

    # --- during the epoch ----------------------------------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch_of_fit:
            self.first_epoch_of_fit = False
            self.run.restart_at(epoch)
        self.run.epoch.assign(epoch)
        reseed_random_layers(self.model, epoch)
        self.run.train_skips.reset()
        self.started = time.perf_counter()
        self.first_batch_done = None
        self.batches = 0
        self.loss = float("nan")  # the running mean over the epoch's batches so far
        self.diverged = False

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches == 1:
            self.first_batch_done = time.perf_counter()
        self.loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(self.loss):
            self.diverged = True
            epoch = self.run.epoch.numpy() + 1
            self.run.stop_reason = f"the loss became {self.loss} in epoch {epoch}, batch {batch + 1}"
            self.model.stop_training = True

    # --- at its end ----------------------------------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            return
        images_per_second = self._measure(epoch)
        skipped_train = self.run.train_skips.take()
        validation = self._validate(epoch)
        if validation is None:
            return
        logs = logs if logs is not None else {}
        correct_epoch_loss(logs, self.loss)
        logs["val_loss"], logs["val_map"] = validation.val_loss, validation.val_map
        row, improved = self._record(epoch, validation, images_per_second)
        self._report(row, improved, skipped_train, validation.skipped)

    def _measure(self, epoch: int) -> float:
        """Training images per second, the first batch (tracing, pipeline warm-up) left out when there are more."""
        train_end = time.perf_counter()
        run = self.run
        if self.batches == 0:
            readable = len(run.split.train_paths) - len(run.train_skips.skipped())
            raise DataDirError(
                f"epoch {epoch + 1} had no training batch: {readable} readable training images, fewer than "
                f"--batch-size {run.cfg.batch_size}"
            )
        if self.batches > 1:
            return (self.batches - 1) * run.cfg.batch_size / max(train_end - self.first_batch_done, 1e-9)
        return run.cfg.batch_size / max(train_end - self.started, 1e-9)

    def _validate(self, epoch: int) -> Validation | None:
        """Predict the validation set once; None (and the run stopped) when the predictions are not finite."""
        run = self.run
        probs, kept = run.predict_val(run.tagger or self.model)
        if not np.isfinite(probs).all():
            run.stop_reason = f"the validation predictions became NaN or infinite in epoch {epoch + 1}"
            self.model.stop_training = True
            return None
        truth = run.split.val_labels[kept]
        delivered = set(kept.tolist())
        skipped = [i for i in range(len(run.split.val_paths)) if i not in delivered]
        return Validation(mean_average_precision(truth, probs), self.val_loss(truth, probs), skipped)

    def _record(self, epoch: int, validation: Validation, images_per_second: float) -> tuple[dict, bool]:
        """Keep the model if this epoch is the best so far, and append its history row; returns (row, improved)."""
        run = self.run
        improved = validation.val_map > run.best_map
        if improved:
            rundir.save_model(run.tagger or self.model, run.out)
            run.best_map, run.best_epoch = validation.val_map, epoch + 1
        row = {
            "epoch": epoch + 1,
            "stage": self.stage,
            "lr": float(f"{float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)):.7g}"),
            "loss": self.loss,
            "val_loss": validation.val_loss,
            "val_map": validation.val_map,
            "seconds": round(time.perf_counter() - self.started, 3),
            "images_per_second": round(images_per_second, 2),
        }
        run.add_epoch(row)
        return row, improved

    def _report(self, row: dict, improved: bool, skipped_train: list[int], skipped_val: list[int]) -> None:
        """One line per epoch, printed from the history row just written; a second one naming unreadable images."""
        run = self.run
        run.last_skipped = {
            "train": [run.split.train_ids[i] for i in skipped_train],
            "val": [run.split.val_ids[i] for i in skipped_val],
        }
        print(
            f"epoch {row['epoch']}/{run.cfg.epochs} stage {self.stage}: loss {row['loss']:.4f}, "
            f"val_loss {row['val_loss']:.4f}, val mAP {row['val_map']:.4f}{' (best)' if improved else ''}, "
            f"{row['images_per_second']:.1f} images/s, {row['seconds']:.1f} s",
            flush=True,
        )
        n_skipped = len(skipped_train) + len(skipped_val)
        if n_skipped:
            shown = ", ".join((run.last_skipped["train"] + run.last_skipped["val"])[:MAX_NAMED_SKIPS])
            print(
                f"epoch {row['epoch']}: skipped {len(skipped_train)} unreadable training and {len(skipped_val)} "
                f"unreadable validation image(s): {shown}{' ...' if n_skipped > MAX_NAMED_SKIPS else ''}",
                flush=True,
            )
