"""Tests of train/weights.py: timm's inception_v4 checkpoint converted to our Keras InceptionV4, offline weights.

The decisive test builds timm's `inception_v4` with random weights and random batch-norm statistics, converts
its state dict with the function `python -m train.weights convert` calls, and checks that our Keras model
gives timm's logits at 299 px and at 107x91 px. timm, torch and safetensors come from requirements-test.txt:
a missing one fails this file, it does not skip it. timm runs in a child process (tests/timm_reference.py),
as torch's CUDA wheel imports triton, which crashes a process that has loaded TensorFlow. No network.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import safetensors.numpy

from train import inception_v4 as iv4
from train.backbones import WeightsError, get_backbone
from train.inception_v4 import InceptionV4, timm_name_to_layer
from train.weights import (
    TIMM_BN_EPSILON,
    CheckpointError,
    ConvertConfig,
    convert,
    main,
    read_state_dict,
    timm_module_path,
    timm_state_dict_spec,
)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max |keras - timm| over max |timm|, the "1e-4 relative"
NOTOP_FILE = "inception_v4_tf_in1k_notop.weights.h5"
SIZES = ("299", "107x91")  # the image sizes tests/timm_reference.py uses (a rectangle too: padding per axis)


@dataclasses.dataclass(frozen=True)
class TimmReference:
    """timm's inception_v4 with random weights: its state dict, the files holding it, and its outputs."""

    state: dict[str, np.ndarray]  # timm's layout, num_batches_tracked included
    safetensors: Path
    pth: Path
    images: dict[str, np.ndarray]  # NCHW float32, keyed like SIZES
    logits: dict[str, np.ndarray]
    features_299: np.ndarray  # forward_features at 299 px, NCHW (2, 1536, 8, 8)
    bn_epsilons: frozenset[float]


@pytest.fixture(scope="module")
def timm_ref(tmp_path_factory) -> TimmReference:
    """tests/timm_reference.py run in its own process (torch's triton and TensorFlow crash in one process)."""
    folder = tmp_path_factory.mktemp("timm")
    done = subprocess.run(
        [sys.executable, "-m", "tests.timm_reference", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"tests/timm_reference.py failed (is requirements-test.txt installed?):\n{done.stderr}"
    ref = np.load(folder / "reference.npz")
    assert sorted(k for k in ref.files if k.startswith("images_")) == sorted(f"images_{k}" for k in SIZES)
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    return TimmReference(
        state={str(k): tensors[str(k)] for k in ref["state_keys"]},  # in timm's order
        safetensors=folder / "model.safetensors",
        pth=folder / "inception_v4.pth",
        images={k: ref[f"images_{k}"] for k in SIZES},
        logits={k: ref[f"logits_{k}"] for k in SIZES},
        features_299=ref["features_299"],
        bn_epsilons=frozenset(float(e) for e in ref["bn_epsilons"]),
    )


@pytest.fixture(scope="module")
def converted(timm_ref, tmp_path_factory) -> dict[str, Path]:
    """timm's safetensors converted with and without the top, as `python -m train.weights convert` does."""
    folder = tmp_path_factory.mktemp("converted")
    top = convert(
        ConvertConfig(
            source="timm", checkpoint=timm_ref.safetensors, out=folder / "iv4_top.weights.h5", include_top=True
        )
    )
    notop = convert(ConvertConfig(source="timm", checkpoint=timm_ref.safetensors, out=folder / NOTOP_FILE))
    assert (top.include_top, top.classes, top.tensors) == (True, 1000, 747)  # 149 x 5 + 2, counters aside
    assert (notop.include_top, notop.classes, notop.tensors) == (False, None, 745)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["iv4_top.weights.h5", NOTOP_FILE])  # no temp files
    return {"top": top.path, "notop": notop.path}


@pytest.fixture
def offline_keras_home(tmp_path, monkeypatch) -> dict:
    """An empty KERAS_HOME and a keras.utils.get_file that fails as it does without network; records calls."""
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    calls: list = []

    def offline_get_file(*args, **kwargs):
        calls.append((args, kwargs))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline_get_file)
    return {"home": home, "models": home / "models", "calls": calls}


