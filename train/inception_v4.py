"""InceptionV4 (Szegedy et al. 2016) in Keras, layer for layer the architecture of timm's `inception_v4`.

Stem, 4 Inception-A, Reduction-A, 7 Inception-B, Reduction-B, 3 Inception-C, every convolution without bias
and followed by BatchNormalization (epsilon 0.001, with scale and centre, as timm's `inception_v4.tf_in1k`
weights from Google's TF-slim release use) and ReLU. Padding is timm's explicit symmetric padding, which for
these layers is exactly Keras padding: a stride-1 convolution with padding k//2 on each side is Keras 'same'
(odd kernels only, which is all there are), padding 0 is 'valid' (all stride-2 layers), and timm's
`AvgPool2d(3, stride=1, padding=1, count_include_pad=False)` is `AveragePooling2D(3, 1, 'same')`, whose
average counts only the pixels inside the image (tests/test_backbones.py checks this numerically).
Branches are concatenated on the channel axis in timm's order, so the channel layout of every block, and of
the 1536-channel output, is timm's.

Layer names mirror timm's module paths so weights map one to one (for the weight converter, train/weights.py):

- timm's `features` has 22 children; `TIMM_FEATURE_BLOCKS[i]` is our name for `features.i`:
  `stem1`, `stem2`, `stem3` (the three stem convolutions), `mixed_3a`, `mixed_4a`, `mixed_5a`,
  `mixed_5b`..`mixed_5e` (Inception-A), `mixed_6a` (Reduction-A), `mixed_6b`..`mixed_6h` (Inception-B),
  `mixed_7a` (Reduction-B), `mixed_7b`..`mixed_7d` (Inception-C); the block names are TF-slim's.
- A convolution unit (timm's `ConvNormAct` with children `.conv` and `.bn`) at timm path `features.i.P`
  becomes three Keras layers `<U>_conv` (Conv2D), `<U>_bn` (BatchNormalization) and `<U>_relu`, where
  U is `TIMM_FEATURE_BLOCKS[i]` followed by P with dots turned into underscores: `features.6.branch1.1`
  is `mixed_5b_branch1_1_conv` / `mixed_5b_branch1_1_bn`, `features.19.branch2_3a` is
  `mixed_7b_branch2_3a_conv`, the stem's `features.0` is `stem1_conv` / `stem1_bn`, and Mixed-3a's unit
  (timm attribute `conv`, so timm keys `features.3.conv.conv.weight`) is `mixed_3a_conv_conv` /
  `mixed_3a_conv_bn`. `timm_name_to_layer` applies this rule to a timm module path.
- Pooling layers follow the same rule (`mixed_3a_maxpool`, `mixed_5b_branch3_0_avgpool`,
  `mixed_6a_branch2_maxpool`); each block's output is the Concatenate layer named after the block
  (`mixed_5b`), and Inception-C's inner concatenations are `<block>_branch1` and `<block>_branch2`.
- The top: `avg_pool` (GlobalAveragePooling2D) and `predictions` (Dense, timm's `last_linear`).
  timm's default drop_rate is 0, so there is no dropout layer; the project's own head adds its dropout.
"""

from __future__ import annotations

from pathlib import Path

import keras

MIN_INPUT_SIZE = 75  # smallest square input whose Reduction-B output is still at least 1x1
BN_EPSILON = 1e-3

TIMM_FEATURE_BLOCKS: tuple[str, ...] = (
    ("stem1", "stem2", "stem3", "mixed_3a", "mixed_4a", "mixed_5a")
    + tuple(f"mixed_5{c}" for c in "bcde")
    + ("mixed_6a",)
    + tuple(f"mixed_6{c}" for c in "bcdefgh")
    + ("mixed_7a",)
    + tuple(f"mixed_7{c}" for c in "bcd")
)


def timm_name_to_layer(module_path: str) -> str:
    """Keras layer name for a timm module path, e.g. "features.6.branch1.1.conv" -> "mixed_5b_branch1_1_conv".

    Accepts paths of convolution units' `.conv` and `.bn` children (a state-dict key without its final
    `.weight`, `.bias`, `.running_mean`, ...) and `last_linear` (-> "predictions").
    """
    if module_path == "last_linear":
        return "predictions"
    parts = module_path.split(".")
    if len(parts) < 3 or parts[0] != "features" or not parts[1].isdigit() or parts[-1] not in ("conv", "bn"):
        raise ValueError(f"not a timm inception_v4 conv/bn module path: {module_path!r}")
    index = int(parts[1])
    if index >= len(TIMM_FEATURE_BLOCKS):
        raise ValueError(
            f"timm inception_v4 has {len(TIMM_FEATURE_BLOCKS)} feature blocks, not {index + 1}: {module_path!r}"
        )
    return "_".join([TIMM_FEATURE_BLOCKS[index], *parts[2:]])


