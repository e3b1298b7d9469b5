"""bench.heads: the structure figures on hand-made predictions, the spread over seeds, and a tiny end-to-end run whose
printed tables equal its JSON, whose data is the demo's, whose figures agree with `predict evaluate`, and whose
second call reuses the finished runs; then a tiny `--data shapes` run (tests.datagen's independent classes) in the
same work folder, whose structure columns are not applicable and whose runs are kept apart from the demo's.

Nothing here depends on how fast the machine is: speeds are only checked to be positive.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import keras
import numpy as np
import pytest

from bench.heads import COLUMNS, HeadsBenchConfig, main, run_name, spread, structure
from crawl import manifest as mf
from demo.generate import CLASSES, _sample_labels
from predict.evaluate import EvaluateConfig, evaluate
from tests.datagen import SHAPES
from train import backbones as registry

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")

TINY = "tiny_heads_cnn"


def _row(*names: str) -> list[int]:
    return [int(c in names) for c in CLASSES]


# --- structure (pure) ----------------------------------------------------------------------------------------------


def test_structure_counts_labels_empty_sets_and_violations():
    y = np.array(
        [
            _row("top", "red"),  # fine
            _row("top", "dress", "red"),  # two garments
            _row(),  # empty, so no garment and no colour either
            _row("red"),  # no garment
            _row("trousers", "blue", "striped", "belt"),  # fine
            _row("dress", "green", "yellow", "long_sleeves"),  # two colours
        ]
    )
    figures = structure(y, CLASSES)
    assert figures["labels_per_image"] == pytest.approx((2 + 3 + 0 + 1 + 4 + 4) / 6)
    assert figures["empty_share"] == pytest.approx(1 / 6)
    assert figures["violation_rate"] == pytest.approx(4 / 6)
    # Only the structure groups count: patterns, sleeves and belts may come in any number.
    assert structure(np.array([_row("top", "red", "striped", "dotted", "long_sleeves", "short_sleeves")]),
                     CLASSES)["violation_rate"] == 0.0
    # Any order of the classes: the groups are found by name.
    reordered = CLASSES[::-1]
    assert structure(y[:, ::-1], reordered) == figures


def test_structure_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="shape"):
        structure(np.zeros((2, 3)), CLASSES)
    with pytest.raises(ValueError, match="not among the classes"):
        structure(np.zeros((2, 2)), ["top", "red"])
    with pytest.raises(ValueError, match="no predictions"):
        structure(np.zeros((0, len(CLASSES))), CLASSES)


def test_structure_of_the_demo_truth_has_the_true_count_and_no_violation():
    rng = np.random.default_rng(3)
    truth = np.array([[labels[c] for c in CLASSES] for labels in (_sample_labels(rng) for _ in range(200))])
    figures = structure(truth, CLASSES)
    assert figures["labels_per_image"] == pytest.approx(truth.sum() / len(truth))
    assert figures["empty_share"] == 0.0 and figures["violation_rate"] == 0.0


def test_structure_without_groups_has_no_violation_rate():
    y = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]])
    assert structure(y, ["a", "b", "c"], None) == {"labels_per_image": pytest.approx(5 / 3),
                                                   "empty_share": pytest.approx(1 / 3), "violation_rate": None}


def test_spread_is_mean_sample_std_min_max():
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([0.25]) == {"mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25, "n": 1}
    assert spread([None, None]) is None  # a figure the data has no use for


def test_config_refuses_unknown_heads_and_no_seeds():
    with pytest.raises(ValueError, match="unknown head"):
        HeadsBenchConfig(heads=("sigmoid", "transformer"))
    with pytest.raises(ValueError, match="seed"):
        HeadsBenchConfig(seeds=())
    with pytest.raises(ValueError, match="data kind"):
        HeadsBenchConfig(data="cifar")
    with pytest.raises(ValueError, match="n-classes"):
        HeadsBenchConfig(data="shapes", n_classes=len(SHAPES) + 1)


# --- a tiny end-to-end run -------------------------------------------------------------------------------------------


def _tiny_cnn(include_top=False, weights=None, input_shape=None):
    """A small colour and shape detector with a BatchNormalization (so --weights none estimates statistics)."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(12, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    return keras.Model(inputs, x, name=TINY)


