"""Slow: the rnn head's decoder exported to every format and run in each runtime, the beam decoder through an engine,
and `--engine openvino|onnx` through submit, evaluate and compare against the keras engine (same outputs)."""

from __future__ import annotations

import csv
import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from predict import engines
from predict.__main__ import main
from predict.errors import PredictError
from predict.export import ExportConfig, export
from predict.inference import predict_ensemble
from predict.runs import load_run, load_runs
from tests.predict_fixtures import (
    CLASSES,
    COLOURS,
    conv_model,
    detector_model,
    make_data_dir,
    make_run_dir,
    solid,
    textured,
)
from train import rundir
from train.preprocess import preprocess
from train.rnn_head import DecoderSpec, decoder_layer

pytestmark = pytest.mark.slow
SIZE = 32
ATOL = 1e-4


def rnn_model(image_size: int, n_classes: int = 3, seed: int = 0) -> keras.Model:
    """A tiny CNN -> RNN tagger (the real TagDecoder, greedy) whose decoded sets differ between images."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="tanh")(x)
    decoder = decoder_layer(n_classes, DecoderSpec(cell="lstm", units=8, embedding_dim=4, allow_empty=True))
    model = keras.Model(inputs, decoder(x))
    kernel, bias = decoder.init_h.get_weights()
    decoder.init_h.set_weights([kernel * 8, bias])  # initial states that differ clearly between images
    return model


def make_rnn_run(root, seed: int = 0):
    run = make_run_dir(root, rnn_model(SIZE, seed=seed))
    record = rundir.read_config(run)
    head = {"name": "rnn", "cell": "lstm", "units": 8, "label_embedding": 4, "label_order": "frequent",
            "class_order": list(CLASSES), "allow_empty": True}
    rundir.write_config(run, dataclasses.replace(record, head=head))
    return run


@pytest.fixture(scope="module")
def rnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("rnn")
    run = make_rnn_run(root / "run", seed=0)
    pixels = np.random.default_rng(1).integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.float32)
    # Stretch the contrast of half the batch so the decoder sees clearly different features.
    pixels[::2] = np.where(pixels[::2] > 127, 255.0, 0.0)
    loaded = load_run(run)
    assert loaded.head == "rnn"
    expected = np.asarray(loaded.model.predict_on_batch(preprocess(pixels, "inception")))
    return dict(root=root, run=run, pixels=pixels, keras=expected)


def test_rnn_test_model_decodes_different_sets(rnn):
    emitted = {tuple(row) for row in (rnn["keras"] >= 0.5).astype(int)}
    # Several sets, some of two or three tags: the exported loop runs different numbers of steps per image.
    assert len(emitted) >= 3 and max(sum(e) for e in emitted) >= 2


@pytest.mark.parametrize("fmt", ["saved_model", "onnx", "openvino"])
def test_rnn_greedy_decoder_exports_to_every_format(rnn, fmt):
    out = export(ExportConfig(run=rnn["run"], format=fmt, out=rnn["root"] / fmt)).out
    tagger = json.loads((out / "tagger.json").read_text())
    assert tagger["head"]["name"] == "rnn" and tagger["decoder"] == "greedy"
    pixels = rnn["pixels"]
    if fmt == "saved_model":
        loaded = tf.saved_model.load(str(out / "saved_model"))  # kept: its variables live as long as it does
        got = loaded.serve(tf.constant(pixels)).numpy()
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": pixels})[0]
    else:
        import openvino as ov

        compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        got = compiled(pixels)[0]
    np.testing.assert_allclose(got, rnn["keras"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(got >= 0.5, rnn["keras"] >= 0.5)  # the same decoded sets


def test_rnn_beam_decoder_through_an_engine(rnn, tmp_path):
    data = make_data_dir(tmp_path / "data", {f"i{k}": textured(k) for k in range(6)})
    paths = [str(p) for p in sorted((data / "images").iterdir())]
    expected = predict_ensemble(load_runs([rnn["run"]], beam=2), paths, tta=2, progress=False).probabilities
    runs = load_runs([rnn["run"]], beam=2, engine="onnx")
    got = predict_ensemble(runs, paths, tta=2, progress=False).probabilities
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert sorted(p.name.rsplit("-", 1)[0] for p in (rnn["run"] / rundir.ENGINES_DIR).iterdir()) == ["onnx-beam2"]


# --- submit, evaluate and compare ---------------------------------------------------------------------------------

OFF_A, ON_A = [0.1, 0.25, 0.4], [0.9, 0.8, 0.65]
OFF_B, ON_B = [0.3, 0.05, 0.2], [0.7, 0.95, 0.6]
LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    colours = list(COLOURS)
    ids = [f"id{k}" for k in range(len(colours) + 2)]  # the last two failed to crawl
    gaps = make_data_dir(root / "gaps", {i: solid(c) for i, c in zip(ids, colours, strict=False)}, list_ids=ids)
    a = make_run_dir(root / "a", detector_model(24, OFF_A, ON_A), thresholds=[0.15, 0.1, 0.6],
                     prevalence=[0.125, 0.5, 0.25])
    b = make_run_dir(root / "b", detector_model(20, OFF_B, ON_B, preprocessing="raw"), preprocessing="raw",
                     thresholds=[0.35, 0.3, 0.8], prevalence=[0.375, 0.25, 0.75])  # tuned: 0.25, 0.2, 0.7
    rng = np.random.default_rng(7)
    labels = {f"t{k}": [int(v) for v in rng.integers(0, 2, 3)] for k in range(12)}
    labelled = make_data_dir(root / "labelled", {i: textured(k) for k, i in enumerate(labels)}, classes=LABELS,
                             labels=labels)
    c1 = make_run_dir(root / "c1", conv_model(SIZE, seed=1), classes=LABELS, thresholds=[0.4, 0.5, 0.6])
    c2 = make_run_dir(root / "c2", conv_model(SIZE + 8, seed=2), classes=LABELS, preprocessing="raw",
                      thresholds=[0.45, 0.5, 0.55])
    return dict(root=root, gaps=gaps, a=a, b=b, labelled=labelled, c1=c1, c2=c2)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_submit_with_the_openvino_engine(world, tmp_path):
    """An ensemble of two runs (sizes and preprocessing differ), TTA 2, tuned thresholds, ids without an image."""
    outputs = {}
    for engine in ("keras", "openvino"):
        for fmt in ("proba", "jd"):
            out = tmp_path / f"{engine}_{fmt}.csv"
            code = main(["submit", str(world["a"]), str(world["b"]), "--data", str(world["gaps"]), "--out", str(out),
                         "--tta", "2", "--threshold", "tuned", "--format", fmt, "--missing", "fill",
                         "--engine", engine, "--no-progress"])
            assert code == 0
            outputs[engine, fmt] = out
    assert outputs["keras", "jd"].read_bytes() == outputs["openvino", "jd"].read_bytes()
    keras_rows, ov_rows = _rows(outputs["keras", "proba"]), _rows(outputs["openvino", "proba"])
    assert [r[0] for r in ov_rows] == [r[0] for r in keras_rows] and ov_rows[0] == keras_rows[0]
    np.testing.assert_allclose(np.array([r[1:] for r in ov_rows[1:]], float),
                               np.array([r[1:] for r in keras_rows[1:]], float), rtol=0, atol=2e-6)
    assert ov_rows[-1][1:] == keras_rows[-1][1:] == ["0.250000", "0.375000", "0.500000"]  # filled: prevalence
    for run in (world["a"], world["b"]):
        assert [p.name.split("-")[0] for p in (run / rundir.ENGINES_DIR).iterdir()] == ["openvino"]


def test_evaluate_with_the_onnx_engine(world, tmp_path):
    reports = {}
    for engine in ("keras", "onnx"):
        out = tmp_path / f"{engine}.json"
        assert main(["evaluate", str(world["c1"]), str(world["c2"]), "--data", str(world["labelled"]), "--tta", "3",
                     "--threshold", "tuned", "--engine", engine, "--out", str(out), "--no-progress"]) == 0
        reports[engine] = json.loads(out.read_text())
    keras_report, onnx_report = reports["keras"], reports["onnx"]
    assert (onnx_report["engine"], onnx_report["precision"], keras_report["engine"]) == ("onnx", "f32", "keras")
    assert onnx_report["map"] == pytest.approx(keras_report["map"], abs=1e-9)
    assert onnx_report["f2"] == pytest.approx(keras_report["f2"], abs=1e-9)
    assert onnx_report["per_class"] == keras_report["per_class"]
    ignored = {"engine", "precision", "images_per_second", "map", "f2", "per_class"}
    assert {k: v for k, v in onnx_report.items() if k not in ignored} == {
        k: v for k, v in keras_report.items() if k not in ignored}


def test_compare_with_the_openvino_engine(world, tmp_path):
    tables = {}
    for engine in ("keras", "openvino"):
        out = tmp_path / engine
        assert main(["compare", str(world["c1"]), str(world["c2"]), "--data", str(world["labelled"]), "--tta", "2",
                     "--engine", engine, "--out", str(out), "--no-progress"]) == 0
        tables[engine] = _rows(out / "compare.csv")
        assert f"engine {engine} f32" in (out / "compare.md").read_text()
    keras_table, ov_table = tables["keras"], tables["openvino"]
    assert ov_table[0] == keras_table[0]
    speed = keras_table[0].index("images_per_second")
    for ov_row, keras_row in zip(ov_table[1:], keras_table[1:], strict=True):
        for column, (got, expected) in enumerate(zip(ov_row, keras_row, strict=True)):
            if column == speed:
                continue
            if column >= keras_table[0].index("map"):
                assert float(got) == pytest.approx(float(expected), abs=1e-9)
            else:
                assert got == expected


def test_load_runs_refuses_bf16_before_reading_a_run(monkeypatch, tmp_path):
    """The Python API checks --engine/--precision up front: bf16 on a CPU without bfloat16 is refused by name before
    any RUN_DIR is read (here a missing one, which would otherwise be the error)."""
    monkeypatch.setattr(engines, "openvino_capabilities", lambda: ["FP32", "INT8"])
    with pytest.raises(PredictError, match="this CPU has no bfloat16 support .*FP32, INT8"):
        load_runs([tmp_path / "missing"], engine="openvino", precision="bf16")
    with pytest.raises(PredictError, match="--precision bf16 needs --engine openvino"):
        load_runs([tmp_path / "missing"], engine="onnx", precision="bf16")
    with pytest.raises(PredictError, match="--engine must be one of"):
        load_runs([tmp_path / "missing"], engine="tensorrt")
