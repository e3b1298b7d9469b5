"""Each test reproduces, on a tiny model, a Keras or TensorFlow behaviour that a workaround in train/ exists for.

When one of these fails after a Keras upgrade, Keras changed that behaviour: check whether the workaround named in
the failure message is still needed, and remove it (with its test) if not.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from train.keras_workarounds import (
    SEED_STATE_SUFFIX,
    clear_restored_epoch,
    correct_epoch_loss,
    grouped_to_depthwise,
    reseed_random_layers,
)

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")

X = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
Y = (X[:, :1] > 0).astype("float32")


def _model(dropout: float = 0.0, seed: int = 0, lr: float = 0.1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, activation="relu")(inputs)
    x = keras.layers.Dropout(dropout, seed=seed)(x) if dropout else x
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="binary_crossentropy")
    return model


class EpochLog(keras.callbacks.Callback):
    """The epochs fit() ran, and per epoch the loss of each batch's logs and the epoch's logs."""

    def __init__(self, fix: bool = False):
        super().__init__()
        self.fix = fix
        self.epochs: list[int] = []
        self.batch_losses: list[list[float]] = []
        self.epoch_losses: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.batch_losses.append([])

    def on_train_batch_end(self, batch, logs=None):
        self.batch_losses[-1].append(float(logs["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        if self.fix:
            correct_epoch_loss(logs, self.batch_losses[-1][-1])
        self.epoch_losses.append(float(logs["loss"]))


def test_backup_and_restore_leaves_the_restored_epoch_on_the_model(tmp_path):
    model = _model()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    model.fit(X, Y, epochs=2, verbose=0, callbacks=[backup])  # backs up "2 epochs done"
    restored = _model()
    restored.fit(X, Y, epochs=2, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert getattr(restored, "_initial_epoch", None) == 2, (
        "Keras no longer leaves the restored epoch in model._initial_epoch after fit(): "
        "train.keras_workarounds.clear_restored_epoch may be removable"
    )
    # What that breaks: the next fit() (another stage, no backup of its own) starts at the stale epoch.
    stale = EpochLog()
    restored.fit(X, Y, initial_epoch=0, epochs=3, verbose=0, callbacks=[stale])
    assert stale.epochs == [2], "fit() no longer prefers model._initial_epoch: clear_restored_epoch may be removable"
    clear_restored_epoch(restored)
    cleared = EpochLog()
    restored.fit(X, Y, initial_epoch=0, epochs=3, verbose=0, callbacks=[cleared])
    assert cleared.epochs == [0, 1, 2]


def test_seed_generator_states_are_found_by_path_and_not_restored_by_backup_and_restore(tmp_path):
    model = _model(dropout=0.5)
    states = [v for v in model.variables if v.path.endswith(SEED_STATE_SUFFIX)]
    assert len(states) == 1, (
        f"no variable path ends in {SEED_STATE_SUFFIX!r} any more ({[v.path for v in model.variables]}): "
        "train.keras_workarounds.reseed_random_layers must find Dropout's SeedGenerator state another way"
    )
    before = _seed_state(model)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    model.fit(X, Y, batch_size=5, epochs=1, verbose=0, callbacks=[backup])
    trained = _seed_state(model)
    assert trained[0] == before[0] and trained[1] > before[1]  # (seed, counter): two steps advanced the counter
    # A resumed process: the same model built again, the backup restored (epoch 1 done, nothing left to run).
    resumed = _model(dropout=0.5)
    resumed.fit(X, Y, batch_size=5, epochs=1, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    restored = _seed_state(resumed)
    np.testing.assert_array_equal(resumed.layers[1].kernel.numpy(), model.layers[1].kernel.numpy())  # weights back
    assert not np.array_equal(restored, trained), (
        "BackupAndRestore now restores the SeedGenerator states: "
        "train.keras_workarounds.reseed_random_layers may be removable"
    )
    # The workaround keys both on the epoch alone: the same state whatever happened before.
    reseed_random_layers(model, 3)
    reseed_random_layers(resumed, 3)
    expected = np.array([before[0], 3 << 20])
    np.testing.assert_array_equal(_seed_state(model), expected)
    np.testing.assert_array_equal(_seed_state(resumed), expected)


def _seed_state(model: keras.Model) -> np.ndarray:
    [state] = [v for v in model.variables if v.path.endswith(SEED_STATE_SUFFIX)]
    return keras.ops.convert_to_numpy(state).copy()


def _unknown_length_batches(drop_remainder: bool) -> tf.data.Dataset:
    # filter() hides the length from Keras, as the training pipeline's skipping of unreadable files does.
    return tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: True).batch(4, drop_remainder=drop_remainder)


def test_epoch_loss_of_an_unknown_length_drop_remainder_dataset_is_not_the_batches_running_mean():
    # Learning rate 0: every batch sees the same weights, so the right epoch loss is the mean over the 8 samples the
    # two batches hold (evaluate() on this dataset has the same fault, so it is computed directly).
    right = _mean_loss(_model(lr=0.0), 8)
    keras_log = EpochLog()
    _model(lr=0.0).fit(_unknown_length_batches(True), epochs=2, verbose=0, shuffle=False, callbacks=[keras_log])
    assert [len(losses) for losses in keras_log.batch_losses] == [2, 2]  # 10 samples, batches of 4, 2 dropped
    assert [losses[-1] for losses in keras_log.batch_losses] == pytest.approx([right, right], rel=1e-6)
    assert keras_log.epoch_losses != pytest.approx([right, right], rel=1e-3), (
        "Keras now reports the right epoch loss for an unknown-length, drop_remainder dataset: "
        "train.keras_workarounds.correct_epoch_loss may be removable"
    )
    fixed_log = EpochLog(fix=True)
    _model(lr=0.0).fit(_unknown_length_batches(True), epochs=2, verbose=0, shuffle=False, callbacks=[fixed_log])
    assert fixed_log.epoch_losses == pytest.approx([right, right], rel=1e-6)
    # Without drop_remainder Keras gets it right: the bug is that combination only.
    kept = EpochLog()
    _model(lr=0.0).fit(_unknown_length_batches(False), epochs=1, verbose=0, shuffle=False, callbacks=[kept])
    assert kept.epoch_losses == pytest.approx([_mean_loss(_model(lr=0.0), 10)], rel=1e-6)


def _mean_loss(model: keras.Model, n: int) -> float:
    """The mean binary cross-entropy of `model` on the first n samples."""
    return float(np.mean(keras.ops.convert_to_numpy(keras.losses.binary_crossentropy(Y[:n], model(X[:n])))))


def _nested_batchnorm_model() -> tuple[keras.Model, keras.Model, keras.layers.BatchNormalization]:
    """A tiny 'backbone' with a BatchNormalization, called with training=False inside an outer model, as
    train.model.build_model calls the real backbone."""
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((3,))
    norm = keras.layers.BatchNormalization(momentum=0.5)
    inner = keras.Model(inner_in, norm(keras.layers.Dense(4)(inner_in)))
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, activation="sigmoid")(inner(inputs, training=False))
    model = keras.Model(inputs, outputs)
    return model, inner, norm


def _fit_once(model: keras.Model) -> None:
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    model.fit(X * 10 + 5, Y, batch_size=5, epochs=1, verbose=0)


def test_training_false_on_a_nested_backbone_does_not_keep_batchnorm_in_inference_mode_during_fit():
    """The backbone's BatchNormalization must be frozen (trainable=False), not only called with training=False.

    In Keras 3.15 a functional model passes fit()'s training=True down to every layer it runs, overriding the
    training=False its graph recorded for the nested backbone, so an unfrozen BatchNormalization updates its moving
    statistics (and under MirroredStrategy each replica its own). train.model.freeze_backbone and unfreeze_top keep
    every BatchNormalization at trainable=False, which is what holds its statistics in both stages.
    """
    model, _, norm = _nested_batchnorm_model()
    before = np.asarray(norm.moving_mean).copy()
    _fit_once(model)
    moved = not np.array_equal(np.asarray(norm.moving_mean), before)
    assert moved, (
        "Keras now keeps a nested model called with training=False in inference mode during fit(): the comment in "
        "train.model.build_model is then true on its own, and freezing BatchNormalization is belt and braces"
    )


def test_a_frozen_batchnorm_keeps_its_statistics_during_fit():
    """What the two stages rely on instead: BatchNormalization with trainable=False runs in inference mode."""
    from train.model import freeze_backbone, unfreeze_top

    for prepare in (freeze_backbone, lambda inner: unfreeze_top(inner, 1.0)):
        model, inner, norm = _nested_batchnorm_model()
        prepare(inner)
        before = (np.asarray(norm.moving_mean).copy(), np.asarray(norm.moving_variance).copy())
        _fit_once(model)
        assert np.array_equal(np.asarray(norm.moving_mean), before[0])
        assert np.array_equal(np.asarray(norm.moving_variance), before[1])


_EMPTY_REPLICA_BATCH = """
import sys
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from train.data import make_dataset
folder = sys.argv[1]
for i in range(10):
    tf.io.write_file(f"{folder}/{i}.png", tf.io.encode_png(tf.fill([12, 12, 3], tf.constant(20 * i, tf.uint8))))
