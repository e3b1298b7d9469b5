"""bench.tag: its figures are quotients of the seconds it recorded, each ratio rounded once when printed; a tiny real
run times `predict tag`'s own probabilities; the timm child tags files; the accuracy subcommand scores copies."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import bench.tag as bench_tag
from bench.tag import (
    AccuracyConfig,
    TagBenchConfig,
    accuracy_of_run,
    accuracy_report,
    bf16_unavailable,
    rates,
    ratio_rows,
    report,
)
from predict.evaluate import EvaluateConfig, evaluate
from train import rundir

SECONDS = {  # a made-up measurement: 64 images at tta 1, 32 at tta 8, three rounds
    "1": {"keras": [4.0, 5.0, 6.0], "openvino-f32": [3.2, 2.56, 4.0], "timm-f32": [8.0, 6.4, 5.0]},
    "8": {"keras": [16.0, 20.0, 25.6], "openvino-f32": [12.8, 10.0, 16.0], "timm-f32": [32.0, 40.0, 20.0]},
}
IMAGES = {"1": 64, "8": 32}
SKIPPED = {"openvino-bf16": "no bfloat16 on this CPU (--precision bf16: ...)", "timm-bf16": "no bfloat16 on this CPU"}


def figures() -> dict:
    per_tta = {
        t: {
            "images": IMAGES[t],
            "seconds": s,
            "images_per_second": {name: rates(IMAGES[t], v) for name, v in s.items()},
            "max_abs_diff_vs_keras": {"keras": 0.0, "openvino-f32": 6e-08},
        }
        for t, s in SECONDS.items()
    }
    config = {"backbones": ["xception"], "setups": ["keras", "openvino-f32", "openvino-bf16", "timm-f32", "timm-bf16"],
              "images": 64, "tta_images": 32, "ttas": [1, 8], "image_size": 299, "batch_size": 16, "width": 500,
              "height": 700, "rounds": 3, "bf16": "auto", "workers": 2, "threads": 2, "seed": 0}
    return {
        "config": config,
        "cpu_count": 2,
        "versions": {},
        "backbones": [{
            "backbone": "xception", "timm_model": "legacy_xception", "timm_versions": None, "skipped": SKIPPED,
            "load_average": {"start": [3.25, 2.0, 1.0], "end": [4.0, 2.0, 1.0]}, "tta": per_tta,
            "ratios": ratio_rows(per_tta),
        }],
    }


def test_rates_and_ratios_are_quotients_of_the_recorded_seconds():
    assert rates(64, [4.0, 5.0, 6.0]) == {"best": 16.0, "median": 12.8}
    f = figures()["backbones"][0]
    ips = f["tta"]["1"]["images_per_second"]
    assert ips["openvino-f32"] == {"best": pytest.approx(25.0), "median": pytest.approx(20.0)}
    rows = {(r["tta"], r["numerator"], r["denominator"]): r for r in f["ratios"]}
    # Only pairs whose two setups were measured; the bf16 ones were skipped.
    assert sorted(rows) == [(t, a, b) for t in (1, 8) for a, b in
                            sorted([("openvino-f32", "keras"), ("openvino-f32", "timm-f32"), ("keras", "timm-f32")])]
    row = rows[(1, "openvino-f32", "keras")]
    assert row == {"tta": 1, "numerator": "openvino-f32", "denominator": "keras", "target": 1.25,
                   "best": ips["openvino-f32"]["best"] / ips["keras"]["best"],
                   "median": ips["openvino-f32"]["median"] / ips["keras"]["median"], "met_best": True,
                   "met_median": True}
    assert rows[(8, "openvino-f32", "timm-f32")]["median"] == pytest.approx(2.5)
    assert rows[(8, "keras", "timm-f32")]["target"] is None
    assert rows[(8, "keras", "timm-f32")]["met_best"] is None


def test_report_is_the_figures_table_with_each_target_verdict():
    assert report(figures()).splitlines() == [
        "predict tag engines benchmark: 299 px, batch 16, JPEGs ~500x700 (64 at tta 1, 32 at tta 8); 3 alternating "
        "rounds; images/s count source images (best round / median round)",
        "",
        "xception (timm: legacy_xception); load average (1 min) 3.2 at start, 4.0 at end",
        "images/s            tta 1 best   median    tta 8 best   median    max|p-keras| tta 1    max|p-keras| tta 8",
        "keras                    16.00    12.80          2.00     1.60               0.0e+00               0.0e+00",
        "openvino-f32             25.00    20.00          3.20     2.50               6.0e-08               6.0e-08",
        "timm-f32                 12.80    10.00          1.60     1.00                   n/a                   n/a",
        "openvino-bf16   skipped: no bfloat16 on this CPU (--precision bf16: ...)",
        "timm-bf16       skipped: no bfloat16 on this CPU",
        "ratio                             tta 1 best   median    tta 8 best   median",
        "openvino-f32 / keras                    1.56     1.56          1.60     1.56",
        "openvino-f32 / timm-f32                 1.95     2.00          2.00     2.50",
        "keras / timm-f32                        1.25     1.28          1.25     1.60",
        "target openvino-f32 >= 1.25x keras, tta 1: best 1.56x met, median 1.56x met",
        "target openvino-f32 >= 1.25x keras, tta 8: best 1.60x met, median 1.56x met",
        "target openvino-f32 >= 1x timm-f32, tta 1: best 1.95x met, median 2.00x met",
        "target openvino-f32 >= 1x timm-f32, tta 8: best 2.00x met, median 2.50x met",
        "target openvino-bf16 >= 2x keras: not measured (openvino-bf16 skipped)",
        "target openvino-bf16 >= 1.3x timm-bf16: not measured (openvino-bf16, timm-bf16 skipped)",
    ]


def test_main_prints_the_report_and_writes_the_same_figures(tmp_path, monkeypatch, capsys):
    configs = []

    def fake(config, on_backbone):
        configs.append(config)
        on_backbone({"partial": True})  # written at once: a run killed later keeps the backbones measured
        assert json.loads(out.read_text()) == {"partial": True}
        return figures()

    monkeypatch.setattr(bench_tag, "run_benchmark", fake)
    out = tmp_path / "figures.json"
    argv = ["speed", "--backbones", "inception_v4", "--tta", "1,2", "--rounds", "1", "--json", str(out)]
    assert bench_tag.main(argv) == 0
    assert configs == [TagBenchConfig(backbones=("inception_v4",), ttas=(1, 2), rounds=1)]
    assert capsys.readouterr().out == report(figures()) + "\n"
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures()))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(setups=("keras", "tflite")), "--setups: unknown setup(s) ['tflite']"),
        (dict(backbones=("resnet50",)), "--backbones: ['resnet50']; known: xception, inception_v4"),
        (dict(ttas=(1, 1)), "--tta: give distinct view counts"),
        (dict(ttas=(13,)), "--tta must be an integer from 1 to 12"),
        (dict(images=4, tta_images=8), "--tta-images (8) cannot exceed --images (4)"),
        (dict(rounds=0), "--rounds must be positive, got 0"),
        (dict(bf16="yes"), "--bf16 must be one of auto, on"),
    ],
)
def test_bad_settings_are_refused_naming_the_option(options, message):
    with pytest.raises(Exception, match=re.escape(message)):
        TagBenchConfig(**options)


def test_accuracy_report_table():
    fig = {
        "data": "demo_out/data/test_labelled", "tta": 1, "bf16_unavailable": "no BF16",
        "runs": [
            {"run": "runs/a", "skipped": "not finished (no metrics.json, so no tuned thresholds)"},
            {"run": "runs/b", "copy": "w/b", "tta": 1, "images": 80, "reference": "openvino-f32",
             "skipped_setups": {"openvino-bf16": "no BF16"},
             "setups": {
                 name: {"map": m, "f2_at_0.5": f, "f2_tuned": t, "max_abs_diff": d, "mean_abs_diff": d / 10,
                        "flipped_tuned": fl, "map_minus_reference": m - 0.75, "f2_at_0.5_minus_reference": f - 0.5,
                        "f2_tuned_minus_reference": t - 0.625}
                 for name, m, f, t, d, fl in [("openvino-f32", 0.75, 0.5, 0.625, 0.0, 0.0),
                                              ("keras-bf16-emulated", 0.7, 0.5, 0.5, 0.03125, 0.0125)]
             }},
        ],
    }
    assert accuracy_report(fig).splitlines() == [
        "bf16 accuracy cost on demo_out/data/test_labelled (tta 1)",
        "openvino-bf16 cannot run here: no BF16",
        "",
        "runs/a: skipped: not finished (no metrics.json, so no tuned thresholds)",
        "",
        "runs/b (80 images; differences against openvino-f32)",
        "setup                      mAP  F2@0.5 F2@tuned     dmAP  dF2@0.5 dF2@tuned  max|dp| mean|dp|  flipped",
        "openvino-f32            0.7500  0.5000   0.6250  +0.0000  +0.0000   +0.0000  0.0e+00  0.0e+00   0.0000",
        "keras-bf16-emulated     0.7000  0.5000   0.5000  -0.0500  +0.0000   -0.1250  3.1e-02  3.1e-03   0.0125",
        "openvino-bf16         skipped: no BF16",
    ]


def _printed_ratio(out: str, num: str, den: str) -> list[str]:
    [line] = [x for x in out.splitlines() if x.startswith(f"{num} / {den} ")]
    return line.split()[3:]


@pytest.mark.slow
def test_tiny_bench_times_predict_tags_own_probabilities(tmp_path, capsys):
    config = TagBenchConfig(backbones=("xception",), setups=("keras", "openvino-f32", "openvino-bf16"), images=2,
                            tta_images=2, ttas=(1, 2), image_size=75, batch_size=2, width=96, height=120, rounds=2,
                            workdir=tmp_path)
    fig = bench_tag.run_benchmark(config)
    print(report(fig))
    out = capsys.readouterr().out
    [f] = fig["backbones"]
    no_bf16 = bf16_unavailable()
    if no_bf16:
        assert f["skipped"] == {"openvino-bf16": f"no bfloat16 on this CPU ({no_bf16})"}
    for t, images in (("1", 2), ("2", 2)):
        per = f["tta"][t]
        assert per["images"] == images
        for name, seconds in per["seconds"].items():
            assert len(seconds) == 2
            assert per["images_per_second"][name] == rates(images, seconds)
        # The same weights through OpenVINO in f32: Keras's probabilities within 1e-4.
        assert per["max_abs_diff_vs_keras"]["keras"] == 0.0 and per["max_abs_diff_vs_keras"]["openvino-f32"] < 1e-4
    # Each printed ratio is the quotient of the recorded images/s, rounded once.
    ips = {t: f["tta"][t]["images_per_second"] for t in ("1", "2")}
    expected = [f"{ips[t]['openvino-f32'][w] / ips[t]['keras'][w]:.2f}" for t in ("1", "2") for w in ("best", "median")]
    assert _printed_ratio(out, "openvino-f32", "keras") == expected
    row = next(r for r in f["ratios"] if r["tta"] == 2 and r["numerator"] == "openvino-f32")
    verdict = "met" if row["best"] >= 1.25 else "NOT met"
    assert f"target openvino-f32 >= 1.25x keras, tta 2: best {row['best']:.2f}x {verdict}" in out
    # The images are the folder `predict tag` would list: ~width x height JPEGs.
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000.jpg", "00001.jpg"]


@pytest.mark.slow
def test_timm_child_tags_the_files_with_the_views(tmp_path):
    config = TagBenchConfig(images=3, tta_images=3, image_size=75, batch_size=2, workers=1, threads=1)
    paths = bench_tag.make_folder(tmp_path / "images", config)
    child = bench_tag.TimmChild("inception_v4", 5, config)
    try:
        assert set(child.versions) == {"ready", "torch", "timm"}
        _, one = child.tag(paths, 1, "f32")
        seconds, two = child.tag(paths, 2, "f32")
        _, one_bf16 = child.tag(paths[:1], 1, "bf16")
        with pytest.raises(RuntimeError, match="precision must be f32 or bf16, got 'f16'"):
            child.tag(paths, 1, "f16")
        _, again = child.tag(paths, 1, "f32")  # the child keeps serving after a bad request
    finally:
        child.close()
    assert seconds > 0 and one.shape == two.shape == (3, 5) and ((one > 0) & (one < 1)).all()
    np.testing.assert_array_equal(one, again)
    np.testing.assert_allclose(one_bf16, one[:1], atol=0.05)
    assert child.process.returncode == 0


VIEWS_CHILD = """
import json, sys, numpy as np, torch
from bench.tag_timm import apply_view
x = torch.from_numpy(np.load(sys.argv[1])).permute(0, 3, 1, 2)
setup = json.loads(sys.argv[2])
views = [apply_view(x, v, setup["shift_step"], setup["zoom_fraction"]) for v in setup["views"]]
np.save(sys.argv[1], torch.cat(views).permute(0, 2, 3, 1).numpy())
"""


@pytest.mark.slow
def test_timm_child_views_are_predicts_views_pixel_for_pixel(tmp_path):
    from predict.tta import MAX_TTA, TTA_VIEWS, ZOOM_FRACTION, shift_pixels, tta_views

    x = np.random.default_rng(0).integers(0, 256, (2, 33, 33, 3)).astype(np.float32)  # odd: the centre is a pixel
    np.save(tmp_path / "x.npy", x)
    setup = {"shift_step": shift_pixels(33), "zoom_fraction": ZOOM_FRACTION,
             "views": [{"shift": list(v.shift), "zoom": v.zoom, "flip": v.flip} for v in TTA_VIEWS]}
    subprocess.run([sys.executable, "-c", VIEWS_CHILD, str(tmp_path / "x.npy"), json.dumps(setup)], check=True,
                   timeout=600)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.asarray(tta_views(x, MAX_TTA)))


@pytest.mark.slow
def test_accuracy_scores_a_copy_of_each_finished_run(tmp_path, monkeypatch):
    """Every setup, openvino-bf16 included where bf16 is faked (the capability probe says BF16 and the compiled
    precision is not checked back, so OpenVINO really runs f32 there and its figures are exactly f32's)."""
    from predict import engines
    from tests.predict_fixtures import conv_model, make_data_dir, make_run_dir, textured

    monkeypatch.setattr(engines, "openvino_capabilities", lambda: ["FP32", "BF16"])
    monkeypatch.setattr(engines, "check_compiled_precision", lambda compiled, precision: precision)

    classes = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    images = {f"i{k}": textured(k) for k in range(8)}
    labels = {i: rng.integers(0, 2, 3).tolist() for i in images}
    data = make_data_dir(tmp_path / "data", images, classes=classes, labels=labels)
    run = make_run_dir(tmp_path / "runs" / "conv", conv_model(24, n_classes=3, seed=1), classes=classes,
                       thresholds=[0.3, 0.5, 0.7])
    unfinished = make_run_dir(tmp_path / "runs" / "unfinished", conv_model(24, seed=2), classes=classes)
    (unfinished / rundir.METRICS_FILE).unlink()
    before = sorted(p.name for p in run.iterdir())
    config = AccuracyConfig(runs=(run, unfinished), data=data, work=tmp_path / "work",
                            setups=("keras", "openvino-f32", "openvino-bf16", "keras-bf16-emulated"))
    fig = bench_tag.run_accuracy(config)
    assert sorted(p.name for p in run.iterdir()) == before  # the run given is only read: the export went to the copy
    done, skipped = fig["runs"]
    assert skipped == {"run": str(unfinished), "skipped": "not finished (no metrics.json, so no tuned thresholds)"}
    assert done["reference"] == "openvino-f32" and done["images"] == 8
    rows = done["setups"]
    # keras's figures are `predict evaluate`'s, at 0.5 and at the tuned thresholds.
    for threshold, key in (("0.5", "f2_at_0.5"), ("tuned", "f2_tuned")):
        report_ = evaluate(EvaluateConfig(runs=(run,), data=data, threshold=threshold, progress=False))
        assert rows["keras"]["map"] == pytest.approx(report_["map"], abs=1e-12)
        assert rows["keras"][key] == pytest.approx(report_["f2"], abs=1e-12)
    assert rows["keras"]["max_abs_diff"] < 1e-4 and rows["openvino-f32"]["max_abs_diff"] == 0.0
    assert rows["openvino-bf16"] == rows["openvino-f32"] and not done["skipped_setups"]
    assert 0 < rows["keras-bf16-emulated"]["max_abs_diff"] < 0.05  # bfloat16 keeps 8 bits of mantissa
    assert rows["keras-bf16-emulated"]["map_minus_reference"] == rows["keras-bf16-emulated"]["map"] - rows[
        "openvino-f32"]["map"]
    again = accuracy_of_run(run, config)  # the copy is reused (same model.keras), with its export cache
    assert again["setups"] == rows
