"""The training losses (train/losses.py, `--loss bce|focal|asl`): each against a NumPy reference on hand-made values,
the asymmetric loss's margin clipping and gradients, mixed precision, safe-mode reload, the settings' checks and
what the RUN_DIR records."""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from train import rundir
from train.__main__ import parse_args
from train.config import ConfigError
from train.losses import AsymmetricLoss, training_loss, validation_loss
from train.metrics import binary_crossentropy
from train.run_state import run_dir_state

EPS = 1e-7  # Keras's epsilon: the probability clip of its BCE, and of ours

# Hand-made labels and probabilities: positives easy and hard, negatives below the 0.05 margin (p_m clips to 0),
# at it, just above it and far above it, and the clip edges 0 and 1.
Y = np.array([[1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 0, 0]], np.float32)
P = np.array([[0.8, 0.01, 0.03, 0.55], [0.2, 0.05, 0.06, 0.999], [0.9, 0.0, 0.5, 0.3], [1.0, 0.04, 0.7, 0.049]],
             np.float32)


def asl_reference(y, p, gamma_pos, gamma_neg, clip) -> float:
    """Ridnik et al. (ICCV 2021), eq. 1-5 with the probability margin, in float64; mean over every label."""
    y, p = np.asarray(y, np.float64), np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    p_m = np.maximum(p - clip, 0.0)
    positive = (1 - p) ** gamma_pos * np.log(p)
    negative = p_m**gamma_neg * np.log(1 - p_m)
    return float(np.mean(-y * positive - (1 - y) * negative))


def focal_reference(y, p, gamma) -> float:
    """Lin et al.'s focal loss without class balancing (Keras's BinaryFocalCrossentropy default)."""
    y, p = np.asarray(y, np.float64), np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    p_t = y * p + (1 - y) * (1 - p)
    return float(np.mean(-((1 - p_t) ** gamma) * np.log(p_t)))


def _value(loss, y, p) -> float:
    return float(keras.ops.convert_to_numpy(loss(y, p)))