print("onednn", _pywrap_util_port.IsMklEnabled())
print("empty batch conv", tuple(tf.nn.conv2d(tf.zeros((0, 8, 8, 3)), tf.zeros((3, 3, 3, 4)), 1, "VALID").shape))
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
# Batches of 8: the last one holds 2 images (one per replica), or 1 (one replica gets none), or 1 padded to 2.
for n, pad in ((10, 1), (9, 1), (9, 2)):
    paths = [f"{folder}/{i}.png" for i in range(n)]
    ds = make_dataset(paths, None, image_size=8, preprocessing="inception", batch_size=8, training=False,
                      pad_to_multiple=pad)
    try:
        print(n, pad, "ok", model.predict(ds, verbose=0).shape[0])
    except Exception as err:
        print(n, pad, "fails", type(err).__name__, "Incompatible shapes" in str(err))
"""


def test_mirrored_predict_fails_when_a_replica_gets_no_image_of_the_last_batch(tmp_path):
    """Why train.data.make_dataset(pad_to_multiple=replicas) pads the last validation batch.

    With 2 replicas, a last evaluation batch of one image leaves one replica an empty batch (tf.distribute hands it
    a 0-row dummy). Whether predict then fails depends on one thing only, TensorFlow's oneDNN CPU kernels, not on
    timing, load or tf.data options: oneDNN's Conv2D returns a 0-row batch unchanged (shape [0, 8, 8, 3] instead of
    [0, 6, 6, 4]), so the next layer fails with InvalidArgumentError "Incompatible shapes". TensorFlow 2.21 turns
    oneDNN on by default only on x86 CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (recent Intel Xeons; also
    Arm Neoverse V1; the machine of the run that added this test printed "oneDNN custom operations are on",
    tests/test_cli.py), and TF_ENABLE_ONEDNN_OPTS=1/0 overrides that. Without oneDNN (an AMD EPYC by default) the
    same predict returns 9 rows. So the pin forces oneDNN on and uses the evaluation batches as make_dataset builds
    them (pipeline_options included): it fails as soon as TensorFlow predicts such a batch, and the padding may then
    be removable.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}
    result = subprocess.run([sys.executable, "-c", _EMPTY_REPLICA_BATCH, str(tmp_path)], capture_output=True,
                            text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in result.stdout.splitlines() if line.split(" ")[0] in ("onednn", "empty", "10", "9")]
    assert lines[:3] == ["onednn True", "empty batch conv (0, 8, 8, 3)", "10 1 ok 10"], result.stdout + result.stderr
    assert lines[3] == "9 1 fails InvalidArgumentError True", (
        f"{lines[3]!r}: TensorFlow (with oneDNN) now predicts a last batch smaller than the replica count; the "
        "padding in train.data.make_dataset (pad_to_multiple) may be removable"
    )
    assert lines[4:] == ["9 2 ok 10"]  # the padding: both replicas get an image, the padding row is predicted too


