"""Slow k-fold and scratch checks (`make test-slow`), through `python -m train` in subprocesses: a 2-fold run whose
second fold is killed with SIGKILL and resumed (finished folds skipped, the OOF file and summary complete), and a
scratch run on two replicas killed and resumed, each against an uninterrupted reference."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from predict.inference import predict_run
from predict.runs import load_run
from tests.datagen import make_data_dir
from tests.test_scratch import expected_lr
from tests.test_train import RUN_FILES, _cli, _finish, _kill_when, assert_same_numbers
from train.metrics import f2_samples, mean_average_precision, tune_thresholds

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Your input ran out of data")]

BASE = ["--backbone", "xception", "--image-size", "75", "--batch-size", "8", "--weights", "none", "--seed", "1"]
TWO_FOLDS = [*BASE, "--folds", "2", "--frozen-epochs", "1", "--epochs", "2", "--unfreeze", "0.1", "--lr", "1e-3",
             "--finetune-lr", "3e-4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 images, 3 classes; one corrupt file (never predicted: named in kfold.json instead)."""
    return make_data_dir(tmp_path_factory.mktemp("kfold-data"), n=40, n_classes=3, corrupt=1, seed=4)


@pytest.mark.timeout(2400)  # four fold trainings; each subprocess has its own limit below
def test_a_killed_fold_resumes_and_the_folds_give_complete_oof_predictions(data, tmp_path):
    folder = tmp_path / "kfold"
    args = [str(data.root), "--out", str(folder), *TWO_FOLDS]
    # Fold 0 finishes, fold 1 is killed right after its first epoch is backed up.
    _kill_when(_cli(args), folder / "fold_1" / "backup" / "stage1" / "training_metadata.json", timeout=600)
    assert (folder / "fold_0" / "metrics.json").exists() and not (folder / "kfold.json").exists()
    fold0 = (folder / "fold_0" / "history.csv").read_text()
    code, stdout, stderr = _finish(_cli(args), timeout=600)
    assert code == 0, stderr
    assert "already holds the finished run" in stdout and "(resuming)" in stdout
    assert "epoch 2/2 stage 2" in stdout and stdout.count("epoch 1/2") == 0
    assert (folder / "fold_0" / "history.csv").read_text() == fold0  # the finished fold was not touched
    assert {p.name for p in folder.iterdir()} == {"fold_0", "fold_1", "oof_predictions.csv", "kfold.json"}
    assert {p.name for p in (folder / "fold_1").iterdir()} == RUN_FILES

    # The killed fold ends like fold 1 trained alone, uninterrupted (--fold 1 into another folder).
    reference = tmp_path / "reference"
    code, stdout, stderr = _finish(_cli([str(data.root), "--out", str(reference), *TWO_FOLDS, "--fold", "1"]),
                                   timeout=600)
    assert code == 0, stderr
    assert "folds still to train: 0" in stdout and not (reference / "kfold.json").exists()
    assert_same_numbers(folder / "fold_1", reference / "fold_1")

    # The held-out parts: disjoint, covering the manifest; the OOF file has every readable image once.
    held = [pd.read_csv(folder / f"fold_{i}" / "val_ids.csv", dtype={"id": str})["id"].tolist() for i in (0, 1)]
    assert not set(held[0]) & set(held[1]) and sorted(held[0] + held[1]) == sorted(data.ids)
    assert abs(len(held[0]) - len(held[1])) <= 2
    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"id": str})
    readable = [i for i in data.ids if i not in data.corrupt_ids]
    assert oof["id"].tolist() == readable and list(oof.columns) == ["id", *data.classes]
    for i in (0, 1):  # each fold's best model on its held-out part: its val_predictions.csv
        own = pd.read_csv(folder / f"fold_{i}" / "val_predictions.csv", dtype={"id": str}).set_index("id")
        pd.testing.assert_frame_equal(oof.set_index("id").loc[own.index], own)
    summary = json.loads((folder / "kfold.json").read_text())
    truth = data.labels[[data.ids.index(i) for i in oof["id"]]]
    probs = oof[data.classes].to_numpy()
    assert summary["oof_map"] == mean_average_precision(truth, probs)
    tuned = tune_thresholds(truth, probs, beta=2)
    assert [summary["thresholds"][c] for c in data.classes] == tuned.tolist()
    assert summary["f2_at_tuned"] == f2_samples(truth, probs >= tuned)
    assert (summary["folds"], summary["seed"], summary["n_oof"], summary["unreadable_ids"]) == (
        2, 1, 39, data.corrupt_ids)
    assert summary["fold_val_map"] == [json.loads((folder / f"fold_{i}" / "metrics.json").read_text())["val_map"]
                                       for i in (0, 1)]
    config = json.loads((folder / "fold_1" / "config.json").read_text())["train"]
    assert (config["folds"], config["fold"], config["val_split"]) == (2, 1, None)
    # Another fold count on the same folder is refused by the finished folds.
    code, _, stderr = _finish(_cli([str(data.root), "--out", str(folder), *BASE, "--folds", "3", "--epochs", "2",
                                    "--frozen-epochs", "1"]))
    assert code == 2 and "folds: 2 -> 3" in stderr


SCRATCH = [*BASE, "--recipe", "scratch", "--epochs", "2", "--warmup-epochs", "1", "--lr", "2e-3", "--val-split",
           "0.25", "--devices", "2"]


@pytest.mark.timeout(2400)  # three scratch runs on two replicas; each subprocess has its own limit below
def test_scratch_on_two_replicas_resumes_after_kill_like_an_uninterrupted_run(data, tmp_path):
    out, reference = tmp_path / "run", tmp_path / "reference"
    args = [str(data.root), "--out", str(out), *SCRATCH]
    _kill_when(_cli(args), out / "backup" / "stage1" / "training_metadata.json", timeout=600)
    code, stdout, stderr = _finish(_cli(args), timeout=1200)
    assert code == 0, stderr
    assert "(resuming)" in stdout and "2 replica(s)" in stdout and "epoch 1/2" not in stdout
    assert "BatchNormalization statistics" not in stdout  # nothing estimated for scratch
    code, _, stderr = _finish(_cli([str(data.root), "--out", str(reference), *SCRATCH]), timeout=1200)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert_same_numbers(out, reference)
    history = pd.read_csv(out / "history.csv")
    assert history["stage"].tolist() == [1, 1]
    # The replicas' BatchNormalization statistics were reconciled before each validation: the saved model scores
    # the validation images as the epoch's validation on the replicas did.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_map"] == pytest.approx(history["val_map"].max(), abs=1e-4)
    config = json.loads((out / "config.json").read_text())
    steps = config["n_train"] // 8  # the schedule resumed at the right step: the lr per epoch is the formula's
    np.testing.assert_allclose(history["lr"], [expected_lr(e * steps, 2e-3, steps, steps) for e in (1, 2)],
                               rtol=1e-6, atol=1e-9)
    # predict scores the validation images as training's validation did (BatchNormalization in inference mode).
    predictions = pd.read_csv(out / "val_predictions.csv", dtype={"id": str})
    run = load_run(out)
    paths = [str(data.root / "images" / f"{i}.jpg") for i in predictions["id"]]
    again = predict_run(run, paths, progress=False)
    np.testing.assert_allclose(again.probabilities, predictions[data.classes].to_numpy(), rtol=1e-4, atol=1e-5)
