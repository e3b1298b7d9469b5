"""Slower train-stage checks (`make test-slow`): resume inside stage 2 and across two replicas, a full
Inception-ResNet-v2 run, and a run with --cache DIR and --mixed-precision."""

from __future__ import annotations

import contextlib
import io
import json

import keras
import numpy as np
import pandas as pd
import pytest

from tests.datagen import make_data_dir
from tests.test_train import RUN_FILES, _cli, _config, _finish, _kill_when, assert_same_numbers
from train.data import make_dataset
from train.fit import train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Your input ran out of data")]

BASE = ["--backbone", "xception", "--image-size", "75", "--batch-size", "8", "--weights", "none", "--val-split", "0.25"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("slow-data"), n=40, n_classes=3, corrupt=1, seed=3)


def test_resume_after_kill_inside_stage_2(data, tmp_path):
    out = tmp_path / "run"
    args = [str(data.root), "--out", str(out), *BASE, "--frozen-epochs", "1", "--epochs", "3", "--unfreeze", "0.1"]
    _kill_when(_cli(args), out / "backup" / "stage2" / "training_metadata.json")  # after epoch 2, the first of stage 2
    before = pd.read_csv(out / "history.csv")
    assert before["epoch"].tolist()[:2] == [1, 2]
    code, stdout, stderr = _finish(_cli(args), timeout=600)
    assert code == 0, stderr
    assert "epoch 3/3 stage 2" in stdout and "epoch 2/3" not in stdout
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3] and history["stage"].tolist() == [1, 2, 2]
    pd.testing.assert_frame_equal(history.iloc[:2], before.iloc[:2])
    assert {p.name for p in out.iterdir()} == RUN_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 3
    assert metrics["best_epoch"] == int(history.loc[history["val_map"].idxmax(), "epoch"])
    _assert_like_an_uninterrupted_run(args, out, tmp_path / "reference")


def test_resume_after_kill_with_two_replicas(data, tmp_path):
    out = tmp_path / "run"
    args = [str(data.root), "--out", str(out), *BASE, "--frozen-epochs", "2", "--epochs", "2", "--devices", "2"]
    _kill_when(_cli(args), out / "backup" / "stage1" / "training_metadata.json")
    code, stdout, stderr = _finish(_cli(args), timeout=600)
    assert code == 0, stderr
    assert "2 replica(s)" in stdout and "(resuming)" in stdout
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]
    assert {p.name for p in out.iterdir()} == RUN_FILES
    _assert_like_an_uninterrupted_run(args, out, tmp_path / "reference")


def _assert_like_an_uninterrupted_run(args: list[str], resumed, reference) -> None:
    args = [reference if a == str(resumed) else a for a in args]
    code, _, stderr = _finish(_cli([str(a) for a in args]), timeout=600)
    assert code == 0, stderr
    assert_same_numbers(resumed, reference)


def test_inception_resnet_v2_full_run_saves_a_safe_mode_model(data, tmp_path):
    flags = ["--backbone", "inception_resnet_v2", "--image-size", "75", "--batch-size", "8", "--frozen-epochs", "1",
             "--epochs", "2", "--unfreeze", "0.05", "--weights", "none", "--val-split", "0.25"]
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(_config(data.root, out, flags), verbose=0)
    assert result.epochs_trained == 2
    # model.keras loads in safe mode (no Lambda layers) and predicts val_predictions.csv again from the images.
    _assert_predicts_val_predictions(out, data)


def _assert_predicts_val_predictions(out, data, atol: float = 1e-5) -> keras.Model:
    model = keras.saving.load_model(out / "model.keras")
    predictions = pd.read_csv(out / "val_predictions.csv")
    paths = [str(data.root / "images" / f"{i}.jpg") for i in predictions["id"]]
    ds = make_dataset(paths, None, image_size=75, preprocessing="inception", batch_size=4, training=False)
    again = model.predict(ds, verbose=0)
    np.testing.assert_allclose(again, predictions[data.classes].to_numpy(), rtol=1e-4, atol=atol)
    return model


def test_cache_dir_and_mixed_precision(data, tmp_path):
    flags = [*BASE, "--frozen-epochs", "2", "--epochs", "2", "--cache", str(tmp_path / "cache"), "--mixed-precision"]
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(_config(data.root, out, flags), verbose=0)
    # The cache is in effect: tf.data wrote a complete cache (index and data files) for each dataset.
    files = {p.name: p.stat().st_size for p in (tmp_path / "cache").iterdir()}
    for tag in ("train", "val"):
        index = [n for n in files if n.startswith(f"{tag}-75px-") and n.endswith(".index")]
        shards = [n for n in files if n.startswith(f"{tag}-75px-") and ".data-" in n]
        assert len(index) == 1 and shards and all(files[n] > 0 for n in shards), (tag, sorted(files))
    assert not any(n.endswith(".lockfile") for n in files)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    # Mixed precision was in effect: the saved model's backbone layers and pooling compute in float16 (with float32
    # variables); only the probabilities are float32.
    model = _assert_predicts_val_predictions(out, data, atol=2e-3)
    layers = [layer for layer in model.get_layer("xception").layers if not isinstance(layer, keras.layers.InputLayer)]
    convs = [layer for layer in layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.SeparableConv2D))]
    assert len(convs) > 30 and all(layer.dtype_policy.name == "mixed_float16" for layer in layers)
    assert all(layer.compute_dtype == "float16" and layer.variable_dtype == "float32" for layer in convs)
    assert model.get_layer("pool").dtype_policy.name == "mixed_float16"
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    assert json.loads((out / "config.json").read_text())["runtime"]["mixed_precision"] is True
    outputs = model.predict(np.zeros((2, 75, 75, 3), np.float32), verbose=0)
    assert outputs.dtype == np.float32 and np.isfinite(outputs).all()
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]
