"""The learning-rate schedule of the scratch recipe: linear warm-up to the peak, then cosine decay to zero.

Keras's `CosineDecay` with `warmup_target` and `warmup_steps` is the whole schedule; this module only turns epochs
into optimizer steps. The schedule is a function of the optimizer's step counter, which BackupAndRestore saves and
restores with the optimizer, so a resumed run continues the schedule at the step where it was killed.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras


@dataclass(frozen=True, kw_only=True)
class WarmupCosine:
    """Warm-up over `warmup_epochs`, cosine decay over the remaining epochs; `peak` is --lr.

    `steps_per_epoch` is the number of full batches of the training list (the training pipeline drops the last
    partial batch). Unreadable files, skipped, can leave an epoch a full batch short; the schedule then ends that
    many steps before reaching zero (it never runs past it).
    """

    peak: float
    epochs: int
    warmup_epochs: int
    steps_per_epoch: int

    @property
    def warmup_steps(self) -> int:
        return self.warmup_epochs * self.steps_per_epoch

    @property
    def decay_steps(self) -> int:
        return (self.epochs - self.warmup_epochs) * self.steps_per_epoch

    def keras_schedule(self) -> keras.optimizers.schedules.LearningRateSchedule:
        """lr(step) = peak * step / W for step < W, then peak * (1 + cos(pi * (step - W) / D)) / 2, held at 0 after
        W + D (W, D: warm-up and decay steps)."""
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=self.decay_steps,
            alpha=0.0,
            warmup_target=self.peak,
            warmup_steps=self.warmup_steps,
        )


def warmup_cosine(peak: float, epochs: int, warmup_epochs: int, n_train: int, batch_size: int) -> WarmupCosine:
    """The scratch schedule for `n_train` training images in global batches of `batch_size`; ValueError when the
    images make no full batch (training would have no step)."""
    steps = n_train // batch_size
    if steps < 1:
        raise ValueError(f"{n_train} training images make no full batch of {batch_size}")
    return WarmupCosine(peak=peak, epochs=epochs, warmup_epochs=warmup_epochs, steps_per_epoch=steps)
