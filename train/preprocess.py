"""Backbone input preprocessing by name: the only place that maps 0..255 RGB pixels to what a backbone expects.

Each backbone registry entry names one of these modes; the name is stored in a RUN_DIR's config.json so
prediction applies exactly what training applied. They are plain TF ops (no Lambda layer in the model),
run inside the tf.data pipeline.
"""

from __future__ import annotations

import tensorflow as tf

# ImageNet channel statistics, RGB order, used by the "caffe" and "torch" modes of keras.applications.
_IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
_IMAGENET_STD_RGB = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)


def _inception(x: tf.Tensor) -> tf.Tensor:
    # keras.applications.inception_v3/xception/inception_resnet_v2 "tf" mode: scale to [-1, 1].
    return x / 127.5 - 1.0


def _caffe(x: tf.Tensor) -> tf.Tensor:
    # ResNet50/VGG "caffe" mode: RGB -> BGR, subtract the ImageNet mean, no scaling.
    x = x - tf.constant(_IMAGENET_MEAN_RGB, dtype=x.dtype)
    return tf.reverse(x, axis=[-1])


def _torch(x: tf.Tensor) -> tf.Tensor:
    # DenseNet "torch" mode: scale to [0, 1], then normalise with ImageNet mean and std.
    return (x - tf.constant(_IMAGENET_MEAN_RGB, dtype=x.dtype)) / tf.constant(_IMAGENET_STD_RGB, dtype=x.dtype)


def _raw(x: tf.Tensor) -> tf.Tensor:
    # EfficientNet/ConvNeXt in keras.applications rescale inside the model: feed 0..255 as is.
    return x


PREPROCESSING = {"inception": _inception, "caffe": _caffe, "torch": _torch, "raw": _raw}


def preprocess(images: tf.Tensor, mode: str) -> tf.Tensor:
    """Map float32 RGB pixels in [0, 255] (any leading shape, channels last) to a backbone's input range."""
    try:
        fn = PREPROCESSING[mode]
    except KeyError:
        raise ValueError(f"unknown preprocessing {mode!r}; known: {', '.join(sorted(PREPROCESSING))}") from None
    return fn(tf.cast(images, tf.float32))
