"""Backbone comparison: table (Markdown, CSV) with the documented columns, sorted by mAP, numbers equal to
evaluate's and to the predictions it made, and the bar chart PNG of the stated size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import fbeta_score

from predict.__main__ import main
from predict.compare import COLUMNS, CompareConfig, compare
from predict.evaluate import EvaluateConfig, evaluate
from predict.inference import predict_ensemble
from tests.predict_fixtures import (
    CLASSES,
    bits,
    detector_model,
    expected_probabilities,
    make_data_dir,
    make_run_dir,
    solid,
)

OFF, ON = [0.1, 0.25, 0.4], [0.9, 0.8, 0.65]
COLOURS = ["red", "green", "blue", "white", "yellow", "magenta", "red", "blue"]  # every image has a label


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    ids = [f"p{i}" for i in range(len(COLOURS))]
    labels = {i: bits(c).tolist() for i, c in zip(ids, COLOURS, strict=True)}
    images = {i: solid(c) for i, c in zip(ids, COLOURS, strict=True)}
    data = make_data_dir(root / "data", images, classes=CLASSES, labels=labels)
    # "good" detects the right channel for each class; "bad" looks at the wrong ones, so its mAP is lower.
    good = make_run_dir(
        root / "good", detector_model(24, OFF, ON), backbone="tiny_good", thresholds=[0.5, 0.85, 0.3],
        metrics={"epochs_trained": 7, "train_seconds": 3725.0},
    )
    bad = make_run_dir(
        root / "bad", detector_model(20, OFF, ON, preprocessing="raw", channels=(2, 0, 1)), preprocessing="raw",
        backbone="tiny_bad", metrics={"epochs_trained": 4, "train_seconds": 61.0},
    )
    return dict(data=data, good=good, bad=bad, y=np.array([labels[i] for i in ids]))


def test_compare_table_and_chart(setup, tmp_path, monkeypatch):
    predictions = []  # every Prediction compare made, with the options it was made with

    def recording(runs, paths, **kw):
        prediction = predict_ensemble(runs, paths, **kw)
        predictions.append((runs[0].name, kw["tta"], kw.get("warmup", False), prediction))
        return prediction

    monkeypatch.setattr("predict.compare.predict_ensemble", recording)
    out = tmp_path / "cmp"
    result = compare(CompareConfig(runs=(setup["bad"], setup["good"]), data=setup["data"], tta=2, out=out,
                                   progress=False))
    monkeypatch.undo()
    table = result.table
    assert list(table.columns) == list(COLUMNS) == [
        "run", "backbone", "input_size", "params", "epochs", "train_seconds", "map", "map_tta",
        "f2_at_0.5", "f2_at_tuned", "images_per_second",
    ]
    assert table["backbone"].tolist() == ["tiny_good", "tiny_bad"]  # sorted by mAP, best first
    good, bad = table.iloc[0], table.iloc[1]
    assert good["map"] == 1.0 and bad["map"] < 0.9
    # Per run: one plain pass after a warm-up (it gives the speed), then one pass with the TTA views.
    assert [(name, tta, warmup) for name, tta, warmup, _ in predictions] == [
        ("bad", 1, True), ("bad", 2, False), ("good", 1, True), ("good", 2, False)
    ]
    speed = {name: p.images_per_second for name, tta, _, p in predictions if tta == 1}
    for row, run in ((good, setup["good"]), (bad, setup["bad"])):
        # The table's numbers are evaluate's, exactly.
        assert row["map"] == evaluate(EvaluateConfig(runs=(run,), data=setup["data"], progress=False))["map"]
        assert row["map_tta"] == evaluate(EvaluateConfig(runs=(run,), data=setup["data"], tta=2, progress=False))["map"]
        assert row["images_per_second"] == speed[row["run"]]
    assert (good["input_size"], good["epochs"], good["train_seconds"]) == (24, 7, 3725.0)
    assert (bad["input_size"], bad["epochs"], bad["train_seconds"]) == (20, 4, 61.0)
    assert good["params"] == 3 * 3 + 3 + 3 * 3 + 3  # two Dense(3) layers on 3 channel means
    # F2 figures against scikit-learn on the known probabilities of the good run.
    probs = expected_probabilities(COLOURS, OFF, ON)
    for column, t in (("f2_at_0.5", [0.5] * 3), ("f2_at_tuned", [0.5, 0.85, 0.3])):
        ref = fbeta_score(setup["y"], (probs >= np.array(t)).astype(int), beta=2, average="samples", zero_division=0)
        assert good[column] == pytest.approx(ref, abs=1e-12)
    assert good["f2_at_tuned"] < good["f2_at_0.5"] == pytest.approx(1.0)

    # Files: the CSV holds the same rows exactly, the Markdown the readable table of the same numbers, the chart
    # is a PNG of the figure's size (5.2 x 4.2 inches at 100 dpi for two runs).
    csv = pd.read_csv(out / "compare.csv")
    pd.testing.assert_frame_equal(csv, table, check_dtype=False, check_exact=True)
    md = (out / "compare.md").read_text()
    assert md == result.markdown
    lines = md.splitlines()
    assert lines[0] == (
        "| run | backbone | input (px) | parameters | epochs | training time | mAP (no TTA) | mAP (TTA x2) "
        "| F2 @0.5 | F2 @tuned | images/s |"
    )
    assert lines[2] == (
        f"| good | tiny_good | 24 | 0.00M | 7 | 1:02:05 | 1.0000 | 1.0000 | 1.0000 | {good['f2_at_tuned']:.4f} "
        f"| {good['images_per_second']:.1f} |"
    )
    assert lines[3] == (
        f"| bad | tiny_bad | 20 | 0.00M | 4 | 0:01:01 | {bad['map']:.4f} | {bad['map_tta']:.4f} "
        f"| {bad['f2_at_0.5']:.4f} | {bad['f2_at_tuned']:.4f} | {bad['images_per_second']:.1f} |"
    )
    assert lines[5].startswith(f"Data: `{setup['data']}`. Sorted by mAP with TTA.")
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size == (520, 420)
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md", "compare.png"]


def test_compare_cli_prints_table(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", str(setup["good"]), "--data", str(setup["data"]), "--tta", "1",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    assert printed == md + f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}\n"
    assert md.splitlines()[2].startswith("| good | tiny_good | 24 | 0.00M | 7 | 1:02:05 | 1.0000 | 1.0000 |")
    assert "mAP (TTA x1)" in md
    with Image.open(out / "compare.png") as im:
        assert im.size == (500, 420)  # one run: the minimum width of 5 inches
    (tmp_path / "file").write_text("x")
    assert main(["compare", str(setup["good"]), "--data", str(setup["data"]), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {tmp_path / 'file'} is a file; compare writes a folder (compare.md, compare.csv, compare.png)\n"
    )
