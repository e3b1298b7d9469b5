"""The prediction benchmark: what it prints is what it writes, its timed passes are `predict_run`'s own predictions,
and its expected-cost model is built from the parts it measured (the run is slow: it builds Xception)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import bench.predict as bench_predict
from bench.predict import PredictBenchConfig, PredictBenchResult, report, run_benchmark, work_folder
from crawl.manifest import read_data_dir
from predict.inference import predict_run
from predict.runs import load_run
from train.data import load_image
from train.preprocess import preprocess

# Figures of a made-up run with --tta 4, as run_benchmark returns them.
FIGURES = {
    "backbone": "xception", "image_size": 150, "images": 200, "width": 500, "height": 700, "batch_size": 16,
    "rounds": 2, "tta": 4, "cpu_count": 2,
    "pipeline_seconds_tta1": 2.0, "pipeline_seconds_tta4": 2.5,
    "model_seconds_per_image_1_view": 0.02, "model_seconds_per_image_4_views": 0.075,
    "pipeline_images_per_second_tta1": 100.0, "pipeline_images_per_second_tta4": 80.0,
    "model_images_per_second_1_view": 50.0, "model_images_per_second_4_views": 13.333333333333334,
    "model_cost_ratio": 3.75,
    "predict_images_per_second_tta1": 31.25, "predict_images_per_second_tta4": 9.765625,
    "predict_seconds_tta1": 6.4, "predict_seconds_tta4": 20.48,
    "cost_ratio": 3.2, "expected_seconds": 18.0, "measured_over_expected": 1.1377777777777778,
}


def test_report_is_the_figures_table():
    assert report(FIGURES).splitlines() == [
        "prediction benchmark: xception at 150 px, 200 JPEGs ~500x700, batch 16 (images/s count source images: "
        "with tta 4 each one is 4 model inputs)",
        "                                         tta 1       tta 4    ratio",
        "predict (end to end), images/s           31.25        9.77     3.20",
        "model alone, images/s                    50.00       13.33     3.75",
        "input pipeline alone, images/s          100.00       80.00",
        "tta 4 took 20.5s against 18.0s expected (decode once + 4 x model per view): measured/expected = 1.14",
    ]


def test_main_prints_the_report_and_writes_the_same_figures(tmp_path, monkeypatch, capsys):
    configs = []

    def fake(config):
        configs.append(config)
        return PredictBenchResult(figures=FIGURES, predictions={})

    monkeypatch.setattr(bench_predict, "run_benchmark", fake)
    out = tmp_path / "figures.json"
    assert bench_predict.main(["--images", "6", "--tta", "4", "--rounds", "1", "--json", str(out)]) == 0
    assert configs == [PredictBenchConfig(images=6, tta=4, rounds=1)]
    assert capsys.readouterr().out == report(FIGURES) + "\n"
    assert json.loads(out.read_text()) == FIGURES


@pytest.mark.slow
def test_bench_predict_times_the_real_prediction(tmp_path):
    config = PredictBenchConfig(images=6, image_size=75, batch_size=4, width=120, height=160, tta=2, rounds=1,
                                workdir=tmp_path)
    result = run_benchmark(config)
    f = result.figures
    assert {k: f[k] for k in ("backbone", "image_size", "images", "width", "height", "batch_size", "tta")} == {
        "backbone": "xception", "image_size": 75, "images": 6, "width": 120, "height": 160, "batch_size": 4, "tta": 2,
    }
    # The timed passes are what prediction computes: the RUN_DIR it wrote, loaded afresh, gives the same
    # probabilities for both view counts (6 images in batches of 4: a full and a partial batch).
    paths = read_data_dir(tmp_path / "data").image_paths()
    assert len(paths) == 6
    run = load_run(tmp_path / "run")
    for views in (1, 2):
        timed = result.predictions[views]
        assert timed.tta == views and timed.readable.all() and timed.probabilities.shape == (6, len(run.classes))
        fresh = predict_run(run, paths, tta=views, batch_size=4, progress=False).probabilities
        np.testing.assert_array_equal(timed.probabilities, fresh)
    # With 2 views: the mean of the model's scores on each image and on its mirror (an untrained model scores near
    # 0.5, but the two views still differ).
    images = tf.stack([load_image(tf.constant(p), 75)[0] for p in paths])
    plain, mirrored = (np.asarray(run.model.predict_on_batch(preprocess(x, run.preprocessing)), np.float64)
                       for x in (images, images[:, :, ::-1]))
    np.testing.assert_allclose(result.predictions[2].probabilities, (plain + mirrored) / 2, rtol=0, atol=1e-7)
    assert not np.array_equal(result.predictions[2].probabilities, result.predictions[1].probabilities)
    # The figures come from those passes and from the measured parts, with one round: nothing else.
    assert f["predict_seconds_tta1"] == result.predictions[1].seconds
    assert f["predict_seconds_tta2"] == result.predictions[2].seconds
    assert f["expected_seconds"] == f["pipeline_seconds_tta1"] + 2 * f["model_seconds_per_image_1_view"] * 6
    assert f["measured_over_expected"] == f["predict_seconds_tta2"] / f["expected_seconds"]


def test_work_folder_is_kept_when_named_and_temporary_otherwise(tmp_path):
    with work_folder(None, "bench_test_") as temporary:
        (temporary / "made").write_text("x")
        assert temporary.name.startswith("bench_test_") and temporary.is_dir()
    assert not temporary.exists()
    with work_folder(tmp_path / "kept", "bench_test_") as kept:
        kept.mkdir()
        (kept / "made").write_text("x")
    assert kept == tmp_path / "kept" and (kept / "made").read_text() == "x"
