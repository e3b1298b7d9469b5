"""bench.pipeline on a tiny workload: every series is measured and the ratios are the best-round ratios."""

from __future__ import annotations

import importlib.util

import pytest

from bench.pipeline import main

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")


def test_pipeline_bench_reports_consistent_figures(tmp_path, capsys):
    figures = main(["--images", "20", "--image-size", "48", "--batch-size", "8", "--rounds", "2",
                    "--legacy-images", "8", "--skip-train", "--workdir", str(tmp_path)])
    assert len(list(tmp_path.glob("*.jpg"))) == 20
    r = figures["input"]
    series = ["ceiling", "pipeline", "pipeline_no_augment"]
    if importlib.util.find_spec("tf_keras") is not None:
        series.append("legacy")
    for name in series:
        assert r[name]["images_per_second"] >= r[name]["images_per_second_median"] > 0
        assert r[name]["cpu_ms_per_image"] > 0
    assert r["pipeline_vs_ceiling"] == pytest.approx(r["pipeline"]["images_per_second"] / r["ceiling"]["images_per_second"])
    if "legacy" in series:
        assert r["pipeline_vs_legacy"] == pytest.approx(r["pipeline"]["images_per_second"] / r["legacy"]["images_per_second"])
    assert "pipeline / ceiling" in capsys.readouterr().out and "training" not in figures
