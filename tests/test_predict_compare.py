"""Backbone comparison: table (Markdown, CSV) with the issue's columns, sorted by mAP, numbers equal to evaluate's,
and the bar chart PNG written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import fbeta_score

from predict.__main__ import main
from predict.compare import COLUMNS, CompareConfig, compare
from predict.evaluate import EvaluateConfig, evaluate
from tests.predict_fixtures import CLASSES, bits, detector_model, expected_probabilities, make_data_dir, make_run_dir, solid

OFF, ON = [0.1, 0.25, 0.4], [0.9, 0.8, 0.65]
COLOURS = ["red", "green", "blue", "white", "yellow", "magenta", "red", "blue"]  # every image has a label


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    ids = [f"p{i}" for i in range(len(COLOURS))]
    labels = {i: bits(c).tolist() for i, c in zip(ids, COLOURS)}
    data = make_data_dir(root / "data", {i: solid(c) for i, c in zip(ids, COLOURS)}, classes=CLASSES, labels=labels)
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


def test_compare_table_and_chart(setup, tmp_path):
    out = tmp_path / "cmp"
    result = compare(CompareConfig((setup["bad"], setup["good"]), setup["data"], tta=2, out=out, progress=False))
    table = result.table
    assert list(table.columns) == list(COLUMNS) == [
        "run", "backbone", "input_size", "params", "epochs", "train_seconds", "map", "map_tta",
        "f2_at_0.5", "f2_at_tuned", "images_per_second",
    ]
    assert table["backbone"].tolist() == ["tiny_good", "tiny_bad"]  # sorted by mAP, best first
    good, bad = table.iloc[0], table.iloc[1]
    assert good["map"] == pytest.approx(1.0) and bad["map"] < 0.9
    for row, run in ((good, setup["good"]), (bad, setup["bad"])):
        assert row["map"] == pytest.approx(evaluate(EvaluateConfig((run,), setup["data"], progress=False))["map"], abs=1e-12)
        assert row["map_tta"] == pytest.approx(evaluate(EvaluateConfig((run,), setup["data"], tta=2, progress=False))["map"], abs=1e-12)
        assert row["images_per_second"] > 0
    assert (good["input_size"], good["epochs"], good["train_seconds"]) == (24, 7, 3725.0)
    assert (bad["input_size"], bad["epochs"], bad["train_seconds"]) == (20, 4, 61.0)
    assert good["params"] == 3 * 3 + 3 + 3 * 3 + 3  # two Dense(3) layers on 3 channel means
    # F2 figures against scikit-learn on the known probabilities of the good run.
    probs = expected_probabilities(COLOURS, OFF, ON)
    for column, t in (("f2_at_0.5", [0.5] * 3), ("f2_at_tuned", [0.5, 0.85, 0.3])):
        ref = fbeta_score(setup["y"], (probs >= np.array(t)).astype(int), beta=2, average="samples", zero_division=0)
        assert good[column] == pytest.approx(ref, abs=1e-12)
    assert good["f2_at_tuned"] < good["f2_at_0.5"] == pytest.approx(1.0)

    # Files: the CSV holds the same rows, the Markdown the readable table, the chart is a real PNG.
    csv = pd.read_csv(out / "compare.csv")
    assert list(csv.columns) == list(COLUMNS) and csv["run"].tolist() == ["good", "bad"]
    np.testing.assert_allclose(csv["map"], table["map"])
    md = (out / "compare.md").read_text().splitlines()
    assert md[0] == (
        "| run | backbone | input (px) | parameters | epochs | training time | mAP (no TTA) | mAP (TTA x2) "
        "| F2 @0.5 | F2 @tuned | images/s |"
    )
    assert md[2].startswith("| good | tiny_good | 24 | 0.00M | 7 | 1:02:05 | 1.0000 | 1.0000 | 1.0000 |")
    assert md[3].startswith("| bad | tiny_bad | 20 |") and "0:01:01" in md[3]
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] == 420
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md", "compare.png"]


def test_compare_cli_prints_table(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", str(setup["good"]), str(setup["bad"]), "--data", str(setup["data"]), "--tta", "1",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| good | tiny_good |" in printed and "mAP (TTA x1)" in printed and "wrote" in printed
    assert (out / "compare.png").is_file()
    (tmp_path / "file").write_text("x")
    assert main(["compare", str(setup["good"]), "--data", str(setup["data"]), "--out", str(tmp_path / "file")]) == 2