def _conv_unit(x, filters: int, kernel: int | tuple[int, int], name: str, strides: int = 1, padding: str = "same"):
    """Conv2D (no bias) -> BatchNormalization -> ReLU, named `<name>_conv`, `<name>_bn`, `<name>_relu`."""
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def _avg_pool_same(x, name: str):
    # 'same' average pooling divides by the number of in-image pixels: timm's count_include_pad=False.
    return keras.layers.AveragePooling2D(3, strides=1, padding="same", name=name)(x)


def _max_pool_valid(x, name: str):
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid", name=name)(x)


def _concat(tensors, name: str):
    return keras.layers.Concatenate(axis=-1, name=name)(tensors)


def _stem(x):
    """timm features.0-5: three convolutions, then Mixed-3a, Mixed-4a, Mixed-5a; 3 -> 384 channels."""
    x = _conv_unit(x, 32, 3, "stem1", strides=2, padding="valid")
    x = _conv_unit(x, 32, 3, "stem2", padding="valid")
    x = _conv_unit(x, 64, 3, "stem3")

    b = "mixed_3a"  # pool first, then conv
    x = _concat([_max_pool_valid(x, f"{b}_maxpool"), _conv_unit(x, 96, 3, f"{b}_conv", strides=2, padding="valid")], b)

    b = "mixed_4a"
    b0 = _conv_unit(x, 64, 1, f"{b}_branch0_0")
    b0 = _conv_unit(b0, 96, 3, f"{b}_branch0_1", padding="valid")
    b1 = _conv_unit(x, 64, 1, f"{b}_branch1_0")
    b1 = _conv_unit(b1, 64, (1, 7), f"{b}_branch1_1")
    b1 = _conv_unit(b1, 64, (7, 1), f"{b}_branch1_2")
    b1 = _conv_unit(b1, 96, 3, f"{b}_branch1_3", padding="valid")
    x = _concat([b0, b1], b)

    b = "mixed_5a"  # conv first, then pool (the reverse of mixed_3a, as in timm)
    x = _concat([_conv_unit(x, 192, 3, f"{b}_conv", strides=2, padding="valid"), _max_pool_valid(x, f"{b}_maxpool")], b)
    return x


def _inception_a(x, b: str):
    """384 -> 384 channels at 35x35 (for 299 px input)."""
    b0 = _conv_unit(x, 96, 1, f"{b}_branch0")
    b1 = _conv_unit(x, 64, 1, f"{b}_branch1_0")
    b1 = _conv_unit(b1, 96, 3, f"{b}_branch1_1")
    b2 = _conv_unit(x, 64, 1, f"{b}_branch2_0")
    b2 = _conv_unit(b2, 96, 3, f"{b}_branch2_1")
    b2 = _conv_unit(b2, 96, 3, f"{b}_branch2_2")
    b3 = _avg_pool_same(x, f"{b}_branch3_0_avgpool")
    b3 = _conv_unit(b3, 96, 1, f"{b}_branch3_1")
    return _concat([b0, b1, b2, b3], b)


def _reduction_a(x, b: str = "mixed_6a"):
    """384 -> 1024 channels, 35x35 -> 17x17."""
    b0 = _conv_unit(x, 384, 3, f"{b}_branch0", strides=2, padding="valid")
    b1 = _conv_unit(x, 192, 1, f"{b}_branch1_0")
    b1 = _conv_unit(b1, 224, 3, f"{b}_branch1_1")
    b1 = _conv_unit(b1, 256, 3, f"{b}_branch1_2", strides=2, padding="valid")
    b2 = _max_pool_valid(x, f"{b}_branch2_maxpool")
    return _concat([b0, b1, b2], b)


def _inception_b(x, b: str):
    """1024 -> 1024 channels at 17x17."""
    b0 = _conv_unit(x, 384, 1, f"{b}_branch0")
    b1 = _conv_unit(x, 192, 1, f"{b}_branch1_0")
    b1 = _conv_unit(b1, 224, (1, 7), f"{b}_branch1_1")
    b1 = _conv_unit(b1, 256, (7, 1), f"{b}_branch1_2")
    b2 = _conv_unit(x, 192, 1, f"{b}_branch2_0")
    b2 = _conv_unit(b2, 192, (7, 1), f"{b}_branch2_1")
    b2 = _conv_unit(b2, 224, (1, 7), f"{b}_branch2_2")
    b2 = _conv_unit(b2, 224, (7, 1), f"{b}_branch2_3")
    b2 = _conv_unit(b2, 256, (1, 7), f"{b}_branch2_4")
    b3 = _avg_pool_same(x, f"{b}_branch3_0_avgpool")
    b3 = _conv_unit(b3, 128, 1, f"{b}_branch3_1")
    return _concat([b0, b1, b2, b3], b)


