"""The scratch recipe (`--recipe scratch`): every layer and BatchNormalization trained from the first epoch, one
stage, the warm-up and cosine learning rate per epoch against its formula, and the settings it refuses.

The training test uses a tiny registered backbone with BatchNormalization (a few seconds); the kill -9 resume and
the two-replica run with a real backbone are in tests/test_scratch_slow.py."""

from __future__ import annotations

import contextlib
import io
import json
import math

import keras
import numpy as np
import pandas as pd
import pytest

from tests.datagen import make_data_dir
from tests.test_train import _config
from train import backbones as registry
from train.__main__ import main as cli_main
from train.config import ConfigError
from train.fit import train
from train.model import build_model, scratch_momentum, train_every_layer
from train.schedules import warmup_cosine

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")


def _tiny_bn_cnn(include_top=False, weights=None, input_shape=None):
    """Two convolutions with a BatchNormalization between them: the smallest backbone a scratch run can prove on."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    return keras.Model(inputs, x, name="tiny_bn_cnn")


class Snapshots(keras.callbacks.Callback):
    """Every model variable (trainable or not) by path, at the start and the end of fit()."""

    def __init__(self):
        super().__init__()
        self.taken: list[dict[str, np.ndarray]] = []
        self.trainable: set[str] = set()

    def on_train_begin(self, logs=None):
        self.trainable = {w.path for w in self.model.trainable_weights}
        self.taken.append({w.path: np.array(w.numpy()) for w in self.model.weights})

    def on_train_end(self, logs=None):
        self.taken.append({w.path: np.array(w.numpy()) for w in self.model.weights})


def expected_lr(step: int, peak: float, warmup_steps: int, decay_steps: int) -> float:
    """The scratch schedule written out: linear from 0 to `peak` over the warm-up, then half a cosine down to 0."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    done = min(step - warmup_steps, decay_steps) / decay_steps
    return peak * 0.5 * (1 + math.cos(math.pi * done))


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """A tiny-backbone scratch run: 24 images (18 for training: 4 steps of 4), 5 epochs of which 2 warm up."""
    root = tmp_path_factory.mktemp("scratch")
    data = make_data_dir(root / "data", n=24, n_classes=3, seed=2, size=(40, 40))
    flags = ["--backbone", "tiny_bn_cnn", "--image-size", "32", "--batch-size", "4", "--epochs", "5",
             "--warmup-epochs", "2", "--lr", "0.02", "--recipe", "scratch", "--val-split", "0.25", "--augment", "none"]
    snapshots = Snapshots()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.BACKBONES, "tiny_bn_cnn", registry.Backbone("tiny_bn_cnn", _tiny_bn_cnn, min_input_size=8))
        with contextlib.redirect_stdout(io.StringIO()):
            train(_config(data.root, root / "run", flags), verbose=0, callbacks=[snapshots])
    return root / "run", snapshots


def test_scratch_trains_every_weight_and_batchnorm_statistics(scratch_run):
    _, snapshots = scratch_run
    begin, end = snapshots.taken
    statistics = {"bn/moving_mean", "bn/moving_variance"}
    # Every layer trains from the first epoch: every weight but the moving statistics is trainable, and each moved.
    assert snapshots.trainable == set(begin) - statistics == {
        "conv1/kernel", "conv1/bias", "bn/gamma", "bn/beta", "conv2/kernel", "conv2/bias", "probabilities/kernel",
        "probabilities/bias"}
    unchanged = [p for p in snapshots.trainable if np.array_equal(begin[p], end[p])]
    assert unchanged == []
    # BatchNormalization ran in training mode: its moving statistics followed the training batches.
    for name in statistics:
        assert not np.allclose(begin[name], end[name]), name
    # No statistics were estimated before training: they started at Keras's initial 0 and 1.
    assert np.array_equal(begin["bn/moving_mean"], np.zeros(8)) and np.array_equal(begin["bn/moving_variance"],
                                                                                    np.ones(8))


@pytest.mark.parametrize(("default", "steps", "expected"),
                         [(0.99, 1000, 0.99), (0.99, 16, 0.01 ** (1 / 16)), (0.9, 4, 0.01 ** 0.25), (0.5, 100, 0.5),
                          (0.99, 0, 0.01)])
def test_scratch_momentum_lets_the_statistics_forget_their_start_within_an_epoch(default, steps, expected):
    momentum = scratch_momentum(default, steps)
    assert momentum == pytest.approx(expected)
    assert momentum ** max(1, steps) <= 0.01 + 1e-12 or momentum == default


def test_the_scratch_run_saved_its_batchnorm_at_the_lowered_momentum(scratch_run):
    """4 steps an epoch: Keras's 0.99 would leave 96% of the starting statistics after an epoch; the run trained
    and saved its BatchNormalization at 0.01 ** (1/4): the saved moving variance is the data's (about 0.1-0.3
    here), where 0.99 over at most 20 steps would have kept it above 0.8 (0.99 ** 20 of the starting 1)."""
    out, _ = scratch_run
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    bn = next(layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization))
    assert bn.momentum == pytest.approx(0.01 ** 0.25)
    assert np.all(np.asarray(bn.moving_variance) < 0.6)