# --- against NumPy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gamma_pos", "gamma_neg", "clip"), [(0, 4, 0.05), (1, 2, 0.2), (0, 0, 0.05), (2, 3, 0.0)])
def test_asymmetric_loss_equals_the_numpy_reference(gamma_pos, gamma_neg, clip):
    loss = AsymmetricLoss(gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    assert _value(loss, Y, P) == pytest.approx(asl_reference(Y, P, gamma_pos, gamma_neg, clip), rel=1e-5, abs=1e-7)


def test_asymmetric_loss_by_hand_the_margin_clips_easy_negatives_to_zero():
    loss = AsymmetricLoss()  # the paper's defaults: gamma+ 0, gamma- 4, m 0.05
    assert (loss.gamma_pos, loss.gamma_neg, loss.clip) == (0.0, 4.0, 0.05)
    one = lambda y, p: _value(loss, np.array([[y]], np.float32), np.array([[p]], np.float32))  # noqa: E731
    for p in (0.0, 0.01, 0.03, 0.049, 0.05):  # p <= m: the shifted probability is 0, so is the loss
        assert one(0, p) == 0.0
    assert one(0, 0.55) == pytest.approx(-(0.5**4) * np.log(0.5), rel=1e-5)  # p_m = 0.5: 0.0625 * ln 2
    assert one(1, 0.8) == pytest.approx(-np.log(0.8), rel=1e-6)  # gamma+ = 0: a positive costs its BCE
    assert one(1, 0.0) == pytest.approx(-np.log(EPS), rel=1e-5)  # clipped like Keras's BCE, finite


def test_asymmetric_loss_without_focusing_or_margin_is_keras_bce():
    plain = AsymmetricLoss(gamma_pos=0, gamma_neg=0, clip=0)
    assert _value(plain, Y, P) == pytest.approx(_value(keras.losses.BinaryCrossentropy(), Y, P), rel=1e-6)
    assert _value(plain, Y, P) == pytest.approx(binary_crossentropy(Y, P), rel=1e-5)


@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
def test_focal_loss_is_keras_binary_focal_crossentropy_and_equals_the_numpy_reference(gamma):
    loss = training_loss("focal", focal_gamma=gamma)
    assert isinstance(loss, keras.losses.BinaryFocalCrossentropy) and loss.get_config()["gamma"] == gamma
    assert not loss.get_config()["apply_class_balancing"]
    assert _value(loss, Y, P) == pytest.approx(focal_reference(Y, P, gamma), rel=1e-5, abs=1e-7)


def test_bce_is_keras_binary_crossentropy():
    loss = training_loss("bce")
    assert type(loss) is keras.losses.BinaryCrossentropy
    assert _value(loss, Y, P) == pytest.approx(binary_crossentropy(Y, P), rel=1e-5)


def test_asymmetric_loss_gradients_are_finite_and_zero_for_negatives_under_the_margin():
    for gamma_neg in (4.0, 0.0):  # gamma 0: no 0^0 power enters the gradient
        p = tf.Variable(P)
        with tf.GradientTape() as tape:
            value = AsymmetricLoss(gamma_pos=0.0, gamma_neg=gamma_neg)(Y, p)
        grad = tape.gradient(value, p).numpy()
        assert np.isfinite(grad).all()
        easy = (Y == 0) & (P <= 0.05)
        assert easy.sum() == 5 and (grad[easy] == 0).all()
        assert (grad[(Y == 0) & (P > 0.05)] > 0).all() and (grad[(Y == 1) & (P < 1)] < 0).all()


# --- mixed precision, serialisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bce", "focal", "asl"])
def test_under_mixed_precision_float16_inputs_give_the_float32_result(name):
    p16 = P.astype(np.float16)
    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        loss = training_loss(name)
        value = loss(tf.constant(Y, tf.float16), tf.constant(p16))
        direct = loss.call(tf.constant(Y, tf.float16), tf.constant(p16)) if name == "asl" else None
    finally:
        keras.mixed_precision.set_global_policy(previous)
    reference = _value(training_loss(name), Y, p16.astype(np.float32))  # the same (float16-rounded) numbers
    assert value.dtype == tf.float32 and float(value) == pytest.approx(reference, rel=1e-6)
    if direct is not None:  # called on float16 without Keras's cast, the loss still computes in float32
        assert direct.dtype == tf.float32
        assert float(tf.reduce_mean(direct)) == pytest.approx(reference, rel=1e-6)
    assert float(value) == pytest.approx(_value(training_loss(name), Y, P), rel=2e-3)  # float16 rounding only


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # the unbuilt optimizer: not tested
def test_asymmetric_loss_is_registered_and_reloads_in_safe_mode(tmp_path):
    loss = AsymmetricLoss(gamma_pos=1.0, gamma_neg=3.0, clip=0.1)
    config = keras.saving.serialize_keras_object(loss)
    assert config["registered_name"] == "fashion_tagger>AsymmetricLoss"
    again = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert isinstance(again, AsymmetricLoss) and again.get_config() == loss.get_config()
    # A compiled model carrying the loss saves and loads in safe mode with the loss's settings.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="sigmoid")(inputs))
    model.compile(optimizer="adam", loss=loss)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert isinstance(loaded.loss, AsymmetricLoss)
    assert (loaded.loss.gamma_pos, loaded.loss.gamma_neg, loaded.loss.clip) == (1.0, 3.0, 0.1)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    assert loaded.evaluate(x, Y, verbose=0) == pytest.approx(model.evaluate(x, Y, verbose=0), rel=1e-6)


def test_validation_loss_is_the_loss_trained_on():
    assert validation_loss("bce") is binary_crossentropy  # the NumPy BCE history.csv always had
    assert validation_loss("asl")(Y, P) == pytest.approx(asl_reference(Y, P, 0, 4, 0.05), rel=1e-5)
    assert validation_loss("asl", asl_clip=0.2)(Y, P) == pytest.approx(asl_reference(Y, P, 0, 4, 0.2), rel=1e-5)
    assert validation_loss("focal", focal_gamma=1.0)(Y, P) == pytest.approx(focal_reference(Y, P, 1.0), rel=1e-5)


# --- settings and the RUN_DIR ----------------------------------------------------------------------------------


def _args(tmp_path, *flags: str):
    return parse_args([str(tmp_path), "--backbone", "xception", "--out", str(tmp_path / "r"), *flags])


def test_loss_flags_defaults_and_checks(tmp_path):
    config = _args(tmp_path)
    assert (config.loss, config.focal_gamma, config.asl_gamma_pos, config.asl_gamma_neg, config.asl_clip) == (
        "bce", 2.0, 0.0, 4.0, 0.05)
    asl = _args(tmp_path, "--loss", "asl", "--asl-gamma-pos", "1", "--asl-gamma-neg", "2", "--asl-clip", "0")
    assert (asl.loss, asl.asl_gamma_pos, asl.asl_gamma_neg, asl.asl_clip) == ("asl", 1.0, 2.0, 0.0)
    assert asl.resolve().to_json()["asl_clip"] == 0.0
    refused = {
        ("--loss", "focal", "--head", "rnn"): "--loss focal applies to the sigmoid head; the rnn head trains on its "
                                              "own sequence loss",
        ("--loss", "asl", "--head", "rnn"): "--loss asl applies to the sigmoid head",
        ("--focal-gamma", "3"): r"--focal-gamma applies to --loss focal only \(this run has --loss bce\)",
        ("--loss", "focal", "--asl-clip", "0.1"): "--asl-clip applies to --loss asl only",
        ("--loss", "asl", "--asl-clip", "1"): r"--asl-clip must be in \[0, 1\), got 1.0",
        ("--loss", "asl", "--asl-gamma-neg", "-1"): "--asl-gamma-neg must be non-negative, got -1.0",
        ("--loss", "focal", "--focal-gamma", "-0.5"): "--focal-gamma must be non-negative, got -0.5",
    }
    for flags, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            _args(tmp_path, *flags).resolve()
    with pytest.raises(SystemExit):
        _args(tmp_path, "--loss", "hinge")


def test_the_loss_is_recorded_an_old_run_dir_reads_as_bce_and_another_loss_is_refused(tmp_path):
    old = {"backbone": {"name": "xception", "input_size": 299, "preprocessing": "inception", "min_input_size": 75},
           "image_size": 75, "classes": ["a", "b"], "train": {"lr": 0.001, "head": "sigmoid"}, "versions": {},
           "manifest_sha256": "0" * 64, "val_manifest_sha256": None, "class_prevalence": [0.5, 0.5], "n_train": 2,
           "n_val": 1, "runtime": {"replicas": 1, "mixed_precision": False}}
    (tmp_path / "config.json").write_text(json.dumps(old))  # written before --loss existed
    (tmp_path / "history.csv").write_text("epoch\n1\n")
    record = rundir.read_config(tmp_path)
    now = _args(tmp_path).resolve().to_json()
    loss_keys = {k: now[k] for k in ("loss", "focal_gamma", "asl_gamma_pos", "asl_gamma_neg", "asl_clip")}
    assert loss_keys == {"loss": "bce", "focal_gamma": 2.0, "asl_gamma_pos": 0.0, "asl_gamma_neg": 4.0,
                         "asl_clip": 0.05}
    new_train = {**old["train"], **loss_keys}
    assert run_dir_state(tmp_path, dataclasses.replace(record, train=new_train)) == "resume"
    with pytest.raises(rundir.RunDirError, match="loss: 'bce' -> 'asl'"):
        run_dir_state(tmp_path, dataclasses.replace(record, train={**new_train, "loss": "asl"}))
    rundir.write_config(tmp_path, dataclasses.replace(record, train={**new_train, "loss": "asl"}))
    with pytest.raises(rundir.RunDirError, match=r"asl_clip: 0.05 -> 0.1"):
        run_dir_state(tmp_path, dataclasses.replace(record, train={**new_train, "loss": "asl", "asl_clip": 0.1}))


# --- a run -------------------------------------------------------------------------------------------------------


def _tiny_cnn(include_top=False, weights=None, input_shape=None):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 1, activation="relu", name="colours")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(x),
                       name="tiny_loss_cnn")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Your input ran out of data")