def test_an_unknown_length_epoch_advances_the_optimizer_step_once_more_than_it_trains():
    from train.keras_workarounds import EpochAlignedSteps

    class Steps(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches, self.at_epoch_end = 0, []

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1

        def on_epoch_end(self, epoch, logs=None):
            self.at_epoch_end.append(int(self.model.optimizer.iterations.numpy()))

    # A filter makes the length unknown, as skipped files do in training: 10 rows make 2 full batches of 4.
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: True).batch(4, drop_remainder=True)
    plain, steps = _model(), Steps()
    plain.fit(dataset, epochs=2, verbose=0, callbacks=[steps])
    assert steps.batches == 4
    assert steps.at_epoch_end == [3, 6], (
        "fit() no longer advances optimizer.iterations past an unknown-length epoch's last batch: "
        "train.keras_workarounds.EpochAlignedSteps may be removable"
    )
    aligned, steps = _model(), Steps()
    aligned.fit(dataset, epochs=2, verbose=0, callbacks=[EpochAlignedSteps(2), steps])
    assert steps.at_epoch_end == [2, 4]


_REPLICA_BN_STATISTICS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from train.keras_workarounds import reconcile_replica_statistics
rng = np.random.default_rng(0)
x = np.concatenate([rng.normal(0, 1, (8, 4)), rng.normal(5, 1, (8, 4))]).astype("float32")  # replica 0, replica 1
y = (rng.random((16, 1)) < 0.5).astype("float32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
with strategy.scope():
    inputs = keras.Input((4,))
    backbone = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(backbone(inputs)))
    model.compile(optimizer="adam", loss="binary_crossentropy")
