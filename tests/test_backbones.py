"""Tests of the backbone registry (train/backbones.py) and our Keras InceptionV4 (train/inception_v4.py).

Every test builds models at 75-150 px without a forward pass beyond a single image, and never touches the
network: downloads go through a patched keras.utils.get_file that fails like an offline machine.
"""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest

from train import backbones
from train.backbones import BACKBONES, WeightsError, get_backbone
from train.inception_v4 import TIMM_FEATURE_BLOCKS, InceptionV4, timm_name_to_layer
from train.preprocess import PREPROCESSING

MAIN_BACKBONES = ("inception_resnet_v2", "xception", "inception_v4")

# timm's inception_v4 (the `inception_v4.tf_in1k` model card and results CSVs give 42.68 M): its parameters
# are the 149 conv kernels, the BatchNorm gammas and betas, and last_linear. BatchNorm running mean and
# variance are buffers in PyTorch, not parameters; Keras counts them as non-trainable weights.
TIMM_INCEPTION_V4_PARAMS = 42_679_816
TIMM_CONV_UNITS = 149  # ConvNormAct modules in timm's model (its state dict has 149 x 6 + 2 = 896 tensors)


def _param_count(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


@pytest.fixture(scope="module")
def inception_v4_299() -> keras.Model:
    """InceptionV4 with the 1000-class top at 299 px, built once for the architecture tests (no forward pass)."""
    return InceptionV4(include_top=True, weights=None, input_shape=(299, 299, 3))


@pytest.fixture
def offline_keras_home(tmp_path, monkeypatch) -> dict:
    """An empty KERAS_HOME and a keras.utils.get_file that fails as it does without network; records its calls."""
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    calls: list[tuple[tuple, dict]] = []

    def offline_get_file(*args, **kwargs):
        calls.append((args, kwargs))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline_get_file)
    return {"home": home, "models": home / "models", "calls": calls}


def _no_construction(**kwargs):
    raise AssertionError("the model was built before the weights were known to be available")


# --- the registry --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "feature_shape"),
    [
        # 75 px: Xception's exit flow keeps 3x3 ('same' pooling); the Inception models reduce to 1x1.
        ("inception_resnet_v2", (None, 1, 1, 1536)),
        ("xception", (None, 3, 3, 2048)),
        ("inception_v4", (None, 1, 1, 1536)),
    ],
)
def test_main_backbones_build_at_75px(name, feature_shape):
    backbone = get_backbone(name)
    assert (backbone.input_size, backbone.preprocessing, backbone.min_input_size) == (299, "inception", 75)
    assert backbone.preprocessing in PREPROCESSING
    model = backbone.build(75, weights=None)
    assert model.input_shape == (None, 75, 75, 3)
    assert model.output_shape == feature_shape


@pytest.mark.parametrize(
    ("name", "registry_facts", "size", "feature_shape"),
    [
        # The two other registered backbones, at their smallest sizes: keras.applications' own architectures.
        ("inception_v3", (299, "inception", 75), 75, (None, 1, 1, 2048)),
        ("resnet50", (224, "caffe", 32), 32, (None, 1, 1, 2048)),
        ("resnet50", (224, "caffe", 32), 64, (None, 2, 2, 2048)),  # stride 32 overall
    ],
)
def test_other_backbones_build_small_with_their_registry_facts(name, registry_facts, size, feature_shape):
    backbone = get_backbone(name)
    assert (backbone.input_size, backbone.preprocessing, backbone.min_input_size) == registry_facts
    model = backbone.build(size, weights=None)
    assert model.input_shape == (None, size, size, 3) and model.output_shape == feature_shape
    with pytest.raises(ValueError, match=f"{name}: input size {registry_facts[2] - 1} is below its minimum"):
        backbone.build(registry_facts[2] - 1, weights=None)


def test_inception_v4_backbone_runs_on_an_image():
    model = get_backbone("inception_v4").build(75, weights=None)
    features = model(np.random.default_rng(0).uniform(-1, 1, (1, 75, 75, 3)).astype("float32"), training=False)
    assert features.shape == (1, 1, 1, 1536)
    assert np.isfinite(features.numpy()).all() and (features.numpy() >= 0).all()  # ends in ReLU