def _relative_error(actual: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |actual - reference| / max |reference|, max |actual - reference|)."""
    diff = float(np.abs(actual - reference).max())
    return diff / float(np.abs(reference).max()), diff


# --- the architecture and its tensors ------------------------------------------------------------------------


def test_spec_is_timms_state_dict_in_order(timm_ref):
    """Every tensor of timm's state dict, key, shape and order, is one our model expects, and vice versa."""
    timm_tensors = [(k, v.shape) for k, v in timm_ref.state.items() if not k.endswith(".num_batches_tracked")]
    assert timm_state_dict_spec(include_top=True) == timm_tensors
    assert len(timm_tensors) == 747
    # The BN epsilon is no tensor: timm's tf-ported inception_v4 uses 0.001 everywhere, so do we.
    assert timm_ref.bn_epsilons == {TIMM_BN_EPSILON} == {iv4.BN_EPSILON}


def test_timm_module_path_inverts_timm_name_to_layer(timm_ref):
    modules = {k.rsplit(".", 1)[0] for k in timm_ref.state}
    assert len(modules) == 2 * 149 + 1
    for module in modules:
        assert timm_module_path(timm_name_to_layer(module)) == module
    with pytest.raises(ValueError, match="mixed_5b_branch3_0_avgpool"):
        timm_module_path("mixed_5b_branch3_0_avgpool")


# --- the decisive test: same logits as timm -----------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_with_top(converted) -> keras.Model:
    return InceptionV4(
        include_top=True, weights=converted["top"], input_shape=(None, None, 3), classifier_activation=None
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_converted_model_gives_timms_logits(timm_ref, keras_with_top, size):
    reference = timm_ref.logits[size]
    # The test can fail: the logits depend on the image (collapsed activations would make any model agree).
    assert np.abs(reference[0] - reference[1]).max() > 0.05 * np.abs(reference).max()
    images = timm_ref.images[size].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    logits = keras.ops.convert_to_numpy(keras_with_top(images, training=False))
    relative, absolute = _relative_error(logits, reference)
    print(f"{size}: max abs {absolute:.3g}, max rel {relative:.3g}, max |timm| {np.abs(reference).max():.4g}")
    assert relative < TOLERANCE
    assert (logits.argmax(axis=1) == reference.argmax(axis=1)).all()


def test_imagenet_from_keras_cache_gives_timms_features_offline(timm_ref, offline_keras_home, capsys):
    """Converted by the CLI straight into an empty KERAS_HOME; `--weights imagenet` then loads it, no network."""
    target = offline_keras_home["models"] / NOTOP_FILE  # models/ does not exist yet: convert makes it
    assert main(["convert", "--from", "timm", str(timm_ref.safetensors), "--to", str(target)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, 745 tensors, without the top)"
    )
    backbone = get_backbone("inception_v4").build(299, weights="imagenet")
    assert offline_keras_home["calls"] == []
    features = keras.ops.convert_to_numpy(backbone(timm_ref.images["299"].transpose(0, 2, 3, 1), training=False))
    relative, absolute = _relative_error(features, timm_ref.features_299.transpose(0, 2, 3, 1))
    print(f"features 299: max abs {absolute:.3g}, max rel {relative:.3g}")
    assert relative < TOLERANCE


# --- round trip: the files hold exactly timm's tensors ----------------------------------------------------


def _keras_variable(model: keras.Model, key: str) -> np.ndarray:
    """The Keras variable a timm key lands in, back in timm's layout (mapping via train.inception_v4 only)."""
    module, param = key.rsplit(".", 1)
    layer = model.get_layer(timm_name_to_layer(module))
    attr = {
        "weight": "kernel" if not isinstance(layer, keras.layers.BatchNormalization) else "gamma",
        "bias": "bias" if not isinstance(layer, keras.layers.BatchNormalization) else "beta",
        "running_mean": "moving_mean",
        "running_var": "moving_variance",
    }[param]
    value = keras.ops.convert_to_numpy(getattr(layer, attr))
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T  # HWIO -> OIHW, (in, out) -> (out, in)


def test_round_trip_notop_into_backbone_and_top_into_full_model(timm_ref, converted):
    backbone = get_backbone("inception_v4").build(99, weights=str(converted["notop"]))
    full = InceptionV4(include_top=True, weights=converted["top"], input_shape=(75, 75, 3))
    checked = 0
    for key, array in timm_ref.state.items():
        if key.endswith(".num_batches_tracked"):
            continue
        np.testing.assert_array_equal(_keras_variable(full, key), array, err_msg=key)
        if not key.startswith("last_linear"):
            np.testing.assert_array_equal(_keras_variable(backbone, key), array, err_msg=key)
        checked += 1
    assert checked == 747
    assert "predictions" not in {layer.name for layer in backbone.layers}
    # A no-top file has no classifier for a model with the top: Keras refuses it, naming the layer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns about the container it skipped before it raises
        with pytest.raises(ValueError, match="predictions"):
            InceptionV4(include_top=True, weights=converted["notop"], input_shape=(75, 75, 3))


def _h5_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_pth_state_dict_converts_like_safetensors(timm_ref, converted, tmp_path, capsys):
    out = tmp_path / "from_pth.weights.h5"
    assert main(["convert", "--from", "timm", str(timm_ref.pth), "--to", str(out), "--include-top"]) == 0
    assert "747 tensors, with the top (1000 classes)" in capsys.readouterr().out
    ours, reference = _h5_arrays(out), _h5_arrays(converted["top"])
    assert ours.keys() == reference.keys() and len(ours) == 747
    for name, array in reference.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)


