"""bench.backbones: row specs, and a tiny end-to-end comparison (two 32 px runs of a small test backbone, bce and asl)
whose table and CSV figures are the runs' own files and `predict evaluate`'s numbers, whose second call trains
nothing, and whose --reuse takes a finished run from another folder.

Nothing here depends on how fast the machine is: speeds are only checked to be positive and equal to what
history.csv says.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import keras
import pandas as pd
import pytest

from bench.backbones import COLUMNS, DEFAULT_ROWS, SCORES_DIR, TABLE_CSV, TABLE_MD, Row, main, parse_row
from crawl import manifest as mf
from predict.evaluate import EvaluateConfig, evaluate
from tests.datagen import make_data_dir
from train import backbones as registry
from train import rundir

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")

TINY = "tiny_backbones_cnn"  # no "-": a row spec splits on it


# --- row specs (pure) -----------------------------------------------------------------------------------------------


def test_row_specs_name_backbone_loss_recipe_and_folds():
    names = ("xception", "convnext_tiny")
    assert parse_row("xception", names) == Row("xception", "xception")
    assert parse_row("convnext_tiny-asl", names) == Row("convnext_tiny-asl", "convnext_tiny", loss="asl")
    assert parse_row("xception-scratch", names) == Row("xception-scratch", "xception", recipe="scratch")
    assert parse_row("xception-5fold", names) == Row("xception-5fold", "xception", folds=5)
    assert parse_row("xception-focal-scratch-3fold", names).label == "scratch, focal, 3-fold ensemble"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vgg16", "row 'vgg16': unknown backbone 'vgg16'; known: convnext_tiny, xception"),
        ("xception-mse", "row 'xception-mse': 'mse' is not a loss (bce, focal, asl), a recipe (transfer, scratch)"),
        ("xception-asl-bce", "row 'xception-asl-bce': 'bce' is not a loss"),
        ("xception-1fold", "row 'xception-1fold': k-fold needs at least 2 folds"),
    ],
)
def test_bad_row_specs_are_refused_by_name(spec, message):
    with pytest.raises(ValueError) as err:
        parse_row(spec, ("xception", "convnext_tiny"))
    assert str(err.value).startswith(message)


def test_default_rows_are_issue_14s_comparison():
    assert DEFAULT_ROWS[:7] == ("inception_resnet_v2", "xception", "inception_v4", "efficientnetv2_s",
                                "efficientnetv2_b0", "convnext_tiny", "convnext_small")
    rows = [parse_row(s, tuple(registry.BACKBONES)) for s in DEFAULT_ROWS]
    assert sum(r.loss == "asl" for r in rows) == 2
    assert [r.spec for r in rows if r.folds] == ["xception-5fold"]
    assert [r.backbone for r in rows if r.recipe == "scratch"] == ["inception_resnet_v2", "xception", "inception_v4"]


def test_cli_refuses_a_bad_row_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--work", str(tmp_path), "--rows", "xception,xception"])
    assert exit_info.value.code == 2
    assert "--rows: repeated row(s) ['xception']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- a tiny comparison ----------------------------------------------------------------------------------------------


def _tiny_cnn(include_top=False, weights=None, input_shape=None):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    return keras.Model(inputs, x, name=TINY)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    registry.BACKBONES[TINY] = registry.Backbone(TINY, _tiny_cnn, min_input_size=16)
    root = tmp_path_factory.mktemp("backbones-bench")
    train_dir = make_data_dir(root / "data" / "train", 30, 3, seed=0, size=(48, 48), every_image_labelled=True).root
    test_dir = make_data_dir(root / "data" / "test", 12, 3, seed=1, size=(48, 48), id_prefix="t").root
    work = root / "work"
    argv = ["--train", str(train_dir), "--test", str(test_dir), "--image-size", "32", "--batch-size", "8",
            "--frozen-epochs", "1", "--epochs", "1", "--lr", "1e-2", "--finetune-lr", "3e-3", "--devices", "1"]
    outputs = []
    for rows, extra in ((f"{TINY},{TINY}-asl", []), (f"{TINY},{TINY}-asl,{TINY}-focal", ["--no-train"])):
        buffer = io.StringIO()
        json_path = root / f"result{len(outputs)}.json"
        with contextlib.redirect_stdout(buffer):
            assert main(["--work", str(work), "--rows", rows, "--json", str(json_path), *argv, *extra]) == 0
        outputs.append((buffer.getvalue(), json.loads(json_path.read_text())))
    # --reuse: another work folder takes the finished bce run from `work` and trains nothing.
    other = root / "other"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--work", str(other), "--rows", TINY, "--reuse", str(work), "--no-train",
                     "--json", str(root / "reused.json"), *argv]) == 0
    outputs.append((None, json.loads((root / "reused.json").read_text())))
    shutil.copytree(work / TINY, root / "copy" / TINY)  # a reusable copy: --work's own finished run still wins
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["--work", str(work), "--rows", TINY, "--reuse", str(root / "copy"), "--no-train",
                     "--json", str(root / "own.json"), *argv]) == 0
    outputs.append((buffer.getvalue(), json.loads((root / "own.json").read_text())))
    yield work, train_dir, test_dir, outputs
    registry.BACKBONES.pop(TINY, None)


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith(("| row", "| ---"))]


def _assert_cell(text: str, value: float, scale: float = 1.0):
    """A printed number is the value rounded to the printed digits."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert math.isfinite(value)
    assert abs(float(text) - value / scale) <= 0.5 * 10 ** -decimals + 1e-9, (text, value)


