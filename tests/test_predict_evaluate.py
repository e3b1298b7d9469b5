"""Evaluation: mAP, samples F2 and per-class AP/F2/support checked against scikit-learn on the same probabilities,
the JSON report's keys, label alignment by class name, missing ids left out and counted, clear refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, fbeta_score

from predict.__main__ import main
from predict.errors import PredictError
from predict.evaluate import EvaluateConfig, evaluate, evaluation_report, format_report
from predict.inference import predict_ensemble
from predict.runs import load_run
from tests.predict_fixtures import conv_model, make_data_dir, make_run_dir, textured

CLASSES4 = ["a", "b", "c", "never"]  # "never" has no positive image


def _labels(n, seed=3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.45).astype(int)
    y[:, 3] = 0
    y[y[:, :3].sum(axis=1) == 0, rng.integers(0, 3)] = 1  # every image has a label: samples F2 is then unambiguous
    return y


def _sklearn(y, probs, thresholds):
    has_pos = y.sum(axis=0) > 0
    pred = (probs >= thresholds).astype(int)
    return {
        "map": average_precision_score(y[:, has_pos], probs[:, has_pos], average="macro"),
        "ap": [average_precision_score(y[:, k], probs[:, k]) if has_pos[k] else None for k in range(y.shape[1])],
        "f2": fbeta_score(y, pred, beta=2, average="samples", zero_division=0),
        "f2_class": fbeta_score(y, pred, beta=2, average=None, zero_division=0),
        "support": y.sum(axis=0),
    }


def _check(report, ref, classes):
    assert report["map"] == pytest.approx(ref["map"], abs=1e-12)
    assert report["f2"] == pytest.approx(ref["f2"], abs=1e-12)
    assert list(report["per_class"]) == list(classes)
    for k, c in enumerate(classes):
        row = report["per_class"][c]
        if ref["ap"][k] is None:
            assert row["ap"] is None
        else:
            assert row["ap"] == pytest.approx(ref["ap"][k], abs=1e-12)
        assert row["f2"] == pytest.approx(ref["f2_class"][k], abs=1e-12)
        assert row["support"] == ref["support"][k]


def test_report_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = _labels(40, seed=1)
    probs = np.round(rng.random((40, 4)), 1)  # one decimal: many tied scores
    thresholds = np.array([0.5, 0.3, 0.7, 0.5])
    report = evaluation_report(y, probs, CLASSES4, thresholds)
    _check(report, _sklearn(y, probs, thresholds), CLASSES4)
    assert set(report) == {"map", "f2", "per_class"}
    assert report["per_class"]["b"]["threshold"] == 0.3


def test_report_per_class_f2_edge_cases_against_sklearn():
    y = np.array([[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    # class 1: no positives, one false positive; class 3: no positive and no prediction (F2 0, AP null)
    probs = np.array([[0.9, 0.1, 0.2, 0.0], [0.2, 0.7, 0.6, 0.1], [0.1, 0.3, 0.4, 0.2], [0.8, 0.2, 0.1, 0.3]])
    report = evaluation_report(y, probs, CLASSES4, np.full(4, 0.5))
    pred = (probs >= 0.5).astype(int)
    expected = fbeta_score(y, pred, beta=2, average=None, zero_division=0)
    assert [report["per_class"][c]["f2"] for c in CLASSES4] == pytest.approx(expected, abs=1e-12)
    assert [report["per_class"][c]["f2"] for c in CLASSES4] == [0.5, 0.0, pytest.approx(5 / 9), 0.0]
    assert report["per_class"]["never"]["ap"] is None


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    ids = [f"e{i:02d}" for i in range(14)]
    y = _labels(len(ids))
    labels = dict(zip(ids, y.tolist(), strict=True))
    images = {i: textured(10 + k) for k, i in enumerate(ids) if i != "e05"}  # e05 failed to crawl
    data = make_data_dir(root / "data", images, list_ids=ids, classes=CLASSES4, labels=labels)
    # The same DATA_DIR with its classes in another order: evaluation must align them by name.
    reversed_labels = {i: v[::-1] for i, v in labels.items()}
    shuffled = make_data_dir(root / "shuffled", images, list_ids=ids, classes=CLASSES4[::-1], labels=reversed_labels)
    model = conv_model(24, n_classes=4, seed=2)
    run = make_run_dir(root / "run", model, classes=CLASSES4, thresholds=[0.4, 0.5, 0.6, 0.5])
    stored = [i for i in ids if i in images]
    return dict(data=data, shuffled=shuffled, run=run, y=y[[ids.index(i) for i in stored]], stored=stored)


def test_evaluate_against_sklearn_on_same_probabilities(labelled, tmp_path):
    out = tmp_path / "eval.json"
    config = EvaluateConfig(runs=(labelled["run"],), data=labelled["data"], tta=2, threshold="tuned", out=out,
                            progress=False)
    report = evaluate(config)
    paths = [str(labelled["data"] / "images" / f"{i}.jpg") for i in labelled["stored"]]
    probs = predict_ensemble([load_run(labelled["run"])], paths, tta=2, progress=False).probabilities
    assert probs.std() > 0.05  # the probabilities are spread, so the metrics are not degenerate
    _check(report, _sklearn(labelled["y"], probs, np.array([0.4, 0.5, 0.6, 0.5])), CLASSES4)
    assert report["images"] == 13 and report["missing_ids"] == ["e05"] and report["tta"] == 2
    written = json.loads(out.read_text())
    assert {"map", "f2", "per_class"} <= set(written)
    assert written["map"] == report["map"] and written["per_class"] == report["per_class"]

    again = evaluate(dataclasses.replace(config, data=labelled["shuffled"], out=None))
    assert again["map"] == report["map"] and again["per_class"] == report["per_class"]


def test_evaluate_cli_prints_and_writes(labelled, tmp_path, capsys):
    out = tmp_path / "cli.json"
    args = ["evaluate", str(labelled["run"]), "--data", str(labelled["data"]), "--no-progress", "--threshold", "0.50"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    # What is printed is the report written, formatted once; the threshold is kept in its canonical form.
    assert printed == format_report(report) + f"\nwrote {out}\n"
    assert report["threshold"] == "0.5" and report["tta"] == 1
    assert f"mAP {report['map']:.4f}" in printed and "never" in printed and "n/a" in printed
    assert "1 listed id(s) have no image" in printed
    # Without --out the headline figures are printed as JSON.
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == json.dumps({"map": report["map"], "f2": report["f2"]})


def test_evaluate_refuses_unlabelled_or_mismatched_data(labelled, tmp_path):
    unlabelled = make_data_dir(tmp_path / "unlabelled", {"u1": textured(1)})
    with pytest.raises(PredictError, match="has no labels"):
        evaluate(EvaluateConfig(runs=(labelled["run"],), data=unlabelled, progress=False))
    other = make_data_dir(tmp_path / "other", {"o1": textured(1)}, classes=["a", "b", "c", "z"],
                          labels={"o1": [1, 0, 0, 0]})
    with pytest.raises(PredictError, match=r"only in the data: \['z'\]; only in the runs: \['never'\]"):
        evaluate(EvaluateConfig(runs=(labelled["run"],), data=other, progress=False))
