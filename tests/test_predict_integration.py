"""Predict on a RUN_DIR that `python -m train` really wrote: the RUN_DIR contract holds end to end, and prediction
reproduces training's own validation probabilities (same decode, resize and preprocessing: no train/serve skew).
Slow: it trains a tiny Xception for one epoch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from predict.compare import CompareConfig, compare
from predict.evaluate import EvaluateConfig, evaluate
from predict.inference import predict_ensemble
from predict.runs import load_run
from predict.submission import SubmitConfig, submit
from tests.predict_fixtures import make_data_dir, textured

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_predict_on_a_trained_run(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"t{i:02d}" for i in range(24)]
    labels = {i: [int(k % 3 == j or rng.random() < 0.3) for j in range(3)] for k, i in enumerate(ids)}
    images = {i: textured(k) for k, i in enumerate(ids)}
    data = make_data_dir(tmp_path / "data", images, classes=["a", "b", "c"], labels=labels)
    cmd = [sys.executable, "-m", "train", str(data), "--backbone", "xception", "--out", str(tmp_path / "run"),
           "--image-size", "75", "--frozen-epochs", "1", "--epochs", "1", "--weights", "none", "--batch-size", "4",
           "--val-split", "0.25"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    run = load_run(tmp_path / "run")
    assert (run.backbone, run.image_size, run.preprocessing) == ("xception", 75, "inception")
    assert run.classes == ["a", "b", "c"]
    val = pd.read_csv(tmp_path / "run" / "val_predictions.csv", dtype={"id": str})
    paths = [str(data / "images" / f"{i}.jpg") for i in val["id"]]
    ours = predict_ensemble([run], paths, ids=list(val["id"]), progress=False).probabilities
    np.testing.assert_allclose(ours, val[["a", "b", "c"]].to_numpy(), rtol=0, atol=1e-6)

    runs = (tmp_path / "run",)
    result = submit(SubmitConfig(runs=runs, data=data, out=tmp_path / "sub.csv", tta=2, threshold="tuned",
                                 progress=False))
    # Every id in list order, flagged where its TTA x2 probability reaches the run's tuned threshold.
    all_paths = [str(data / "images" / f"{i}.jpg") for i in ids]
    probabilities = predict_ensemble([run], all_paths, tta=2, progress=False).probabilities
    flags = (probabilities >= run.tuned_thresholds).astype(int)
    expected = "".join(f"{i},{','.join(map(str, row))}\n" for i, row in zip(ids, flags, strict=True))
    assert result.rows == 24 and (tmp_path / "sub.csv").read_text() == expected
    report = evaluate(EvaluateConfig(runs=runs, data=data, tta=2, progress=False))
    table = compare(CompareConfig(runs=runs, data=data, tta=2, out=tmp_path / "cmp", progress=False)).table
    assert table.loc[0, "map_tta"] == report["map"]
    assert table.loc[0, "epochs"] == 1 and table.loc[0, "params"] == run.model.count_params()
