"""train.rundir, the RUN_DIR format: config.json's typed record round trip, its version-1 files, and refusals."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from train import rundir
from train.rundir import FORMAT_VERSION, RunDirError, RunRecord

# A config.json exactly as `python -m train` wrote it before format_version existed (keys in that order).
VERSION_1_CONFIG = {
    "backbone": {"name": "xception", "input_size": 299, "preprocessing": "inception", "min_input_size": 75},
    "image_size": 75,
    "classes": ["red_disc", "green_bar", "blue_ring"],
    "train": {"data_dir": "/data", "backbone": "xception", "out": "/runs/a", "lr": 0.001, "augment": ["flip"]},
    "versions": {"tensorflow": "2.21.0", "keras": "3.15.0", "python": "3.11.9"},
    "manifest_sha256": "ab" * 32,
    "val_manifest_sha256": None,
    "class_prevalence": [0.4, 0.333333, 0.5],
    "n_train": 30,
    "n_val": 10,
    "runtime": {"replicas": 1, "mixed_precision": False},
}


def _record() -> RunRecord:
    return rundir.record_from_json(VERSION_1_CONFIG)


def test_config_round_trip_writes_format_version_and_reads_the_same_record(tmp_path):
    record = _record()
    rundir.write_config(tmp_path, record)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == {"format_version": FORMAT_VERSION, **VERSION_1_CONFIG}
    assert rundir.read_config(tmp_path) == record
    assert record.classes == ("red_disc", "green_bar", "blue_ring")
    assert record.class_prevalence == (0.4, 0.333333, 0.5)


def test_a_config_written_before_format_version_loads_as_version_1(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(VERSION_1_CONFIG))
    record = rundir.read_config(tmp_path)
    assert record.format_version == 1 == FORMAT_VERSION
    assert record.to_json() == {"format_version": 1, **VERSION_1_CONFIG}


@pytest.mark.parametrize("key", list(VERSION_1_CONFIG))
def test_a_missing_key_is_refused_naming_file_and_key(tmp_path, key):
    config = {k: v for k, v in VERSION_1_CONFIG.items() if k != key}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match=re.escape(f"{tmp_path / 'config.json'}: missing key '{key}'")):
        rundir.read_config(tmp_path)


def test_an_unknown_key_or_a_missing_backbone_fact_is_refused_naming_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**VERSION_1_CONFIG, "decoder": "rnn"}))
    with pytest.raises(RunDirError, match=re.escape(f"{tmp_path / 'config.json'}: unknown key 'decoder'")):
        rundir.read_config(tmp_path)
    # "head" is known since the rnn head (absent: a sigmoid run), but it must be a head record.
    (tmp_path / "config.json").write_text(json.dumps({**VERSION_1_CONFIG, "head": "rnn"}))
    with pytest.raises(RunDirError, match=r"config.json: key 'head' should be an object with name sigmoid or rnn"):
        rundir.read_config(tmp_path)
    backbone = {k: v for k, v in VERSION_1_CONFIG["backbone"].items() if k != "preprocessing"}
    (tmp_path / "config.json").write_text(json.dumps({**VERSION_1_CONFIG, "backbone": backbone}))
    with pytest.raises(RunDirError, match=r"config.json: missing key 'backbone.preprocessing'"):
        rundir.read_config(tmp_path)


@pytest.mark.parametrize("version", [2, 0, "1", True])
def test_an_unknown_format_version_is_refused(tmp_path, version):
    (tmp_path / "config.json").write_text(json.dumps({"format_version": version, **VERSION_1_CONFIG}))
    with pytest.raises(RunDirError, match=rf"config.json: format_version {version!r} is not one this code reads \(1\)"):
        rundir.read_config(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("image_size", "75", r"key 'image_size' should be int, got '75'"),
        ("n_val", True, r"key 'n_val' should be int, got True"),
        ("val_manifest_sha256", 3, r"key 'val_manifest_sha256' should be str or NoneType, got 3"),
        ("class_prevalence", [0.4, 0.5], r"key 'class_prevalence' should hold one number per class \(3\)"),
        ("class_prevalence", [0.4, None, 0.5], r"key 'class_prevalence' should hold one number per class"),
        ("classes", ["a", "", "c"], r"key 'classes' should list non-empty names"),
    ],
)
def test_a_key_of_the_wrong_type_is_refused_naming_it(tmp_path, key, value, message):
    (tmp_path / "config.json").write_text(json.dumps({**VERSION_1_CONFIG, key: value}))
    with pytest.raises(RunDirError, match=message):
        rundir.read_config(tmp_path)


def test_absent_or_broken_config_is_named(tmp_path):
    with pytest.raises(RunDirError, match=re.escape(f"{tmp_path / 'config.json'}: not found; is {tmp_path} a RUN_DIR")):
        rundir.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"config.json: not valid JSON"):
        rundir.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match=r"config.json: not a JSON object"):
        rundir.read_config(tmp_path)


def test_classes_metrics_history_val_files_and_progress_round_trip(tmp_path):
    classes = ["a", "b b", "c"]
    rundir.write_classes(tmp_path, classes)
    assert (tmp_path / "classes.txt").read_text() == "a\nb b\nc\n"
    assert rundir.read_classes(tmp_path) == classes

    assert rundir.read_metrics(tmp_path) is None  # an unfinished run
    metrics = {"best_epoch": 2, "val_map": 0.75, "thresholds": {"a": 0.3}, "stopped_early": None}
    rundir.write_metrics(tmp_path, metrics)
    assert rundir.read_metrics(tmp_path) == metrics

    empty = rundir.read_history(tmp_path)
    assert list(empty.columns) == rundir.HISTORY_COLUMNS and empty.empty
    history = pd.DataFrame(
        [{"epoch": 1, "stage": 1, "lr": 1e-4, "loss": 0.1234567891, "val_loss": 0.2, "val_map": 1 / 3,
          "seconds": 1.25, "images_per_second": 12.34}]
    )
    rundir.write_history(tmp_path, history[list(reversed(rundir.HISTORY_COLUMNS))])  # written in the format's order
    assert (tmp_path / "history.csv").read_text().splitlines()[0] == ",".join(rundir.HISTORY_COLUMNS)
    pd.testing.assert_frame_equal(rundir.read_history(tmp_path), history)  # floats exactly, not rounded

    rundir.write_val_ids(tmp_path, ["007", "x1"])
    assert rundir.read_val_ids(tmp_path) == ["007", "x1"]  # ids stay text
    probs = np.array([[0.1, 0.2, 0.3], [0.9, 0.8, 1 / 7]])
    rundir.write_val_predictions(tmp_path, ["007", "x1"], probs, classes)
    predictions = rundir.read_val_predictions(tmp_path)
    assert list(predictions.columns) == ["id", *classes] and predictions["id"].tolist() == ["007", "x1"]
    np.testing.assert_array_equal(predictions[classes].to_numpy(), probs)

    assert rundir.read_progress(tmp_path) == (-math.inf, None)
    rundir.write_progress(tmp_path, 0.5, 3)
    assert (tmp_path / "backup" / "progress.json").is_file()
    assert rundir.read_progress(tmp_path) == (0.5, 3)


def test_missing_classes_file_is_named(tmp_path):
    with pytest.raises(RunDirError, match=re.escape(f"{tmp_path / 'classes.txt'}: not found")):
        rundir.read_classes(tmp_path)