def _reduction_b(x, b: str = "mixed_7a"):
    """1024 -> 1536 channels, 17x17 -> 8x8."""
    b0 = _conv_unit(x, 192, 1, f"{b}_branch0_0")
    b0 = _conv_unit(b0, 192, 3, f"{b}_branch0_1", strides=2, padding="valid")
    b1 = _conv_unit(x, 256, 1, f"{b}_branch1_0")
    b1 = _conv_unit(b1, 256, (1, 7), f"{b}_branch1_1")
    b1 = _conv_unit(b1, 320, (7, 1), f"{b}_branch1_2")
    b1 = _conv_unit(b1, 320, 3, f"{b}_branch1_3", strides=2, padding="valid")
    b2 = _max_pool_valid(x, f"{b}_branch2_maxpool")
    return _concat([b0, b1, b2], b)


def _inception_c(x, b: str):
    """1536 -> 1536 channels at 8x8; branches 1 and 2 end in a 1x3 / 3x1 pair."""
    b0 = _conv_unit(x, 256, 1, f"{b}_branch0")
    b1 = _conv_unit(x, 384, 1, f"{b}_branch1_0")
    b1 = _concat(
        [_conv_unit(b1, 256, (1, 3), f"{b}_branch1_1a"), _conv_unit(b1, 256, (3, 1), f"{b}_branch1_1b")],
        f"{b}_branch1",
    )
    b2 = _conv_unit(x, 384, 1, f"{b}_branch2_0")
    b2 = _conv_unit(b2, 448, (3, 1), f"{b}_branch2_1")
    b2 = _conv_unit(b2, 512, (1, 3), f"{b}_branch2_2")
    b2 = _concat(
        [_conv_unit(b2, 256, (1, 3), f"{b}_branch2_3a"), _conv_unit(b2, 256, (3, 1), f"{b}_branch2_3b")],
        f"{b}_branch2",
    )
    b3 = _avg_pool_same(x, f"{b}_branch3_0_avgpool")
    b3 = _conv_unit(b3, 256, 1, f"{b}_branch3_1")
    return _concat([b0, b1, b2, b3], b)


def _check_input_shape(input_shape) -> tuple:
    """(H, W, 3) with H and W None or at least MIN_INPUT_SIZE; default (None, None, 3)."""
    if input_shape is None:
        return (None, None, 3)
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"InceptionV4: input_shape must be (height, width, 3) (channels last), got {shape}")
    for side in shape[:2]:
        if side is not None and side < MIN_INPUT_SIZE:
            raise ValueError(
                f"InceptionV4: input size {shape[0]}x{shape[1]} is too small; height and width must be at least "
                f"{MIN_INPUT_SIZE} px"
            )
    return shape


def InceptionV4(  # noqa: N802  (named like the keras.applications constructors)
    include_top: bool = True,
    weights: str | Path | None = None,
    input_tensor=None,
    input_shape: tuple | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str = "inception_v4",
) -> keras.Model:
    """Build InceptionV4, keras.applications-style.

    include_top: add `avg_pool` and a Dense `predictions` layer of `classes` units (timm's classifier).
    weights: None (random initialisation) or the path of a Keras weights file for this exact configuration
        (with or without the top); "imagenet" is resolved to a file by train.backbones.
    input_tensor / input_shape: as in keras.applications; channels last, height and width at least 75.
    pooling: without the top, None (4D feature map of 1536 channels), "avg" or "max".
    """
    if keras.backend.image_data_format() != "channels_last":
        raise ValueError("InceptionV4 supports only the channels_last image data format")
    if weights is not None:
        if str(weights) == "imagenet":
            raise ValueError(
                "InceptionV4 has no built-in ImageNet download; pass the path of a weights file "
                "(train.backbones resolves weights='imagenet' to the file in the Keras cache)"
            )
        if not Path(weights).is_file():
            raise ValueError(f"InceptionV4: weights file {weights} does not exist")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"InceptionV4: pooling must be None, 'avg' or 'max', got {pooling!r}")

    if input_tensor is None:
        inputs = keras.Input(shape=_check_input_shape(input_shape))
    else:
        if input_shape is None:
            input_shape = tuple(input_tensor.shape[1:])
        shape = _check_input_shape(input_shape)
        if keras.backend.is_keras_tensor(input_tensor):
            inputs = input_tensor
        else:
            inputs = keras.Input(tensor=input_tensor, shape=shape)

    x = _stem(inputs)
    for b in TIMM_FEATURE_BLOCKS[6:10]:
        x = _inception_a(x, b)
    x = _reduction_a(x)
    for b in TIMM_FEATURE_BLOCKS[11:18]:
        x = _inception_b(x, b)
    x = _reduction_b(x)
    for b in TIMM_FEATURE_BLOCKS[19:22]:
        x = _inception_c(x, b)

    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)

    model_inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else inputs
    model = keras.Model(model_inputs, x, name=name)
    if weights is not None:
        model.load_weights(str(weights))
    return model