def test_get_backbone_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown backbone 'inception_v5'") as info:
        get_backbone("inception_v5")
    for name in BACKBONES:
        assert name in str(info.value)


def test_build_refuses_input_below_minimum():
    with pytest.raises(ValueError, match=r"inception_v4: input size 74 is below its minimum of 75 px"):
        get_backbone("inception_v4").build(74, weights=None)


# --- InceptionV4 architecture ----------------------------------------------------------------------------


def test_inception_v4_parameter_count_equals_timm(inception_v4_299):
    model = inception_v4_299
    trainable = _param_count(model.trainable_weights)
    non_trainable = _param_count(model.non_trainable_weights)
    bn_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    bn_channels = sum(layer.gamma.shape[0] for layer in bn_layers)
    # Like with like: timm's parameters = our trainable weights (kernels, gammas, betas, dense).
    assert trainable == TIMM_INCEPTION_V4_PARAMS
    # The rest is exactly the BatchNorm moving mean and variance, two numbers per BN channel.
    assert non_trainable == 2 * bn_channels
    assert model.count_params() == trainable + non_trainable
    assert len(bn_layers) == TIMM_CONV_UNITS
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in model.layers) == TIMM_CONV_UNITS
    assert all(not layer.use_bias for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert all(layer.epsilon == 1e-3 and layer.scale and layer.center for layer in bn_layers)
    assert model.output_shape == (None, 1000)
    assert model.get_layer("mixed_7d").output.shape == (None, 8, 8, 1536)  # timm's pool_size (8, 8)


@pytest.mark.parametrize(
    ("timm_path", "kernel_shape"),
    [
        # (kh, kw, in, out) from timm's module definitions; our layer names follow timm's paths.
        ("features.0.conv", (3, 3, 3, 32)),  # the stem units are features.0-2 themselves
        ("features.2.conv", (3, 3, 32, 64)),
        ("features.3.conv.conv", (3, 3, 64, 96)),  # Mixed-3a's unit is named `conv`
        ("features.4.branch1.1.conv", (1, 7, 64, 64)),
        ("features.4.branch1.3.conv", (3, 3, 64, 96)),
        ("features.5.conv.conv", (3, 3, 192, 192)),
        ("features.9.branch3.1.conv", (1, 1, 384, 96)),
        ("features.10.branch1.2.conv", (3, 3, 224, 256)),
        ("features.11.branch2.1.conv", (7, 1, 192, 192)),
        ("features.17.branch2.4.conv", (1, 7, 224, 256)),
        ("features.18.branch1.2.conv", (7, 1, 256, 320)),
        ("features.19.branch1_1b.conv", (3, 1, 384, 256)),
        ("features.21.branch2_1.conv", (3, 1, 384, 448)),
        ("features.21.branch2_3a.conv", (1, 3, 512, 256)),
    ],
)
def test_inception_v4_layer_names_follow_timm_paths(inception_v4_299, timm_path, kernel_shape):
    conv = inception_v4_299.get_layer(timm_name_to_layer(timm_path))
    assert tuple(conv.kernel.shape) == kernel_shape
    bn = inception_v4_299.get_layer(timm_name_to_layer(timm_path[: -len("conv")] + "bn"))
    assert bn.gamma.shape == (kernel_shape[-1],)


def test_inception_v4_every_conv_has_its_bn_and_relu(inception_v4_299):
    names = {layer.name for layer in inception_v4_299.layers}
    convs = [n for n in names if isinstance(inception_v4_299.get_layer(n), keras.layers.Conv2D)]
    assert all(n.endswith("_conv") for n in convs)
    for conv in convs:
        unit = conv[: -len("_conv")]
        assert {f"{unit}_bn", f"{unit}_relu"} <= names
    assert timm_name_to_layer("last_linear") == "predictions"
    assert len(TIMM_FEATURE_BLOCKS) == 22  # timm's nn.Sequential `features`
    with pytest.raises(ValueError, match="features.22.conv"):
        timm_name_to_layer("features.22.conv")


def _source_layers(model: keras.Model, concat_name: str) -> list[str]:
    """Names of the layers feeding a Concatenate, in order (via Keras's private `_keras_history`)."""
    inputs = model.get_layer(concat_name).input
    return [t._keras_history.operation.name for t in inputs]


@pytest.mark.parametrize(
    ("block", "branches"),
    [
        # timm's torch.cat order; Mixed-3a puts the pool first, Mixed-5a last.
        ("mixed_3a", ["mixed_3a_maxpool", "mixed_3a_conv_relu"]),
        ("mixed_4a", ["mixed_4a_branch0_1_relu", "mixed_4a_branch1_3_relu"]),
        ("mixed_5a", ["mixed_5a_conv_relu", "mixed_5a_maxpool"]),
        ("mixed_5e", [f"mixed_5e_branch{i}_relu" for i in ("0", "1_1", "2_2", "3_1")]),
        ("mixed_6a", ["mixed_6a_branch0_relu", "mixed_6a_branch1_2_relu", "mixed_6a_branch2_maxpool"]),
        ("mixed_6h", [f"mixed_6h_branch{i}_relu" for i in ("0", "1_2", "2_4", "3_1")]),
        ("mixed_7a", ["mixed_7a_branch0_1_relu", "mixed_7a_branch1_3_relu", "mixed_7a_branch2_maxpool"]),
        ("mixed_7d", ["mixed_7d_branch0_relu", "mixed_7d_branch1", "mixed_7d_branch2", "mixed_7d_branch3_1_relu"]),
        ("mixed_7d_branch1", ["mixed_7d_branch1_1a_relu", "mixed_7d_branch1_1b_relu"]),
        ("mixed_7d_branch2", ["mixed_7d_branch2_3a_relu", "mixed_7d_branch2_3b_relu"]),
    ],
)
def test_inception_v4_concatenation_order_is_timms(inception_v4_299, block, branches):
    assert _source_layers(inception_v4_299, block) == branches


@pytest.mark.parametrize(("size", "side"), [(76, 1), (99, 1), (150, 3)])
def test_inception_v4_builds_at_odd_sizes(size, side):
    model = InceptionV4(include_top=False, input_shape=(size, size, 3))
    assert model.output_shape == (None, side, side, 1536)


def test_inception_v4_refuses_small_or_wrong_inputs():
    with pytest.raises(ValueError, match="at least 75 px"):
        InceptionV4(include_top=False, input_shape=(74, 80, 3))
    with pytest.raises(ValueError, match=r"\(height, width, 3\)"):
        InceptionV4(include_top=False, input_shape=(80, 80, 1))
    with pytest.raises(ValueError, match="train.backbones resolves"):
        InceptionV4(weights="imagenet")


def test_inception_v4_pooling_classes_and_input_tensor():
    image = keras.Input((80, 90, 3))
    pooled = InceptionV4(include_top=False, input_tensor=image, pooling="avg")
    assert pooled.inputs[0] is image and pooled.output_shape == (None, 1536)
    top = InceptionV4(input_shape=(75, 75, 3), classes=7, classifier_activation="sigmoid")
    assert top.output_shape == (None, 7) and top.get_layer("predictions").activation is keras.activations.sigmoid


def test_same_average_pooling_excludes_padding_like_count_include_pad_false():
    """timm's AvgPool2d(3, 1, padding=1, count_include_pad=False) == keras AveragePooling2D(3, 1, 'same')."""
    x = np.random.default_rng(0).uniform(0.5, 2.0, (2, 7, 6, 3)).astype("float32")
    keras_out = keras.ops.convert_to_numpy(keras.layers.AveragePooling2D(3, strides=1, padding="same")(x))
    exclude = np.zeros_like(x)
    include = np.zeros_like(x)
    height, width = x.shape[1:3]
    for i in range(height):
        for j in range(width):
            window = x[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, :]
            exclude[:, i, j] = window.mean(axis=(1, 2))  # only in-image pixels counted
            include[:, i, j] = window.sum(axis=(1, 2)) / 9.0  # zero padding counted
    np.testing.assert_allclose(keras_out, exclude, rtol=1e-6)
    # The two conventions differ on every border pixel, so the check above can tell them apart.
    assert np.abs(keras_out[:, 0, 0] - include[:, 0, 0]).min() > 0.1


# --- weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inception_resnet_v2", "xception"])
def test_imagenet_offline_fails_at_once_naming_file(name, offline_keras_home):
    backbone = dataclasses.replace(get_backbone(name), constructor=_no_construction)
    with pytest.raises(WeightsError) as info:
        backbone.build(75, weights="imagenet")
    message = str(info.value)
    assert backbone.weights_file in message
    assert "--weights PATH" in message and "--weights none" in message
    assert "URLError" in message
    # One download attempt, into the KERAS_HOME cache we were given (Keras alone reads KERAS_HOME at import).
    [(args, kwargs)] = offline_keras_home["calls"]
    assert args[0] == backbone.weights_file
    assert Path(kwargs["cache_dir"]) / kwargs["cache_subdir"] == offline_keras_home["models"]


def test_inception_v4_imagenet_with_empty_cache_fails_without_download(offline_keras_home):
    backbone = dataclasses.replace(get_backbone("inception_v4"), constructor=_no_construction)
    with pytest.raises(WeightsError) as info:
        backbone.build(75, weights="imagenet")
    message = str(info.value)
    assert "inception_v4_tf_in1k_notop.weights.h5" in message
    assert str(offline_keras_home["models"]) in message
    assert "--weights PATH" in message and "--weights none" in message
    assert offline_keras_home["calls"] == []


def test_inception_v4_imagenet_loads_from_cache_without_download(offline_keras_home):
    backbone = get_backbone("inception_v4")
    source = backbone.build(75, weights=None)
    offline_keras_home["models"].mkdir()
    source.save_weights(str(offline_keras_home["models"] / backbone.weights_file))
    loaded = backbone.build(80, weights="imagenet")
    assert offline_keras_home["calls"] == []
    _assert_same_weights(source, loaded)


def test_keras_applications_legacy_h5_loads_from_cache_without_download(offline_keras_home):
    """The cached files keras.applications downloads are legacy HDF5 weights; a pre-seeded one must load."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format  # only way to write the legacy layout in Keras 3

    backbone = get_backbone("xception")
    source = backbone.build(75, weights=None)
    offline_keras_home["models"].mkdir()
    with h5py.File(offline_keras_home["models"] / backbone.weights_file, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    loaded = backbone.build(90, weights="imagenet")
    assert offline_keras_home["calls"] == []
    _assert_same_weights(source, loaded)


def test_weights_path_round_trip(tmp_path):
    backbone = get_backbone("inception_v4")
    source = backbone.build(75, weights=None)
    path = tmp_path / "iv4.weights.h5"
    source.save_weights(str(path))
    loaded = backbone.build(99, weights=str(path))
    _assert_same_weights(source, loaded)
    fresh = backbone.build(75, weights=None)  # a different random initialisation: the load did something
    kernel = "stem1_conv"
    assert not np.array_equal(source.get_layer(kernel).kernel.numpy(), fresh.get_layer(kernel).kernel.numpy())


def test_weights_of_another_backbone_are_refused_naming_file(tmp_path):
    path = tmp_path / "xception.weights.h5"
    get_backbone("xception").build(75, weights=None).save_weights(str(path))
    with pytest.raises(WeightsError) as info:
        get_backbone("inception_v4").build(75, weights=str(path))
    message = str(info.value)
    assert str(path) in message and "inception_v4" in message and "--weights none" in message
    assert "\n" not in message and len(message) < 800  # the cause's first line, not Keras's tensor dump


def test_unreadable_or_missing_weights_file_refused_naming_file(tmp_path):
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not an HDF5 file")
    with pytest.raises(WeightsError, match=str(junk)):
        get_backbone("xception").build(75, weights=str(junk))
    missing = tmp_path / "missing.weights.h5"
    backbone = dataclasses.replace(get_backbone("xception"), constructor=_no_construction)
    with pytest.raises(WeightsError, match=f"{missing} does not exist"):
        backbone.build(75, weights=str(missing))


def test_keras_cache_dir_follows_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert backbones.keras_cache_dir() == tmp_path / "models"


def _assert_same_weights(a: keras.Model, b: keras.Model) -> None:
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb) > 0
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_array_equal(x, y)
