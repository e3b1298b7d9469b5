"""The places where training reaches into Keras internals to work around its behaviour, each in one function.

Each has a test in tests/test_keras_workarounds.py that reproduces the behaviour worked around on a tiny model; when
a Keras upgrade changes it, that test fails and says which workaround may be removable.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

SEED_STATE_SUFFIX = "seed_generator_state"  # the path ending of a SeedGenerator's state variable
_COUNTER_SHIFT = 20  # an epoch's dropout counter starts at epoch * 2**20: room for a million steps per epoch
_WORKER_SHIFT = 40  # and a worker's at worker * 2**40 on top (the state is int64): room for a million epochs


def clear_restored_epoch(model: keras.Model) -> None:
    """Forget the epoch a BackupAndRestore restored on the model before its next fit().

    BackupAndRestore sets the private `model._initial_epoch` when it restores a backup, and fit() prefers that over
    its `initial_epoch` argument in every later call: the epoch restored in stage 1 would leak into stage 2's fit().
    """
    model._initial_epoch = None


def reseed_random_layers(model: keras.Model, epoch: int, worker: int = 0) -> None:
    """Key the random layers (the head's Dropout) on the epoch, as the data's shuffle and augmentation are.

    BackupAndRestore does not restore the layers' SeedGenerator states, so a resumed run would otherwise draw other
    dropout masks than the uninterrupted one from its first resumed epoch on. Each state is (seed, counter), found
    by its variable path; the counter, advanced once per training step, restarts every epoch at epoch * 2**20.
    In multi-worker training each worker adds worker * 2**40, so the workers draw different masks.
    """
    for variable in model.variables:
        if variable.path.endswith(SEED_STATE_SUFFIX):
            seed = int(keras.ops.convert_to_numpy(variable)[0])
            counter = (worker << _WORKER_SHIFT) + (epoch << _COUNTER_SHIFT)
            variable.assign(np.array([seed, counter], dtype=variable.dtype))


def correct_epoch_loss(logs: dict, running_mean: float) -> None:
    """Replace the epoch's "loss" in `logs` by the running mean the last training batch reported.

    Keras averages the epoch loss over one batch too many when the dataset's length is unknown and its batches drop
    their remainder (ours: skipped files make the length unknown); the last batch's running mean is the right value.
    Done in the first callback, so later ones (TensorBoard, the progress bar) see the corrected logs.
    """
    logs["loss"] = running_mean


class EpochAlignedSteps(keras.callbacks.Callback):
    """Hold the optimizer's step counter at `epoch * steps_per_epoch` when each epoch starts and ends.

    With a dataset of unknown length (ours: skipped files make it so), fit() ends every epoch with one more call of
    its train function that finds no batch, and that call still advances `optimizer.iterations`: the counter gains
    a step per epoch in which nothing trained. A learning-rate schedule of the step (the scratch recipe's) would
    drift a step per epoch and reach its end early. Listed before the callback that records the epoch's learning
    rate, so that reads the schedule at the epoch's nominal last step.
    """

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)

    def _align(self, step: int) -> None:
        self.model.optimizer.iterations.assign(step)

    def on_epoch_begin(self, epoch, logs=None):
        self._align(epoch * self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._align((epoch + 1) * self.steps_per_epoch)


def _batchnorm_layers(layer: keras.layers.Layer):
    if isinstance(layer, keras.layers.BatchNormalization):
        yield layer
    for sub in getattr(layer, "layers", []) or []:
        yield from _batchnorm_layers(sub)


def reconcile_replica_statistics(model: keras.Model) -> int:
    """Set each BatchNormalization moving statistic's per-replica copies to their mean; returns how many were.

    Under MirroredStrategy a BatchNormalization in training mode updates its moving statistics on every replica from
    that replica's share of the batch, in a MirroredVariable with aggregation NONE: the copies drift apart and are
    never reconciled, predict() normalises each replica's images with that replica's copy, and a saved or backed-up
    model holds the first replica's. The mean of the copies is the moving mean of the global batches' means (the
    moving average is linear; the shares are equal), and makes validation, model.keras and a resumed run agree.
    One replica: nothing to do.
    """
    reconciled = 0
    for layer in _batchnorm_layers(model):
        for variable in (layer.moving_mean, layer.moving_variance):
            copies = getattr(variable.value, "values", None)  # a MirroredVariable's per-replica variables
            if not copies or len(copies) < 2:
                continue
            mean = tf.add_n([tf.convert_to_tensor(c) for c in copies]) / len(copies)
            for copy in copies:
                copy.assign(mean)
            reconciled += 1
    return reconciled


class ReconcileReplicaStatistics(keras.callbacks.Callback):
    """`reconcile_replica_statistics` at each epoch's end, before the epoch is validated, saved and backed up."""

    def on_epoch_end(self, epoch, logs=None):
        reconcile_replica_statistics(self.model)