@pytest.mark.slow  # trains two tiny runs (about a minute on a busy machine)
def test_rows_are_the_runs_files_and_predict_evaluates_figures(tiny_bench):
    work, _, test_dir, outputs = tiny_bench
    rows = outputs[0][1]["rows"]
    assert [r["row"] for r in rows] == [TINY, f"{TINY}-asl"] and outputs[0][1]["missing"] == []
    for r in rows:
        run_dir = work.resolve() / r["row"]
        assert r["run_dir"] == str(run_dir) and r["reused_from"] == ""
        config = rundir.read_config(run_dir)
        assert config.train["loss"] == r["loss"] == ("asl" if r["row"].endswith("-asl") else "bce")
        assert (config.image_size, config.train["epochs"], config.runtime["replicas"]) == (32, 1, r["replicas"])
        history = rundir.read_history(run_dir)
        assert list(history["stage"]) == [1] and r["epochs_run"] == 1
        images = history["seconds"] * history["images_per_second"]
        assert r["train_images_per_second"] == pytest.approx(images.sum() / history["seconds"].sum())
        assert r["train_images_per_second_stage1"] == pytest.approx(history["images_per_second"][0])
        assert r["train_images_per_second"] > 0 and r["predict_images_per_second"] > 0
        assert r["params"] == keras.saving.load_model(run_dir / rundir.MODEL_FILE).count_params()
        for threshold, key in (("0.5", "f2_at_0.5"), ("tuned", "f2_at_tuned")):
            report = evaluate(EvaluateConfig(runs=(run_dir,), data=test_dir, threshold=threshold, progress=False))
            assert r["map"] == pytest.approx(report["map"], abs=1e-6)
            assert r[key] == pytest.approx(report["f2"], abs=1e-6)


def _assert_table_is(printed_rows: list[list[str]], rows: list[dict]):
    """Printed table rows are the figures, rounded as COLUMNS says."""
    assert len(printed_rows) == len(rows)
    for printed, r in zip(printed_rows, rows, strict=True):
        for text, (key, _, fmt) in zip(printed, COLUMNS, strict=True):
            if fmt == "s":
                assert text == r[key]
            elif fmt == "d":
                assert int(text) == r[key]
            else:
                _assert_cell(text, r[key], 1e6 if fmt == "params" else 1.0)


@pytest.mark.slow  # trains two tiny runs (about a minute on a busy machine)
def test_markdown_and_csv_hold_the_same_figures(tiny_bench):
    work, _, _, outputs = tiny_bench
    for stdout, result in outputs[:2]:
        _assert_table_is(_table_rows(stdout), result["rows"])
    # The files of the last call into `work` (one row): the Markdown rounds the CSV's unrounded figures.
    stdout, result = outputs[3]
    csv = pd.read_csv(work / TABLE_CSV).fillna("")
    _assert_table_is(_table_rows((work / TABLE_MD).read_text()), result["rows"])
    assert _table_rows((work / TABLE_MD).read_text()) == _table_rows(stdout)
    assert len(csv) == len(result["rows"])
    for (_, c), r in zip(csv.iterrows(), result["rows"], strict=True):
        for key, _, fmt in COLUMNS:
            assert c[key] == (pytest.approx(r[key]) if fmt not in ("s", "d") else r[key]), key