@pytest.mark.parametrize(("flags", "reference"), [
    (("--loss", "asl", "--asl-gamma-neg", "2", "--asl-clip", "0.1"), lambda y, p: asl_reference(y, p, 0, 2, 0.1)),
    (("--loss", "focal", "--focal-gamma", "1.5"), lambda y, p: focal_reference(y, p, 1.5)),
])
def test_a_run_records_its_loss_and_val_loss_is_that_loss_while_val_bce_is_plain_bce(flags, reference, tmp_path,
                                                                                    monkeypatch):
    import contextlib
    import io

    import pandas as pd

    from tests.datagen import make_data_dir
    from train import backbones as registry
    from train.fit import train

    monkeypatch.setitem(registry.BACKBONES, "tiny_loss_cnn", registry.Backbone("tiny_loss_cnn", _tiny_cnn,
                                                                               min_input_size=8))
    data = make_data_dir(tmp_path / "data", n=16, n_classes=3, seed=2)
    out = tmp_path / "run"
    config = parse_args([str(data.root), "--backbone", "tiny_loss_cnn", "--out", str(out), "--image-size", "16",
                         "--batch-size", "4", "--frozen-epochs", "1", "--epochs", "2", "--unfreeze", "1",
                         "--weights", "none", "--val-split", "0.25", "--augment", "none", *flags])
    with contextlib.redirect_stdout(io.StringIO()):
        train(config, verbose=0)
    saved = json.loads((out / "config.json").read_text())["train"]
    assert {k: saved[k] for k in ("loss", "focal_gamma", "asl_gamma_pos", "asl_gamma_neg", "asl_clip")} == {
        k: getattr(config, k) for k in ("loss", "focal_gamma", "asl_gamma_pos", "asl_gamma_neg", "asl_clip")}
    predictions = pd.read_csv(out / "val_predictions.csv", dtype={"id": str})
    truth = data.labels[[data.ids.index(i) for i in predictions["id"]]]
    probs = predictions[data.classes].to_numpy()
    metrics = json.loads((out / "metrics.json").read_text())
    history = pd.read_csv(out / "history.csv")
    best = history[history["epoch"] == metrics["best_epoch"]].iloc[0]
    assert best["val_loss"] == pytest.approx(reference(truth, probs), rel=1e-4)  # the loss trained on
    assert metrics["val_bce"] == pytest.approx(binary_crossentropy(truth, probs), rel=1e-12)
    assert metrics["val_bce"] > best["val_loss"]  # both down-weight easy labels: below plain BCE
    # Resuming the finished run with another loss is refused like any other changed setting.
    other = dataclasses.replace(config, loss="bce", focal_gamma=2.0, asl_gamma_neg=4.0, asl_clip=0.05)
    with pytest.raises(rundir.RunDirError, match=f"loss: '{config.loss}' -> 'bce'"):
        train(other, verbose=0)
