"""K-fold: the stratified folds (disjoint, covering, seeded), the settings k-fold refuses, the out-of-fold summary
of finished folds, and a k-fold folder as one model in predict (submit, evaluate, compare, ensembles).

The folds here are built by hand (tests/predict_fixtures.py's colour detectors, no training), so every number is
known; tests/test_kfold_slow.py trains real folds through the CLI, kills one and resumes it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from predict.compare import CompareConfig, compare
from predict.errors import PredictError
from predict.evaluate import EvaluateConfig, evaluate
from predict.runs import load_run, load_runs
from predict.submission import SubmitConfig, submit
from tests.predict_fixtures import (
    CLASSES,
    bits,
    detector_model,
    expected_probabilities,
    make_data_dir,
    make_run_dir,
    solid,
)
from tests.test_train import _config
from train import kfold_dir, rundir
from train.__main__ import main as cli_main
from train.config import ConfigError, TrainConfig
from train.kfold import summarize
from train.metrics import f2_samples, mean_average_precision, tune_thresholds
from train.rundir import RunDirError
from train.split import stratified_kfold

# --- the folds ------------------------------------------------------------------------------------------------------


def _labels(n: int, k: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, k)) < 0.3).astype(int)


@pytest.mark.parametrize(("n", "k", "folds"), [(50, 4, 5), (23, 1, 3), (10, 3, 2)])
def test_kfold_splits_are_disjoint_covering_stratified_and_seeded(n, k, folds):
    labels = _labels(n, k, seed=n)
    splits = stratified_kfold(labels, folds, seed=7)
    assert len(splits) == folds
    held_out = np.concatenate([val for _, val in splits])
    assert sorted(held_out.tolist()) == list(range(n))  # every row held out exactly once
    for train_idx, val_idx in splits:
        assert train_idx.tolist() == sorted(set(range(n)) - set(val_idx.tolist()))
        assert val_idx.tolist() == sorted(val_idx.tolist()) and len(val_idx) > 0
    sizes = [len(val) for _, val in splits]
    assert max(sizes) - min(sizes) <= 1 + k  # iterative stratification may trade a row or two for the classes
    positives = np.array([labels[val].sum(axis=0) for _, val in splits])  # folds x classes
    assert (positives.max(axis=0) - positives.min(axis=0) <= 1).all()  # each class spread evenly
    again = stratified_kfold(labels, folds, seed=7)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    if n >= 20:
        other = stratified_kfold(labels, folds, seed=8)
        assert not all(np.array_equal(a[1], b[1]) for a, b in zip(splits, other, strict=True))


def test_kfold_split_refuses_too_few_images():
    with pytest.raises(ValueError, match="--folds 5 needs at least 5 images, got 4"):
        stratified_kfold(_labels(4, 2, 0), 5)


BASE = ["--backbone", "xception", "--image-size", "75"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--folds", "5", "--val-split", "0.2"],
         "--folds excludes --val-split: in k-fold training each fold is validated on its own held-out part"),
        (["--folds", "5", "--val", "."], "--folds excludes --val:"),
        (["--fold", "2"], "--fold 2 needs --folds K (the number of folds)"),
        (["--folds", "1"], "--folds must be an integer of at least 2, got 1"),
        (["--folds", "3", "--fold", "3"], "--fold must be between 0 and 2 (--folds 3), got 3"),
    ],
)
def test_settings_k_fold_refuses(tmp_path, capsys, flags, message):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path / "data", tmp_path / "kfold", [*BASE, *flags]).resolve()
    assert message in str(err.value)
    assert cli_main([str(tmp_path / "data"), "--out", str(tmp_path / "kfold"), *BASE, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "kfold").exists()


def test_a_k_fold_out_that_holds_something_else_is_refused(tmp_path):
    single = make_run_dir(tmp_path / "single", detector_model(16, [0.1] * 3, [0.9] * 3))
    with pytest.raises(RunDirError, match="holds a single run"):
        kfold_dir.check_kfold_out(single)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not empty and is not a k-fold folder"):
        kfold_dir.check_kfold_out(tmp_path / "other")
    kfold_dir.check_kfold_out(tmp_path / "new")  # absent: fine
    assert kfold_dir.fold_dir(tmp_path, 3) == tmp_path / "fold_3"


# --- a k-fold folder built by hand ------------------------------------------------------------------------------------

# Six solid-colour images; class k is "channel k is bright", so the labels follow from the colours.
MANIFEST = ["red", "green", "blue", "white", "black", "yellow"]
HELD_OUT = [["green", "white", "yellow"], ["red", "blue", "black"]]  # fold 0, fold 1
FOLD_OUTPUTS = [([0.1, 0.2, 0.3], [0.8, 0.7, 0.6]), ([0.3, 0.1, 0.2], [0.6, 0.9, 0.7])]  # (off, on) per fold
PLAIN = ([0.2, 0.2, 0.2], [0.7, 0.7, 0.7])
SIZE = 16


def _fold(root: Path, fold: int, data: Path) -> Path:
    off, on = FOLD_OUTPUTS[fold]
    held = HELD_OUT[fold]
    probs = expected_probabilities(held, off, on)
    truth = np.array([bits(c) for c in held])
    path = make_run_dir(kfold_dir.fold_dir(root, fold), detector_model(SIZE, off, on), prevalence=[0.5, 0.25, 0.5],
                        metrics={"val_map": mean_average_precision(truth, probs), "epochs_trained": 3 + fold,
                                 "train_seconds": 10.0 + fold, "skipped_images": {"train": [], "val": []}})
    record = rundir.read_config(path)
    settings = TrainConfig(data_dir=data, backbone="xception", out=path, folds=2, fold=fold).resolve().to_json()
    rundir.write_config(path, dataclasses.replace(record, train=settings))
    rundir.write_val_predictions(path, held, probs, CLASSES)
    return path


@pytest.fixture(scope="module")
def kfold(tmp_path_factory):
    root = tmp_path_factory.mktemp("kfold")
    data = make_data_dir(root / "data", {c: solid(c) for c in MANIFEST}, classes=CLASSES,
                         labels={c: bits(c).tolist() for c in MANIFEST})
    folder = root / "kfold"
    for fold in (0, 1):
        _fold(folder, fold, data)
    config = TrainConfig(data_dir=data, backbone="xception", out=folder, folds=2)
    summary = summarize(config)
    plain = make_run_dir(root / "plain", detector_model(SIZE, *PLAIN), thresholds=[0.4, 0.5, 0.6])
    return dict(root=root, data=data, folder=folder, summary=summary, plain=plain, config=config)


def _mean_probabilities(colours) -> np.ndarray:
    return np.mean([expected_probabilities(colours, off, on) for off, on in FOLD_OUTPUTS], axis=0)


def test_oof_predictions_hold_every_training_image_once_with_its_folds_probabilities(kfold):
    folder = kfold["folder"]
    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"id": str})
    assert oof["id"].tolist() == MANIFEST  # every training image once, in manifest order
    assert list(oof.columns) == ["id", *CLASSES]
    fold_of = {c: f for f, held in enumerate(HELD_OUT) for c in held}
    expected = np.array([expected_probabilities([c], *FOLD_OUTPUTS[fold_of[c]])[0] for c in MANIFEST])
    np.testing.assert_allclose(oof[CLASSES].to_numpy(), expected, atol=1e-7)
    summary = json.loads((folder / "kfold.json").read_text())
    assert summary == kfold["summary"]
    truth = np.array([bits(c) for c in MANIFEST])
    probs = oof[CLASSES].to_numpy()
    assert summary["oof_map"] == mean_average_precision(truth, probs)
    tuned = tune_thresholds(truth, probs, beta=2)
    assert summary["thresholds"] == {c: float(t) for c, t in zip(CLASSES, tuned, strict=True)}
    assert summary["f2_at_tuned"] == f2_samples(truth, probs >= tuned)
    assert summary["f2_at_0.5"] == f2_samples(truth, probs >= 0.5)
    fold_maps = [json.loads((kfold_dir.fold_dir(folder, i) / "metrics.json").read_text())["val_map"] for i in (0, 1)]
    assert {k: summary[k] for k in ("format_version", "folds", "seed", "classes", "fold_val_map", "n_oof",
                                    "unreadable_ids", "epochs_trained", "train_seconds")} == {
        "format_version": 1, "folds": 2, "seed": 0, "classes": CLASSES, "fold_val_map": fold_maps, "n_oof": 6,
        "unreadable_ids": [], "epochs_trained": 4, "train_seconds": 21.0}


def test_summary_refuses_folds_that_overlap(kfold, tmp_path):
    folder = tmp_path / "overlap"
    for fold in (0, 1):
        _fold(folder, fold, kfold["data"])
    rundir.write_val_predictions(kfold_dir.fold_dir(folder, 1), ["red", "green"], np.full((2, 3), 0.5), CLASSES)
    with pytest.raises(RunDirError, match="held out by more than one fold: green"):
        summarize(dataclasses.replace(kfold["config"], out=folder))
    assert not (folder / "kfold.json").exists()


def _proba(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str}).set_index("id")


def test_k_fold_folder_in_submit_is_the_mean_of_its_folds(kfold, tmp_path):
    data, folder = kfold["data"], kfold["folder"]
    run = load_run(folder)
    assert (run.name, run.backbone, run.image_size, len(run.folds)) == ("kfold", "tiny", SIZE, 2)
    assert run.model.count_params() == sum(f.model.count_params() for f in run.folds)

    def sub(runs, name, **kw) -> Path:
        out = tmp_path / name
        submit(SubmitConfig(runs=tuple(runs), data=data, out=out, progress=False, **kw))
        return out

    together = _proba(sub([folder], "kfold.csv", format="proba"))
    alone = [_proba(sub([kfold_dir.fold_dir(folder, i)], f"fold{i}.csv", format="proba")) for i in (0, 1)]
    np.testing.assert_allclose(together.to_numpy(), (alone[0] + alone[1]).to_numpy() / 2, atol=1e-6)
    np.testing.assert_allclose(together.to_numpy(), _mean_probabilities(MANIFEST), atol=2e-6)
    # --threshold tuned is the thresholds tuned on the out-of-fold predictions.
    flags = pd.read_csv(sub([folder], "tuned.csv", format="csv", threshold="tuned"), dtype={"id": str})
    thresholds = np.array([kfold["summary"]["thresholds"][c] for c in CLASSES])
    np.testing.assert_array_equal(flags[CLASSES].to_numpy(), (together.to_numpy() >= thresholds).astype(int))
    np.testing.assert_array_equal(run.tuned_thresholds, thresholds)
    # With a plain run, the k-fold folder is one member of the ensemble: (mean of folds + plain) / 2.
    mixed = _proba(sub([folder, kfold["plain"]], "mixed.csv", format="proba"))
    plain = expected_probabilities(MANIFEST, *PLAIN)
    np.testing.assert_allclose(mixed.to_numpy(), (_mean_probabilities(MANIFEST) + plain) / 2, atol=2e-6)
    assert [r.name for r in load_runs([folder, kfold["plain"]])] == ["kfold", "plain"]


def test_k_fold_folder_in_evaluate_and_compare(kfold, tmp_path):
    data, folder = kfold["data"], kfold["folder"]
    truth = np.array([bits(c) for c in MANIFEST])
    report = evaluate(EvaluateConfig(runs=(folder, kfold["plain"]), data=data, progress=False))
    mixed = (_mean_probabilities(MANIFEST) + expected_probabilities(MANIFEST, *PLAIN)) / 2
    assert report["map"] == pytest.approx(mean_average_precision(truth, mixed), abs=1e-9)
    result = compare(CompareConfig(runs=(folder,), data=data, tta=1, out=tmp_path / "compare", progress=False))
    row = result.table.iloc[0]
    assert (row["run"], row["backbone"], row["epochs"], row["train_seconds"]) == ("kfold", "tiny", 4, 21.0)
    assert row["map"] == pytest.approx(mean_average_precision(truth, _mean_probabilities(MANIFEST)), abs=1e-9)


def test_an_unfinished_k_fold_folder_is_refused_naming_what_is_missing(kfold, tmp_path):
    folder = tmp_path / "half"
    _fold(folder, 0, kfold["data"])
    with pytest.raises(PredictError, match=r"half/kfold.json: not found; the k-fold run is not finished"):
        load_run(folder)
    _fold(folder, 1, kfold["data"])
    (kfold_dir.fold_dir(folder, 1) / "backup").mkdir()  # fold 1 still resumable: not finished
    with pytest.raises(PredictError, match=r"not found; .*\(unfinished: fold_1\)"):
        load_run(folder)


def test_a_k_fold_folder_is_refused_by_the_export_engines_and_export(kfold, tmp_path):
    from predict.export import export_run

    with pytest.raises(PredictError, match="k-fold folder, which predicts with the keras engine only"):
        load_run(kfold["folder"], engine="onnx")
    with pytest.raises(PredictError, match="a k-fold folder is not exported as one model"):
        export_run(load_run(kfold["folder"]), "onnx", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_predict_tag_takes_a_k_fold_folder_as_one_model(kfold):
    from predict.tagger import Tagger

    tagger = Tagger.load(kfold["folder"], threshold="tuned")
    assert [run.name for run in tagger.runs] == ["kfold"]
    probabilities = tagger.predict_proba([solid(c) for c in MANIFEST])
    np.testing.assert_allclose(probabilities, _mean_probabilities(MANIFEST), atol=2e-6)
