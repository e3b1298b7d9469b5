"""The tagger: a registry backbone (always run in inference mode) under pooling, dropout and a head: a sigmoid Dense
(`--head sigmoid`) or the CNN -> RNN tag decoder of train.rnn_head (`--head rnn`); both give one score per class.

The two training stages differ only in which backbone layers are trainable: none in stage 1, the top fraction in
stage 2. BatchNormalization layers stay frozen (trainable=False) in both, and that is what keeps them in inference
mode with fixed moving statistics: the backbone is also called with training=False, as the keras-io
transfer-learning recipe says, but in Keras 3.15 fit() overrides that for a nested model
(tests/test_keras_workarounds.py pins both facts).

The scratch recipe (`train_every_layer`) is the other way round: every backbone layer trains from the first epoch,
BatchNormalization included, and the backbone is called without a fixed `training` flag, so fit() runs it in
training mode (batch statistics, moving statistics updated) and prediction in inference mode.
"""

from __future__ import annotations

import keras

from train.backbones import Backbone
from train.rnn_head import DecoderSpec, decoder_layer

HEAD_LAYERS = ("pool", "dropout", "probabilities")


def build_model(
    backbone: Backbone,
    n_classes: int,
    *,
    image_size: int,
    weights: str | None,
    dropout: float,
    l2: float,
    decoder: DecoderSpec | None = None,
    backbone_training: bool | None = False,
) -> tuple[keras.Model, keras.Model]:
    """The full model (preprocessed image -> one float32 score per class) and its backbone sub-model.

    Without `decoder` the head is a sigmoid Dense; with it, the rnn head's `TagDecoder` (the model returned is then
    the tagger; `train.rnn_head.training_model` gives the teacher-forcing model over the same layers).
    `backbone_training` is the backbone call's `training` flag: False (transfer: inference mode) or None (scratch:
    the mode of the call, training in fit() and inference in predict).
    """
    features_model = backbone.build(image_size, None if weights in (None, "none") else weights)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # transfer: inference mode, which frozen BatchNormalization makes sure of; scratch: the caller's mode
    features = features_model(inputs, training=backbone_training)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    if decoder is not None:
        scores = decoder_layer(n_classes, decoder, l2)(x)
        return keras.Model(inputs, scores, name=f"{backbone.name}_rnn_tagger"), features_model
    outputs = keras.layers.Dense(
        n_classes,
        activation="sigmoid",
        dtype="float32",  # probabilities and the loss stay float32 under mixed precision
        kernel_regularizer=keras.regularizers.L2(l2) if l2 > 0 else None,
        name="probabilities",
    )(x)
    return keras.Model(inputs, outputs, name=f"{backbone.name}_tagger"), features_model


def _walk(layer: keras.layers.Layer):
    """The layer and, for nested models or blocks, every layer inside it."""
    yield layer
    for sub in getattr(layer, "layers", []) or []:
        yield from _walk(sub)


def backbone_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's top-level layers in order, without its input layer."""
    return [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]


def estimate_batchnorm_statistics(backbone: keras.Model, images) -> int:
    """Set every BatchNormalization's moving mean and variance to the statistics of `images`; returns how many.

    For a backbone with random weights (`--weights none`) the initial statistics (0 and 1) are meaningless, and
    since the backbone always runs in inference mode its features would shrink layer after layer to almost nothing
    (about 1e-6 after Xception), leaving stage 1 a head on zeros. One forward pass in training mode with momentum 0
    (no weight is updated) gives every layer the statistics of real inputs, as pretrained weights carry theirs.
    """
    layers = [layer for layer in _walk(backbone) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        backbone(images, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return len(layers)


def freeze_backbone(backbone: keras.Model) -> None:
    """Stage 1: no backbone weight is trainable."""
    backbone.trainable = False


STATISTICS_LEFT_AFTER_AN_EPOCH = 0.01  # scratch: the weight of the starting moving statistics after one epoch


def scratch_momentum(default: float, steps_per_epoch: int) -> float:
    """BatchNormalization momentum for the scratch recipe: the layer's own, or lower where that is needed for the
    moving statistics to forget their start (0 and 1) within an epoch: at most 0.01 ** (1 / steps_per_epoch)."""
    return min(default, STATISTICS_LEFT_AFTER_AN_EPOCH ** (1 / max(1, steps_per_epoch)))


def train_every_layer(backbone: keras.Model, steps_per_epoch: int) -> None:
    """The scratch recipe: every backbone weight trainable, BatchNormalization's scale and offset included (its
    moving statistics then follow the training batches, at `scratch_momentum`). The model must be compiled
    afterwards.

    Keras's momentum of 0.99 suits thousands of steps; on a small list (16 steps an epoch at the demo's size) the
    moving statistics after 8 epochs still held 28% of their starting 0 and 1, so validation and prediction, which
    use them, saw a different network from the one trained (measured: Xception from scratch, val mAP 0.58 with the
    moving statistics against 0.96 with the batch's; val_loss stuck at 0.67).
    """
    backbone.trainable = True
    for layer in _walk(backbone):
        layer.trainable = True
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = scratch_momentum(layer.momentum, steps_per_epoch)


def unfreeze_top(backbone: keras.Model, fraction: float) -> list[keras.layers.Layer]:
    """Stage 2: make the top `fraction` of the backbone's layers trainable, except BatchNormalization.

    Returns the top-level layers that were unfrozen (in order). The model must be recompiled afterwards.
    """
    layers = backbone_layers(backbone)
    n_open = int(round(len(layers) * fraction))
    cut = len(layers) - n_open
    backbone.trainable = True  # sets every sub-layer trainable; the loop below closes what must stay frozen
    for i, layer in enumerate(layers):
        layer.trainable = i >= cut
        for sub in _walk(layer):
            if isinstance(sub, keras.layers.BatchNormalization):
                sub.trainable = False
    return layers[cut:]
