"""The places where training reaches into Keras internals to work around its behaviour, each in one function.

Each has a test in tests/test_keras_workarounds.py that reproduces the behaviour worked around on a tiny model; when
a Keras upgrade changes it, that test fails and says which workaround may be removable.
"""

from __future__ import annotations

import keras
import numpy as np

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
