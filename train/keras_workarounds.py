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


def _is_depthwise_grouped(layer: keras.layers.Layer) -> bool:
    """A Conv2D with one group per input channel and one filter per group: a depthwise convolution."""
    # A Conv2D kernel is (kh, kw, input channels / groups, filters).
    return (
        type(layer) is keras.layers.Conv2D
        and layer.groups > 1
        and layer.kernel.shape[-2] == 1
        and layer.filters == layer.groups
    )


def grouped_to_depthwise(model: keras.Model) -> keras.Model:
    """`model` with each depthwise Conv2D (`groups` = input channels = filters, as in ConvNeXt's 7x7 blocks) replaced
    by a DepthwiseConv2D of the same name and weights: the same function, to float rounding.

    Keras's TensorFlow backend runs a grouped convolution through XLA (`jit_compile=True`), because TensorFlow's CPU
    kernels have no groups; on this CPU that took 191 ms for one 7x7 depthwise layer of ConvNeXt-Tiny at 96 px
    (batch 16) against 9 ms as DepthwiseConv2D, and 576 ms against 17 ms for its gradients: ConvNeXt trained at a
    fifth of Xception's speed for the same FLOPs (keras-team/keras#20471, open). Returns `model` itself when it has
    no such layer.
    """
    if not any(_is_depthwise_grouped(layer) for layer in model.layers):
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if not _is_depthwise_grouped(layer):
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        return keras.layers.DepthwiseConv2D(
            kernel_size=config["kernel_size"],
            strides=config["strides"],
            padding=config["padding"],
            data_format=config["data_format"],
            dilation_rate=config["dilation_rate"],
            depth_multiplier=1,
            activation=config["activation"],
            use_bias=config["use_bias"],
            name=config["name"],
            dtype=config["dtype"],
            trainable=config["trainable"],
        )

    rewritten = keras.models.clone_model(model, clone_function=clone)
    for source in model.layers:
        if not source.weights:  # input layers (renamed by the clone) and layers without variables
            continue
        target = rewritten.get_layer(source.name)
        weights = source.get_weights()
        if _is_depthwise_grouped(source):
            kernel = weights[0]  # (kh, kw, 1, channels) -> DepthwiseConv2D's (kh, kw, channels, 1)
            weights = [kernel.reshape(*kernel.shape[:2], kernel.shape[3], 1), *weights[1:]]
        target.set_weights(weights)
    return rewritten
