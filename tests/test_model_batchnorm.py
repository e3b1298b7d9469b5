"""BatchNormalization statistics of random-weight backbones: estimated on inputs, exactly, without touching weights."""

from __future__ import annotations

import keras
import numpy as np

from common.synthetic import photo
from train.backbones import get_backbone
from train.model import estimate_batchnorm_statistics


def _images(n: int = 8, size: int = 75) -> np.ndarray:
    """Synthetic photos scaled to [-1, 1], the inception preprocessing's range."""
    return np.stack([photo(size, size, seed=(0, k)) for k in range(n)]).astype("float32") / 127.5 - 1.0


def test_estimated_statistics_are_the_batch_statistics_of_each_layer_input():
    backbone = get_backbone("xception").build(75, weights="none")
    images = _images()
    weights_before = {v.path: np.array(v) for v in backbone.trainable_weights}
    features_before = np.asarray(backbone(images, training=False))

    n = estimate_batchnorm_statistics(backbone, images)

    bns = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert n == len(bns) > 30
    first = backbone.get_layer("block1_conv1_bn")
    conv_out = np.asarray(keras.Model(backbone.input, backbone.get_layer("block1_conv1").output)(images))
    np.testing.assert_allclose(np.asarray(first.moving_mean), conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(first.moving_variance), conv_out.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)
    assert all(layer.momentum == 0.99 for layer in bns)  # restored after the pass
    for v in backbone.trainable_weights:  # no trainable weight moved: only the moving statistics
        np.testing.assert_array_equal(np.array(v), weights_before[v.path])

    features_after = np.asarray(backbone(images, training=False))
    # Without estimation the features of a random Xception vanish; with it they have a usable scale.
    assert features_before.std() < 1e-3 < 0.05 < features_after.std()