@pytest.mark.slow  # trains two tiny runs (about a minute on a busy machine)
def test_second_call_trains_nothing_and_lists_the_missing_row(tiny_bench):
    work, _, test_dir, outputs = tiny_bench
    (_, first), (stdout1, second) = outputs[:2]
    assert [r["row"] for r in second["rows"]] == [TINY, f"{TINY}-asl"]
    assert second["missing"] == [f"{TINY}-focal"] and not (work / f"{TINY}-focal").exists()
    assert f"Not measured yet: {TINY}-focal." in stdout1
    # The chance level is the test set's mean class prevalence (over classes that occur).
    labels = mf.read_data_dir(test_dir).labels()
    assert second["chance_map"] == pytest.approx(labels.mean(axis=0)[labels.mean(axis=0) > 0].mean())
    assert f"{second['chance_map']:.3f}." in stdout1
    for a, b in zip(first["rows"], second["rows"], strict=True):
        # Training figures come from the unchanged history.csv; test figures are kept with the model's fingerprint.
        assert a == b
        kept = json.loads((work / SCORES_DIR / f"{a['row']}.json").read_text())
        assert kept["key"]["model_sha256"] == rundir.model_sha256(a["run_dir"])
        assert kept["figures"]["map"] == a["map"]
        assert kept["figures"]["images_per_second"] == a["predict_images_per_second"]


@pytest.mark.slow  # trains two tiny runs (about a minute on a busy machine)
def test_reuse_takes_a_finished_run_with_the_same_settings(tiny_bench):
    work, _, _, outputs = tiny_bench
    reused = outputs[2][1]
    assert reused["missing"] == []
    (row,) = reused["rows"]
    assert row["reused_from"] == row["run_dir"] == str((work / TINY).resolve())
    assert row["map"] == outputs[0][1]["rows"][0]["map"]
    # A row --work has finished itself is its own, --reuse or not.
    assert [r["reused_from"] for r in outputs[3][1]["rows"]] == [""]


@pytest.mark.slow  # trains two tiny runs (about a minute on a busy machine)
def test_reuse_refuses_a_run_with_another_schedule(tiny_bench, tmp_path):
    work, train_dir, test_dir, _ = tiny_bench
    shutil.copytree(work / TINY, tmp_path / "runs" / TINY)
    json_path = tmp_path / "r.json"
    with contextlib.redirect_stdout(io.StringIO()):  # --epochs 3: the finished 1-epoch run is not this row
        assert main(["--work", str(tmp_path / "w"), "--rows", TINY, "--reuse", str(tmp_path / "runs"), "--no-train",
                     "--train", str(train_dir), "--test", str(test_dir), "--image-size", "32", "--batch-size", "8",
                     "--frozen-epochs", "1", "--epochs", "3", "--lr", "1e-2", "--finetune-lr", "3e-3",
                     "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["missing"] == [TINY]


@pytest.mark.slow  # three tiny trainings (the scratch run and two folds): about 3 minutes on a busy 2-core machine
def test_scratch_and_kfold_rows_are_scored_from_their_folders(tmp_path):
    """A scratch row and a 2-fold row (on a checkout with `--recipe` and `--folds`): the k-fold row is scored as one
    model, its training figures are its folds' history.csv together."""
    kfold_dir = pytest.importorskip("train.kfold_dir", reason="needs --folds and --recipe (issue 14's k-fold part)")
    registry.BACKBONES[TINY] = registry.Backbone(TINY, _tiny_cnn, min_input_size=16)
    try:
        train_dir = make_data_dir(tmp_path / "train", 30, 3, seed=0, size=(48, 48), every_image_labelled=True).root
        test_dir = make_data_dir(tmp_path / "test", 12, 3, seed=1, size=(48, 48), id_prefix="t").root
        json_path = tmp_path / "r.json"
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["--work", str(tmp_path / "w"), "--rows", f"{TINY}-scratch,{TINY}-2fold", "--train",
                         str(train_dir), "--test", str(test_dir), "--image-size", "32", "--batch-size", "8",
                         "--frozen-epochs", "1", "--epochs", "1", "--lr", "1e-2", "--finetune-lr", "3e-3",
                         "--json", str(json_path)]) == 0
    finally:
        registry.BACKBONES.pop(TINY, None)
    scratch, kfold = json.loads(json_path.read_text())["rows"]
    work = (tmp_path / "w").resolve()
    assert rundir.read_config(work / f"{TINY}-scratch").train["recipe"] == "scratch" == scratch["recipe"]
    assert list(rundir.read_history(work / f"{TINY}-scratch")["stage"]) == [1]
    assert (kfold["folds"], kfold["epochs_run"]) == (2, 2)  # one epoch in each of the two folds
    folds = kfold_dir.fold_dirs(work / f"{TINY}-2fold")
    history = pd.concat([rundir.read_history(d) for d in folds])
    images = history["seconds"] * history["images_per_second"]
    assert kfold["train_images_per_second"] == pytest.approx(images.sum() / history["seconds"].sum())
    report = evaluate(EvaluateConfig(runs=(work / f"{TINY}-2fold",), data=test_dir, threshold="tuned", progress=False))
    assert kfold["map"] == pytest.approx(report["map"], abs=1e-6)
    assert kfold["f2_at_tuned"] == pytest.approx(report["f2"], abs=1e-6)