model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
bn = backbone.get_layer("bn")
replicas = [np.asarray(v) for v in bn.moving_mean.value.values]
first = np.array_equal(bn.moving_mean.numpy(), replicas[0])
print("drifted", not np.array_equal(replicas[0], replicas[1]), "read first", first)
print("reconciled", reconcile_replica_statistics(model))
replicas = [np.asarray(v) for v in bn.moving_mean.value.values]
global_mean = 0.01 * x.mean(axis=0)  # momentum 0.99 from 0: the global batch's mean
print("equal", np.array_equal(replicas[0], replicas[1]), "global", np.allclose(replicas[0], global_mean, atol=1e-6))
"""


@pytest.mark.slow
def test_replicas_keep_their_own_batchnorm_statistics_until_reconciled():
    """Why the scratch recipe reconciles BatchNormalization's moving statistics across replicas after each epoch
    (train.keras_workarounds.reconcile_replica_statistics): under MirroredStrategy each replica updates its own copy
    from its share of the batch, and reading the variable gives the first replica's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", _REPLICA_BN_STATISTICS], capture_output=True, text=True,
                            timeout=300, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("drifted", "reconciled", "equal"))]
    assert lines[0] == "drifted True read first True", (
        f"{lines[0]!r}: replicas no longer keep their own BatchNormalization statistics; "
        "train.keras_workarounds.reconcile_replica_statistics may be removable"
    ) if lines else result.stdout + result.stderr
    assert lines[1:] == ["reconciled 2", "equal True global True"]


def test_keras_runs_a_grouped_convolution_through_xla_on_tensorflow():
    """Why `grouped_to_depthwise` exists: Keras's TensorFlow backend compiles a convolution whose kernel has fewer
    input channels than the input (groups > 1) with XLA, which on a CPU made ConvNeXt's depthwise 7x7 layers about
    20x slower than DepthwiseConv2D (keras-team/keras#20471). When this fails, Keras changed: measure again whether
    the rewrite is still needed."""
    import inspect

    from keras.src.backend.tensorflow import nn

    source = inspect.getsource(nn.conv)
    assert "@tf.function(jit_compile=True)" in source and "channels != kernel.shape[-2]" in source


def test_grouped_to_depthwise_replaces_depthwise_conv2ds_only_and_computes_the_same(tmp_path):
    inputs = keras.Input((9, 9, 6))
    x = keras.layers.Conv2D(6, 3, padding="same", groups=6, name="depthwise_as_groups")(inputs)
    x = keras.layers.Conv2D(4, 1, name="pointwise")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, groups=2, use_bias=False, name="two_groups")(x)
    model = keras.Model(inputs, x)
    keras.utils.set_random_seed(0)
    for layer in model.layers[1:]:
        layer.set_weights([np.random.default_rng(1).normal(size=w.shape).astype("float32") for w in layer.weights])
    rewritten = grouped_to_depthwise(model)
    kinds = [(layer.name, type(layer).__name__) for layer in rewritten.layers[1:]]
    assert kinds == [("depthwise_as_groups", "DepthwiseConv2D"), ("pointwise", "Conv2D"), ("two_groups", "Conv2D")]
    x = np.random.default_rng(2).normal(size=(2, 9, 9, 6)).astype("float32")
    np.testing.assert_allclose(rewritten(x), model(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "m.keras"
    rewritten.save(path)
    np.testing.assert_allclose(keras.models.load_model(path, safe_mode=True)(x), model(x), rtol=1e-5, atol=1e-5)
    plain = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3)])
    assert grouped_to_depthwise(plain) is plain