def test_scratch_is_one_stage_with_warmup_then_cosine_per_epoch(scratch_run):
    out, _ = scratch_run
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert history["stage"].tolist() == [1] * 5
    # The lr column is the schedule after each epoch's last step: 4 steps an epoch, 8 warming up, 12 decaying.
    expected = [expected_lr(4 * epoch, 0.02, 8, 12) for epoch in range(1, 6)]
    np.testing.assert_allclose(expected, [0.01, 0.02, 0.015, 0.005, 0.0], atol=1e-12)
    np.testing.assert_allclose(history["lr"], expected, rtol=1e-6, atol=1e-9)
    config = json.loads((out / "config.json").read_text())["train"]
    assert {k: config[k] for k in ("recipe", "weights", "warmup_epochs", "frozen_epochs", "finetune_lr",
                                   "unfreeze", "lr")} == {
        "recipe": "scratch", "weights": "none", "warmup_epochs": 2, "frozen_epochs": None, "finetune_lr": None,
        "unfreeze": None, "lr": 0.02}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 5


def test_the_schedule_follows_the_formula_step_by_step():
    schedule = warmup_cosine(3e-3, epochs=4, warmup_epochs=1, n_train=50, batch_size=8)  # 6 steps an epoch
    assert (schedule.warmup_steps, schedule.decay_steps) == (6, 18)
    keras_schedule = schedule.keras_schedule()
    got = [float(keras_schedule(step)) for step in range(0, 27)]
    want = [expected_lr(step, 3e-3, 6, 18) for step in range(0, 27)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-10)
    assert want[6] == 3e-3 and want[24] == want[26] == pytest.approx(0.0, abs=1e-18)
    no_warmup = warmup_cosine(1e-3, epochs=2, warmup_epochs=0, n_train=8, batch_size=8).keras_schedule()
    assert float(no_warmup(0)) == pytest.approx(1e-3)  # decays from the peak at once
    with pytest.raises(ValueError, match="7 training images make no full batch of 8"):
        warmup_cosine(1e-3, epochs=2, warmup_epochs=0, n_train=7, batch_size=8)


def test_train_every_layer_opens_batchnorm_too():
    model, backbone = build_model(registry.Backbone("tiny_bn_cnn", _tiny_bn_cnn, min_input_size=8), 3,
                                  image_size=16, weights="none", dropout=0.0, l2=0.0, backbone_training=None)
    backbone.trainable = False
    train_every_layer(backbone, steps_per_epoch=1000)
    assert all(layer.trainable for layer in backbone.layers)
    assert backbone.get_layer("bn").momentum == 0.99  # Keras's own: enough steps for its moving statistics
    assert len(backbone.trainable_weights) == 2 + 2 + 2  # conv1, bn (gamma, beta), conv2
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
    # Inference mode (prediction) uses the moving statistics, training mode the batch's: different outputs.
    assert not np.allclose(model(x, training=False), model(x, training=True))


BASE = ["--backbone", "xception", "--image-size", "75"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--recipe", "scratch", "--frozen-epochs", "3"],
         "--frozen-epochs 3: not a setting of --recipe scratch, which trains every layer in one stage from the first "
         "epoch with --lr as the peak of its warm-up and cosine schedule; drop it (they belong to --recipe transfer)"),
        (["--recipe", "scratch", "--finetune-lr", "1e-05", "--unfreeze", "0.5"],
         "--finetune-lr 1e-05, --unfreeze 0.5: not a setting of --recipe scratch"),
        (["--recipe", "scratch", "--weights", "imagenet"],
         "--weights imagenet with --recipe scratch: scratch starts from random weights (--weights none); to "
         "fine-tune ImageNet or file weights use --recipe transfer"),
        (["--recipe", "scratch", "--epochs", "3", "--warmup-epochs", "3"],
         "--warmup-epochs must be between 0 and --epochs - 1 (2), got 3"),
        (["--recipe", "scratch", "--lr", "0"], "--lr must be positive, got 0.0"),
        (["--warmup-epochs", "2"], "--warmup-epochs 2: the warm-up belongs to --recipe scratch"),
    ],
)
def test_settings_the_scratch_recipe_refuses(tmp_path, capsys, flags, message):
    args = [str(tmp_path / "data"), "--out", str(tmp_path / "run"), *BASE, *flags]
    with pytest.raises(ConfigError) as err:
        _config(tmp_path / "data", tmp_path / "run", [*BASE, *flags]).resolve()
    assert message in str(err.value)
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_each_recipe_resolves_its_own_defaults(tmp_path):
    transfer = _config(tmp_path, tmp_path / "run", BASE).resolve()
    assert (transfer.recipe, transfer.weights, transfer.frozen_epochs, transfer.finetune_lr, transfer.unfreeze,
            transfer.warmup_epochs) == ("transfer", "imagenet", 10, 1e-5, 0.3, None)
    scratch = _config(tmp_path, tmp_path / "run", [*BASE, "--recipe", "scratch"]).resolve()
    assert (scratch.weights, scratch.frozen_epochs, scratch.finetune_lr, scratch.unfreeze,
            scratch.warmup_epochs) == ("none", None, None, None, 1)
    one_epoch = _config(tmp_path, tmp_path / "run", [*BASE, "--recipe", "scratch", "--epochs", "1"]).resolve()
    assert one_epoch.warmup_epochs == 0  # no epoch to warm up in
    assert one_epoch.resolve() == one_epoch  # resolving twice changes nothing (k-fold resolves each fold again)
    weights_none = _config(tmp_path, tmp_path / "run", [*BASE, "--weights", "none"]).resolve()
    assert (weights_none.recipe, weights_none.frozen_epochs) == ("transfer", 10)  # today's behaviour, unchanged
