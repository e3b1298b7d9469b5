"""A cut-down `make demo` end to end: generate, serve, crawl, train with 2 replicas, compare, submit — the same code path."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from crawl.manifest import read_data_dir
from predict.inference import predict_ensemble
from predict.runs import load_run
from demo.generate import CLASSES, DemoDataConfig, _sample_labels, generate

REPO = Path(__file__).resolve().parents[1]


def test_generated_lists_are_jd_format_with_learnable_multilabel_rows(tmp_path):
    paths = generate(DemoDataConfig(out=tmp_path, n_train=30, n_test=10, seed=3))
    train_rows = list(csv.reader(paths["train_list"].open()))
    test_rows = list(csv.reader(paths["test_list"].open()))
    assert len(train_rows) == 30 + 3  # three broken entries: a 404, a corrupt JPEG, an HTML page
    assert all(len(r) == 2 + len(CLASSES) for r in train_rows)
    assert all(len(r) == 2 for r in test_rows) and len(test_rows) == 10
    flags = np.array([[int(v) for v in r[2:]] for r in train_rows[:30]])
    assert set(np.unique(flags)) == {0, 1}
    assert (flags.sum(axis=1) >= 2).all()  # several labels true per image: garment type and colour at least
    assert paths["classes"].read_text().split() == CLASSES
    sizes = [cv2.imread(str(p)).shape[:2] for p in (tmp_path / "images").glob("train_*.jpg")]
    assert len(sizes) == 30 and all(300 <= h <= 800 and 300 <= w <= 800 for h, w in sizes)


def test_generation_is_deterministic_and_reuses_drawn_images(tmp_path):
    a = generate(DemoDataConfig(out=tmp_path / "a", n_train=8, n_test=2, seed=1))
    b = generate(DemoDataConfig(out=tmp_path / "b", n_train=8, n_test=2, seed=1))
    assert a["train_list"].read_text() == b["train_list"].read_text()
    first = (tmp_path / "a" / "images" / "train_00003.jpg").read_bytes()
    assert first == (tmp_path / "b" / "images" / "train_00003.jpg").read_bytes()
    again = generate(DemoDataConfig(out=tmp_path / "a", n_train=8, n_test=2, seed=1))  # a second run reuses files
    assert again["train_list"].read_text() == a["train_list"].read_text()


def test_every_label_sample_has_one_garment_and_one_colour():
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = _sample_labels(rng)
        assert sum(labels[c] for c in ("top", "dress", "trousers")) == 1
        assert sum(labels[c] for c in ("red", "blue", "green", "yellow")) == 1
        assert labels["long_sleeves"] + labels["short_sleeves"] == (0 if labels["trousers"] else 1)


def test_cut_down_demo_end_to_end(tmp_path):
    out, submission = tmp_path / "demo", tmp_path / "submissions" / "demo_jd.csv"
    cmd = [sys.executable, "-m", "demo", "--out", str(out), "--submission", str(submission), "--n-train", "48",
           "--n-test", "12", "--backbones", "xception", "--epochs", "2", "--frozen-epochs", "1", "--image-size", "75"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    for step in range(1, 7):
        assert f"[{step}/6]" in text
    assert "2 replica(s)" in text  # MirroredStrategy over two logical CPU devices
    assert "BatchNormalization statistics of" in text  # random weights: BN estimated on the training images
    assert "chance level" in text and "| xception |" in text

    train = read_data_dir(out / "data" / "train")
    assert len(train.manifest) == 48
    assert sorted(train.failed["reason"]) == ["corrupt", "http_404", "not_image"]
    run = out / "runs" / "xception"
    for name in ("model.keras", "config.json", "metrics.json", "history.csv", "curves.png"):
        assert (run / name).is_file(), name
    assert (out / "compare" / "compare.md").is_file() and (out / "compare" / "compare.png").is_file()
    assert "x chance" in text

    # No train/serve skew: predict's code on the saved model reproduces training's validation probabilities.
    val = pd.read_csv(run / "val_predictions.csv", dtype={"id": str})
    path_of = dict(zip(train.manifest["id"], train.image_paths()))
    predicted = predict_ensemble([load_run(run)], [path_of[i] for i in val["id"]], ids=list(val["id"]), tta=1,
                                 progress=False)
    np.testing.assert_allclose(predicted.probabilities, val[CLASSES].to_numpy(), rtol=0, atol=2e-5)

    rows = list(csv.reader(submission.open()))
    test_ids = [r[0] for r in csv.reader((out / "generated" / "test.csv").open())]
    assert [r[0] for r in rows] == test_ids  # headerless JD rows, one per test id, in list order
    assert all(len(r) == 1 + len(CLASSES) and set(r[1:]) <= {"0", "1"} for r in rows)

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already crawled, reused" in again.stdout and "nothing to do" in again.stdout
    assert list(csv.reader(submission.open())) == rows
