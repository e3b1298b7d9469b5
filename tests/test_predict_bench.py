"""The prediction benchmark runs end to end on a tiny setting and reports consistent figures (slow: builds Xception)."""

from __future__ import annotations

import pytest

from bench.predict import PredictBenchConfig, report, run_benchmark


@pytest.mark.slow
def test_bench_predict_tiny(tmp_path):
    config = PredictBenchConfig(images=6, image_size=75, batch_size=3, width=120, height=160, tta=2, rounds=1, workdir=tmp_path)
    f = run_benchmark(config)
    assert f["backbone"] == "xception" and f["images"] == 6 and f["tta"] == 2
    assert f["cost_ratio"] == pytest.approx(f["predict_seconds_tta2"] / f["predict_seconds_tta1"])
    assert f["predict_images_per_second_tta1"] == pytest.approx(6 / f["predict_seconds_tta1"])
    assert all(f[k] > 0 for k in ("model_images_per_second_1_view", "pipeline_images_per_second_tta2", "expected_seconds"))
    assert len(list((tmp_path / "data" / "images").glob("*.jpg"))) == 6 and (tmp_path / "run" / "model.keras").is_file()
    text = report(f)
    assert "tta 2" in text and "measured/expected" in text