def test_fine_tuned_checkpoint_keeps_its_classifier_width(timm_ref, tmp_path):
    state = dict(timm_ref.state)
    rng = np.random.default_rng(3)
    state["last_linear.weight"] = rng.standard_normal((11, 1536)).astype(np.float32)
    state["last_linear.bias"] = rng.standard_normal(11).astype(np.float32)
    checkpoint = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(checkpoint))
    result = convert(
        ConvertConfig(source="timm", checkpoint=checkpoint, out=tmp_path / "eleven.weights.h5", include_top=True)
    )
    assert (result.classes, result.tensors) == (11, 747)
    dense = {name: array for name, array in _h5_arrays(result.path).items() if name.startswith("layers/dense/")}
    assert len(dense) == 2  # the classifier is the model's only Dense layer: kernel and bias
    np.testing.assert_array_equal(dense["layers/dense/vars/0"], state["last_linear.weight"].T)
    np.testing.assert_array_equal(dense["layers/dense/vars/1"], state["last_linear.bias"])


# --- refused checkpoints --------------------------------------------------------------------------------------


def _drop(*keys):
    def edit(state):
        for key in keys:
            del state[key]

    return edit


def _set(key, make):
    def edit(state):
        state[key] = make(state)

    return edit


MISMATCHES = {
    "missing": (
        _drop("features.6.branch1.1.bn.running_var"),
        False,
        "tensor 'features.6.branch1.1.bn.running_var' is missing "
        "(expected shape (96,), Keras layer mixed_5b_branch1_1_bn)",
    ),
    "first of two missing": (
        # features.20 comes later in the architecture than features.3: only the first is named.
        _drop("features.20.branch0.conv.weight", "features.3.conv.bn.weight"),
        False,
        "tensor 'features.3.conv.bn.weight' is missing",
    ),
    "1x7 kernel stored as 7x1": (
        _set("features.11.branch1.1.conv.weight", lambda s: s["features.11.branch1.1.conv.weight"].swapaxes(2, 3)),
        False,
        "tensor 'features.11.branch1.1.conv.weight' has shape (224, 192, 7, 1), expected (224, 192, 1, 7)",
    ),
    "one input channel": (
        _set("features.0.conv.weight", lambda s: s["features.0.conv.weight"][:, :1].copy()),
        False,
        "tensor 'features.0.conv.weight' has shape (32, 1, 3, 3), expected (32, 3, 3, 3) (Keras layer stem1_conv); "
        "it is for 1 input channels, our InceptionV4 takes 3",
    ),
    "extra tensor": (
        _set("features.22.conv.weight", lambda s: np.zeros((8, 1536, 1, 1), np.float32)),
        False,
        "unexpected tensor 'features.22.conv.weight' (shape (8, 1536, 1, 1))",
    ),
    "no classifier for --include-top": (
        _drop("last_linear.weight", "last_linear.bias"),
        True,
        "tensor 'last_linear.weight' is missing (expected shape (1000, 1536), Keras layer predictions); "
        "convert without --include-top",
    ),
    "classifier of another width": (
        _set("last_linear.weight", lambda s: np.zeros((1000, 2048), np.float32)),
        True,
        "tensor 'last_linear.weight' has shape (1000, 2048), expected (1000, 1536)",
    ),
    "integer tensor": (
        _set("features.1.bn.running_mean", lambda s: np.zeros(32, np.int64)),
        False,
        "tensor 'features.1.bn.running_mean' has dtype int64, expected floating point",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatching_checkpoint_refused_naming_first_tensor(timm_ref, tmp_path, case):
    edit, include_top, expected = MISMATCHES[case]
    state = dict(timm_ref.state)
    edit(state)
    checkpoint = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(checkpoint))
    out = tmp_path / "out" / NOTOP_FILE
    out.parent.mkdir()
    out.write_bytes(b"the previous file")
    with pytest.raises(CheckpointError) as info:
        convert(ConvertConfig(source="timm", checkpoint=checkpoint, out=out, include_top=include_top))
    message = str(info.value)
    assert f"checkpoint {checkpoint} does not fit timm's inception_v4: {expected}" in message
    if case == "first of two missing":
        assert "features.20" not in message
    assert out.read_bytes() == b"the previous file"  # refused before anything is written
    assert [p.name for p in out.parent.iterdir()] == [NOTOP_FILE]


def test_cli_refusal_exits_2_with_the_message(timm_ref, tmp_path, capsys):
    state = dict(timm_ref.state)
    del state["features.21.branch2_3b.bn.bias"]  # an Inception-C attribute name, underscore kept
    checkpoint = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(checkpoint))
    assert main(["convert", "--from", "timm", str(checkpoint), "--to", str(tmp_path / "x.weights.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and "'features.21.branch2_3b.bn.bias' is missing" in err
    assert not (tmp_path / "x.weights.h5").exists()


def test_unreadable_checkpoints_and_bad_output_names(tmp_path, monkeypatch, timm_ref):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope.safetensors'} does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=f"checkpoint {junk} is not a readable safetensors file"):
        read_state_dict(junk)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown format '\.onnx'"):
        read_state_dict(other)
    with pytest.raises(CheckpointError, match=r"must end in \.weights\.h5"):
        convert(ConvertConfig(source="timm", checkpoint=timm_ref.safetensors, out=tmp_path / "iv4.h5"))
    with pytest.raises(CheckpointError, match="unknown checkpoint source 'keras_hub'"):
        convert(ConvertConfig(source="keras_hub", checkpoint=timm_ref.safetensors, out=tmp_path / "iv4.weights.h5"))
    # Without torch a .pth cannot be read; the message points to the safetensors file instead.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(timm_ref.pth)
    assert "needs torch, which is not installed; convert timm's model.safetensors instead" in str(info.value)


# --- offline use and the Keras cache ---------------------------------------------------------------------------


def test_inception_v4_imagenet_offline_says_how_to_convert(offline_keras_home):
    with pytest.raises(WeightsError) as info:
        get_backbone("inception_v4").build(75, weights="imagenet")
    message = str(info.value)
    expected_path = offline_keras_home["models"] / NOTOP_FILE
    cache = offline_keras_home["models"]
    assert f"inception_v4: ImageNet weights {NOTOP_FILE} are not in the Keras cache ({cache})" in message
    assert "timm's inception_v4.tf_in1k checkpoint" in message
    assert "model.safetensors from the Hugging Face Hub repository timm/inception_v4.tf_in1k" in message
    assert f"`python -m train.weights convert --from timm model.safetensors --to {expected_path}`" in message
    assert "--weights PATH or --weights none" in message
    assert offline_keras_home["calls"] == []


def test_list_shows_each_backbones_cache_file(converted, offline_keras_home, capsys):
    models = offline_keras_home["models"]
    models.mkdir()
    os.link(converted["notop"], models / NOTOP_FILE)
    xception = get_backbone("xception").weights_file
    (models / xception).write_bytes(b"<html>captive portal</html>")  # a download gone wrong
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    size = f"{(models / NOTOP_FILE).stat().st_size / 1e6:.1f} MB"
    assert lines[0] == f"Keras cache: {models}"
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in lines[2:11]}
    modern = ("efficientnetv2_s", "efficientnetv2_b0", "convnext_tiny", "convnext_small")
    assert rows == {
        "inception_resnet_v2": [get_backbone("inception_resnet_v2").weights_file, "missing   -"],
        "xception": [xception, "not HDF5  0.0 MB"],
        "inception_v4": [NOTOP_FILE, f"present   {size}"],
        "inception_v3": [get_backbone("inception_v3").weights_file, "missing   -"],
        "resnet50": [get_backbone("resnet50").weights_file, "missing   -"],
        **{name: [get_backbone(name).weights_file, "missing   -"] for name in modern},
    }
    assert lines[11:13] == ["", "To get the files that are not present:"]
    howto = lines[13:]
    assert howto[0] == f"  inception_resnet_v2: download {get_backbone('inception_resnet_v2').weights_url}"
    assert howto[1] == f"  xception: download {get_backbone('xception').weights_url}"
    assert len(howto) == 8 and not any("inception_v4" in line for line in howto)
    # The modern backbones' Keras files, as keras.applications 3.15 names and downloads them.
    keras_weights = "https://storage.googleapis.com/tensorflow/keras-applications/"
    assert howto[4:] == [
        f"  efficientnetv2_s: download {keras_weights}efficientnet_v2/efficientnetv2-s_notop.h5",
        f"  efficientnetv2_b0: download {keras_weights}efficientnet_v2/efficientnetv2-b0_notop.h5",
        f"  convnext_tiny: download {keras_weights}convnext/convnext_tiny_notop.h5",
        f"  convnext_small: download {keras_weights}convnext/convnext_small_notop.h5",
    ]


def test_list_cli_on_an_empty_cache(tmp_path):
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "train.weights", "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count(" missing ") == 9
    assert (
        f"  inception_v4: Make them from timm's inception_v4.tf_in1k checkpoint: on a machine with network, download "
        f"model.safetensors from the Hugging Face Hub repository timm/inception_v4.tf_in1k, then run "
        f"`python -m train.weights convert --from timm model.safetensors --to {tmp_path / 'models' / NOTOP_FILE}`."
    ) in out.splitlines()


# --- --weights PATH with keras.applications files for the wrong input channels -----------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["weights.h5", "legacy notop h5"])
def test_keras_applications_file_for_one_channel_refused(tmp_path, legacy):
    one_channel = keras.applications.Xception(include_top=False, weights=None, input_shape=(75, 75, 1))
    path = tmp_path / ("xception_1ch_notop.h5" if legacy else "xception_1ch.weights.h5")
    if legacy:
        from keras.src.legacy.saving import legacy_h5_format  # the layout keras.applications downloads

        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, one_channel)
    else:
        one_channel.save_weights(str(path))
    with pytest.raises(WeightsError) as info:
        get_backbone("xception").build(75, weights=str(path))
    message = str(info.value)
    assert f"xception: weights file {path} does not fit this backbone" in message
    assert "with 3 input channels" in message and "\n" not in message