@pytest.fixture(scope="module")
def tiny_backbone():
    registry.BACKBONES[TINY] = registry.Backbone(TINY, _tiny_cnn, min_input_size=16)
    yield TINY
    registry.BACKBONES.pop(TINY, None)


def _argv(work, json_path):
    return ["--work", str(work), "--backbone", TINY, "--image-size", "48", "--n-train", "40", "--n-test", "16",
            "--min-side", "96", "--max-side", "160", "--frozen-epochs", "1", "--epochs", "2", "--seeds", "0",
            "--devices", "1", "--batch-size", "8", "--lr", "1e-2", "--finetune-lr", "3e-3", "--rnn-units", "16",
            "--label-embedding", "8", "--json", str(json_path)]


@pytest.fixture(scope="module")
def tiny_bench(tiny_backbone, tmp_path_factory):
    work = tmp_path_factory.mktemp("heads-bench")
    outputs = []
    for call in range(2):  # the second call must reuse the finished runs
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(_argv(work, work / f"result{call}.json")) == 0
        outputs.append((buffer.getvalue(), json.loads((work / f"result{call}.json").read_text())))
    return work, outputs


def _table_rows(stdout: str) -> list[list[str]]:
    """The body rows of the printed Markdown tables (per-run rows first, then the summary), cells stripped."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith(("| head", "| ---")):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _assert_cell(text: str, value: float, scale: float = 1.0):
    """A printed number is the JSON value rounded to the printed digits (half a unit of the last digit at most)."""
    assert math.isfinite(value)
    assert abs(float(text) - value / scale) <= 0.5 * 10 ** -_decimals(text) + 1e-9, (text, value)


def _assert_tables_print_the_json(stdout: str, result: dict, not_applicable: tuple[str, ...] = ()):
    """The printed tables of a one-seed sigmoid + lstm run are its JSON figures; the `not_applicable` columns are
    None in the JSON and "n/a" in the tables, the others numbers."""
    rows = _table_rows(stdout)
    runs, summary = result["runs"], result["summary"]
    assert [r["head"] for r in runs] == ["sigmoid", "lstm"] and list(summary) == ["sigmoid", "lstm"]
    assert len(rows) == len(runs) + len(summary)
    for printed, run in zip(rows[: len(runs)], runs, strict=True):
        assert printed[:2] == [{"sigmoid": "sigmoid", "lstm": "rnn (lstm)"}[run["head"]], str(run["seed"])]
        for text, (key, _, fmt) in zip(printed[2:], COLUMNS, strict=True):
            if key in not_applicable:
                assert run[key] is None and text == "n/a", (key, run[key], text)
            else:
                _assert_cell(text, run[key], 1e6 if fmt == "params" else 1.0)
    for printed, (head, figures) in zip(rows[len(runs):], summary.items(), strict=True):
        assert printed[1] == "1"
        for text, (key, _, fmt) in zip(printed[2:], COLUMNS, strict=True):
            if key in not_applicable:
                assert figures[key] is None and text == "n/a", (key, figures[key], text)
                continue
            mean, std = text.split(" ± ")
            one = next(r for r in runs if r["head"] == head)
            assert figures[key]["mean"] == one[key] and figures[key]["std"] == 0.0  # one seed: the run's value
            _assert_cell(mean, figures[key]["mean"], 1e6 if fmt == "params" else 1.0)
            assert float(std) == 0.0


@pytest.mark.slow  # trains tiny runs of both heads (about a minute on a busy machine)
def test_tables_print_the_json_figures(tiny_bench):
    work, outputs = tiny_bench
    stdout, result = outputs[0]
    _assert_tables_print_the_json(stdout, result)
    assert "n/a" not in stdout  # the demo's structure figures all apply
    # The tables are also written to the work folder, exactly as printed (by the last call).
    assert (work / "heads.md").read_text().strip() in outputs[-1][0]


@pytest.mark.slow  # trains tiny runs of both heads (about a minute on a busy machine)
def test_data_is_the_demo_lists_as_a_crawl_leaves_them(tiny_bench):
    work, outputs = tiny_bench
    result = outputs[0][1]
    train, test = mf.read_data_dir(result["data"]["train_dir"]), mf.read_data_dir(result["data"]["test_dir"])
    assert train.classes == CLASSES and test.classes == CLASSES
    assert len(train.manifest) == 40 and len(test.manifest) == 16 and len(test.failed) == 0
    # The generated list's three broken entries are failures with the crawl's reasons, not stored images.
    assert sorted(train.failed["reason"]) == ["corrupt", "http_404", "not_image"]
    assert train.missing_ids == ["broken_404", "broken_corrupt", "broken_html"]
    truth = test.labels()
    assert result["data"]["truth"] == structure(truth, CLASSES)
    assert result["data"]["truth"]["violation_rate"] == 0.0 and result["data"]["truth"]["empty_share"] == 0.0
    for run in result["runs"]:
        # Mean labels per image of the truth is the true count.
        assert run["true_labels_per_image"] == pytest.approx(truth.sum() / len(truth))
        assert run["test_images"] == 16


@pytest.mark.slow  # trains tiny runs of both heads (about a minute on a busy machine)
def test_runs_share_everything_but_the_head_and_agree_with_predict_evaluate(tiny_bench):
    work, outputs = tiny_bench
    result = outputs[0][1]
    sigmoid, lstm = result["runs"]
    cfg = {}
    for run in (sigmoid, lstm):
        record = json.loads((work / "runs" / run_name(HeadsBenchConfig(backbone=TINY, image_size=48), run["head"], 0)
                             / "config.json").read_text())
        cfg[run["head"]] = record
        # Both figures of the table come from the library: `predict evaluate` on the same run and data agrees.
        for threshold, key in (("0.5", "f2_at_0.5"), ("tuned", "f2_at_tuned")):
            report = evaluate(EvaluateConfig(runs=(run["run_dir"],), data=result["data"]["test_dir"],
                                             threshold=threshold, progress=False))
            assert report["map"] == pytest.approx(run["map"], abs=1e-12)
            assert report["f2"] == pytest.approx(run[key], abs=1e-12)
        assert run["params"] > 0 and run["predict_images_per_second"] > 0
        assert run["train_images_per_second_stage1"] > 0 and run["train_images_per_second_stage2"] > 0
    assert cfg["sigmoid"].get("head", {"name": "sigmoid"}) == {"name": "sigmoid"}
    assert cfg["lstm"]["head"]["name"] == "rnn" and cfg["lstm"]["head"]["cell"] == "lstm"
    rnn_only = ("head", "rnn_cell", "rnn_units", "label_embedding", "label_order")
    same = {k: v for k, v in cfg["sigmoid"]["train"].items() if k not in ("out", *rnn_only)}
    assert same == {k: v for k, v in cfg["lstm"]["train"].items() if k in same}
    assert cfg["sigmoid"]["train"]["weights"] == "none" and cfg["sigmoid"]["image_size"] == 48
    assert lstm["params"] > sigmoid["params"]  # the decoder's weights on top of the same backbone
    # Every training image has a label, so the decoder never decodes the empty set.
    assert lstm["empty_share_at_0.5"] == 0.0


@pytest.mark.slow  # trains tiny runs of both heads (about a minute on a busy machine)
def test_second_call_reuses_the_finished_runs_and_scores_them_alike(tiny_bench):
    _, outputs = tiny_bench
    first, second = outputs[0][1], outputs[1][1]
    assert [r.get("reused") for r in first["runs"]] == [False, False]
    assert [r.get("reused") for r in second["runs"]] == [True, True]
    timing = ("predict_images_per_second",)
    for a, b in zip(first["runs"], second["runs"], strict=True):
        assert {k: v for k, v in a.items() if k not in (*timing, "reused")} == \
               {k: v for k, v in b.items() if k not in (*timing, "reused")}


# --- a tiny --data shapes run, in the demo run's work folder -------------------------------------------------------

STRUCTURE_COLUMNS = ("violation_rate_at_0.5", "violation_rate_at_tuned")


@pytest.fixture(scope="module")
def tiny_shapes(tiny_bench):
    work, _ = tiny_bench
    demo_runs = sorted(p.name for p in (work / "runs").iterdir())
    demo_table = (work / "heads.md").read_text()
    outputs = []
    for call in range(2):  # the second call must reuse the finished shapes runs
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            argv = [*_argv(work, work / f"shapes{call}.json"), "--data", "shapes", "--n-classes", "4"]
            assert main(argv) == 0
        outputs.append((buffer.getvalue(), json.loads((work / f"shapes{call}.json").read_text())))
    return work, outputs, demo_runs, demo_table


@pytest.mark.slow  # trains tiny runs of both heads (about a minute on a busy machine)
def test_shapes_run_has_no_structure_columns_and_its_tables_equal_its_json(tiny_shapes):
    work, outputs, demo_runs, demo_table = tiny_shapes
    stdout, result = outputs[0]
    _assert_tables_print_the_json(stdout, result, not_applicable=STRUCTURE_COLUMNS)
    assert "shapes data (4 independent classes, 128 px)" in stdout  # (96 + 160) // 2
    assert result["data"]["kind"] == "shapes" and result["config"]["data"] == "shapes"
    assert result["data"]["truth"]["violation_rate"] is None
    # The data: tests.datagen's shapes, train and test drawn apart, every image labelled (as on the demo).
    train, test = mf.read_data_dir(result["data"]["train_dir"]), mf.read_data_dir(result["data"]["test_dir"])
    assert train.classes == test.classes == result["data"]["classes"] == list(SHAPES)[:4]
    assert len(train.manifest) == 40 and len(test.manifest) == 16 and len(train.failed) == len(test.failed) == 0
    assert not set(train.manifest["id"]) & set(test.manifest["id"])
    assert (train.labels().sum(axis=1) > 0).all() and (test.labels().sum(axis=1) > 0).all()
    assert set(train.manifest["width"]) == set(train.manifest["height"]) == {128}
    truth = test.labels()
    assert result["data"]["truth"]["empty_share"] == 0.0
    for run in result["runs"]:
        assert run["true_labels_per_image"] == pytest.approx(truth.sum() / len(truth))
        assert run["test_images"] == 16 and run["params"] > 0 and run["predict_images_per_second"] > 0
        assert 0.0 <= run["map"] <= 1.0 and 0.0 <= run["f2_at_tuned"] <= 1.0
    assert result["runs"][1]["empty_share_at_0.5"] == 0.0  # every training image labelled: no empty set decoded
    # Its runs and table are under work/shapes; the demo's are where they were, untouched.
    shapes_cfg = HeadsBenchConfig(backbone=TINY, image_size=48, data="shapes")
    for run in result["runs"]:
        assert run["run_dir"] == str(work / "shapes" / "runs" / run_name(shapes_cfg, run["head"], 0))
    assert sorted(p.name for p in (work / "runs").iterdir()) == demo_runs
    assert (work / "heads.md").read_text() == demo_table
    assert (work / "shapes" / "heads.md").read_text().strip() in outputs[-1][0]


@pytest.mark.slow  # trains tiny runs of both heads (about a minute on a busy machine)
def test_second_shapes_call_reuses_its_runs(tiny_shapes):
    _, outputs, _, _ = tiny_shapes
    first, second = outputs[0][1], outputs[1][1]
    assert [r["reused"] for r in first["runs"]] == [False, False]
    assert [r["reused"] for r in second["runs"]] == [True, True]
    for a, b in zip(first["runs"], second["runs"], strict=True):
        assert {k: v for k, v in a.items() if k not in ("predict_images_per_second", "reused")} == \
               {k: v for k, v in b.items() if k not in ("predict_images_per_second", "reused")}
