"""Export (`python -m predict export`) and the openvino/onnx engines: each format loaded in its own runtime against
Keras, tagger.json, atomic output, the engine cache in the RUN_DIR and its invalidation, precision checks and their
messages. The rnn-head exports and the engines through submit/evaluate/compare are in the slow set."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from predict import engines
from predict.__main__ import main, parse_args
from predict.engines import OpenVINOScorer, check_compiled_precision, check_precision
from predict.errors import PredictError
from predict.evaluate import EvaluateConfig
from predict.export import TAGGER_FILE, ExportConfig, export, export_run, serving_model
from predict.inference import predict_ensemble
from predict.runs import load_run, load_runs
from predict.submission import SubmitConfig
from tests.predict_fixtures import CLASSES, conv_model, make_data_dir, make_run_dir, textured
from train import rundir
from train.data import resize_rule
from train.preprocess import PREPROCESSING, preprocess
from train.rundir import ENGINES_DIR

SIZE = 32
TUNED = [0.3, 0.45, 0.6]
ATOL = 1e-4


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    """Whole-valued float32 RGB pixels 0..255, as the decoder delivers them."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


def _keras_scores(run_dir: Path, pixels: np.ndarray) -> np.ndarray:
    run = load_run(run_dir)
    return np.asarray(run.model.predict_on_batch(preprocess(pixels, run.preprocessing)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny sigmoid run, exported once per format."""
    root = tmp_path_factory.mktemp("export")
    run = make_run_dir(root / "run", conv_model(SIZE, seed=3), thresholds=TUNED)
    exports = {fmt: export(ExportConfig(run=run, format=fmt, out=root / fmt)).out
               for fmt in ("saved_model", "onnx", "openvino")}
    pixels = _pixels(5)
    return dict(root=root, run=run, exports=exports, pixels=pixels, keras=_keras_scores(run, pixels))


def test_serving_model_is_preprocess_then_model(tiny):
    loaded = load_run(tiny["run"])
    pixels = _pixels(4, seed=2)
    for mode in sorted(PREPROCESSING):
        run = dataclasses.replace(loaded, config=dataclasses.replace(
            loaded.config, backbone={**loaded.config.backbone, "preprocessing": mode}))
        expected = run.model.predict_on_batch(preprocess(pixels, mode))
        np.testing.assert_allclose(serving_model(run).predict_on_batch(pixels), expected, rtol=0, atol=1e-6)


def test_saved_model_in_tensorflow(tiny):
    loaded = tf.saved_model.load(str(tiny["exports"]["saved_model"] / "saved_model"))
    for n in (5, 1):  # the batch dimension is dynamic
        got = loaded.serve(tf.constant(tiny["pixels"][:n])).numpy()
        np.testing.assert_allclose(got, tiny["keras"][:n], rtol=0, atol=ATOL)


def test_onnx_in_onnxruntime(tiny):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tiny["exports"]["onnx"] / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [SIZE, SIZE, 3] and inp.type == "tensor(float)"
    for n in (5, 2):
        got = session.run(None, {"image": tiny["pixels"][:n]})[0]
        np.testing.assert_allclose(got, tiny["keras"][:n], rtol=0, atol=ATOL)


def test_openvino_in_openvino_at_f32(tiny):
    import openvino as ov

    compiled = ov.Core().compile_model(str(tiny["exports"]["openvino"] / "model.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert (tiny["exports"]["openvino"] / "model.bin").is_file()
    np.testing.assert_allclose(compiled(tiny["pixels"])[0], tiny["keras"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(OpenVINOScorer(tiny["exports"]["openvino"] / "model.xml")(tiny["pixels"][:3]),
                               tiny["keras"][:3], rtol=0, atol=ATOL)


def test_tagger_json(tiny):
    run = tiny["run"]
    for fmt, folder in tiny["exports"].items():
        tagger = json.loads((folder / TAGGER_FILE).read_text())
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            {"saved_model": ["saved_model", TAGGER_FILE], "onnx": ["model.onnx", TAGGER_FILE],
             "openvino": ["model.bin", "model.xml", TAGGER_FILE]}[fmt])
        assert tagger["format"] == fmt and tagger["format_version"] == 1
        assert tagger["model"] == {"saved_model": "saved_model", "onnx": "model.onnx", "openvino": "model.xml"}[fmt]
        assert tagger["classes"] == CLASSES and tagger["image_size"] == SIZE
        assert tagger["input"] == {"name": "image", "shape": [None, SIZE, SIZE, 3], "dtype": "float32",
                                   "layout": "NHWC", "channels": "RGB", "range": [0, 255]}
        assert tagger["output"]["shape"] == [None, 3] and tagger["output"]["scores"] == "sigmoid probabilities"
        assert tagger["resize"] == resize_rule(SIZE)
        assert tagger["resize"]["implementation"] == (
            "tf.image.resize(image, [32, 32], method='bilinear', antialias=True)")
        assert tagger["preprocessing"] == {"mode": "inception", "in_model": True}
        assert tagger["thresholds"] == {"default": 0.5, "tuned": dict(zip(CLASSES, TUNED, strict=True))}
        assert tagger["head"] == {"name": "sigmoid"} and tagger["decoder"] is None
        assert tagger["config_sha256"] == hashlib.sha256((run / "config.json").read_bytes()).hexdigest()
        assert tagger["model_sha256"] == hashlib.sha256((run / "model.keras").read_bytes()).hexdigest()


def test_export_refuses_a_folder_that_is_not_an_export(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(PredictError, match=r"exists and is not an export folder \(no tagger.json\)"):
        export(ExportConfig(run=tiny["run"], format="onnx", out=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(PredictError, match="--format must be one of saved_model, onnx, openvino, got 'tflite'"):
        export(ExportConfig(run=tiny["run"], format="tflite", out=tmp_path / "x"))


def test_failed_export_leaves_the_earlier_one_whole(tiny, monkeypatch):
    out = tiny["root"] / "again"
    shutil.copytree(tiny["exports"]["onnx"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, filepath, **kwargs):
        Path(filepath).write_bytes(b"half")  # something written, then the converter fails
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(keras.Model, "export", broken)
    with pytest.raises(PredictError, match=r"could not export the model as onnx \(RuntimeError: converter crashed\)"):
        export_run(load_run(tiny["run"]), "onnx", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tiny["root"].iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_engine_cache_is_keyed_on_model_keras(tmp_path, monkeypatch):
    """The cache logic with a stand-in exporter: reuse while model.keras is unchanged, export again (and drop the
    stale folder) when it changes, a beam gets its own folder. The real exports: the slow test below."""
    exported = []

    def fake_export(run, fmt, out, *, model_digest=None):
        exported.append((fmt, run.beam, model_digest))
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"onnx")
        decoder = None if run.head == "sigmoid" else ("greedy" if run.beam == 1 else f"beam {run.beam}")
        (out / TAGGER_FILE).write_text(json.dumps({"format": fmt, "model_sha256": model_digest, "decoder": decoder}))
        return out

    monkeypatch.setattr(engines, "export_run", fake_export)
    run_dir = make_run_dir(tmp_path / "run", conv_model(SIZE, seed=5))
    first = hashlib.sha256((run_dir / "model.keras").read_bytes()).hexdigest()
    run = load_run(run_dir, engine="onnx")
    folder = engines.cached_export(run, "onnx", run.model_sha256)
    assert folder == run_dir / ENGINES_DIR / f"onnx-{first[:16]}" and exported == [("onnx", 1, first)]
    assert engines.cached_export(load_run(run_dir, engine="onnx"), "onnx") == folder and len(exported) == 1
    (run_dir / ENGINES_DIR / "onnx-beam2-0123456789abcdef").mkdir()  # another decoder's export stays
    rundir.save_model(conv_model(SIZE, seed=6), run_dir)
    second = hashlib.sha256((run_dir / "model.keras").read_bytes()).hexdigest()
    assert engines.cached_export(load_run(run_dir, engine="onnx"), "onnx").name == f"onnx-{second[:16]}"
    assert exported[1:] == [("onnx", 1, second)]
    assert sorted(p.name for p in (run_dir / ENGINES_DIR).iterdir()) == sorted(["onnx-beam2-0123456789abcdef",
                                                                               f"onnx-{second[:16]}"])
    # The digest taken before loading is the key, so a file replaced after loading is not mistaken for it.
    assert engines.cached_export(run, "onnx", run.model_sha256).name == f"onnx-{first[:16]}"


@pytest.mark.slow
def test_onnx_engine_cache_follows_model_keras(tmp_path, monkeypatch):
    paths = [str(p) for p in _images(tmp_path)]
    run_dir = make_run_dir(tmp_path / "run", conv_model(SIZE, seed=5))
    keras_run, onnx_run = load_run(run_dir), load_run(run_dir, engine="onnx")
    expected = predict_ensemble([keras_run], paths, tta=2, progress=False).probabilities
    np.testing.assert_allclose(predict_ensemble([onnx_run], paths, tta=2, progress=False).probabilities,
                               expected, rtol=0, atol=ATOL)
    digest = hashlib.sha256((run_dir / "model.keras").read_bytes()).hexdigest()
    assert [p.name for p in (run_dir / ENGINES_DIR).iterdir()] == [f"onnx-{digest[:16]}"]

    # A current export is reused: no export happens for a second load.
    monkeypatch.setattr(engines, "export_run", lambda *a, **k: pytest.fail("exported again"))
    again = predict_ensemble([load_run(run_dir, engine="onnx")], paths, tta=2, progress=False).probabilities
    np.testing.assert_array_equal(again, predict_ensemble([onnx_run], paths, tta=2, progress=False).probabilities)
    monkeypatch.undo()

    # A new model.keras is exported again, the stale export removed, and the scores follow the new model.
    rundir.save_model(conv_model(SIZE, seed=6), run_dir)
    new_digest = hashlib.sha256((run_dir / "model.keras").read_bytes()).hexdigest()
    new_expected = predict_ensemble([load_run(run_dir)], paths, tta=2, progress=False).probabilities
    assert np.abs(new_expected - expected).max() > 0.01
    got = predict_ensemble([load_run(run_dir, engine="onnx")], paths, tta=2, progress=False).probabilities
    np.testing.assert_allclose(got, new_expected, rtol=0, atol=ATOL)
    assert [p.name for p in (run_dir / ENGINES_DIR).iterdir()] == [f"onnx-{new_digest[:16]}"]
    tagger = json.loads((run_dir / ENGINES_DIR / f"onnx-{new_digest[:16]}" / TAGGER_FILE).read_text())
    assert tagger["model_sha256"] == new_digest


def _images(root: Path) -> list[Path]:
    data = make_data_dir(root / "data", {f"i{k}": textured(k) for k in range(5)})
    return sorted((data / "images").iterdir())


def test_precision_checks_and_messages(monkeypatch):
    assert check_precision("f32", "openvino") == "f32" and check_precision("f32", "keras") == "f32"
    with pytest.raises(PredictError, match=r"--precision bf16 needs --engine openvino \(got --engine onnx\)"):
        check_precision("bf16", "onnx")
    with pytest.raises(PredictError, match="--precision must be one of f32, bf16, got 'fp16'"):
        check_precision("fp16", "openvino")
    monkeypatch.setattr(engines, "openvino_capabilities", lambda: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    message = (r"--precision bf16: this CPU has no bfloat16 support \(OpenVINO CPU OPTIMIZATION_CAPABILITIES: "
               r"FP32, INT8, BIN, EXPORT_IMPORT\), so OpenVINO would silently run float32; use --precision f32")
    with pytest.raises(PredictError, match=message):
        check_precision("bf16", "openvino")
    with pytest.raises(PredictError, match=message):  # checked once, where the config is resolved
        SubmitConfig(runs=("r",), data=Path("d"), out=Path("o.csv"), engine="openvino", precision="bf16").resolve()
    monkeypatch.setattr(engines, "openvino_capabilities", lambda: ["FP32", "BF16"])
    assert check_precision("bf16", "openvino") == "bf16"
    config = EvaluateConfig(runs=("r",), data=Path("d"), engine="openvino", precision="bf16")
    assert config.resolve().precision == "bf16"


def test_compiled_precision_is_checked_back():
    import openvino as ov

    @dataclasses.dataclass
    class Compiled:
        hint: ov.Type

        def get_property(self, name):
            assert name == "INFERENCE_PRECISION_HINT"
            return self.hint

    assert check_compiled_precision(Compiled(ov.Type.f32), "f32") == "f32"
    assert check_compiled_precision(Compiled(ov.Type.bf16), "bf16") == "bf16"
    with pytest.raises(PredictError, match=r"compiled the model with INFERENCE_PRECISION_HINT bf16, not the f32 "
                                           r"asked for \(--precision f32\)"):
        check_compiled_precision(Compiled(ov.Type.bf16), "f32")
    with pytest.raises(PredictError, match="INFERENCE_PRECISION_HINT f32, not the bf16"):
        check_compiled_precision(Compiled(ov.Type.f32), "bf16")


def test_cli_options(tiny, tmp_path, capsys):
    config = parse_args(["export", str(tiny["run"]), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert config == ExportConfig(run=tiny["run"], format="onnx", out=tmp_path / "x")
    config = parse_args(["submit", "r", "--data", "d", "--out", "o.csv", "--engine", "openvino"])
    assert (config.engine, config.precision) == ("openvino", "f32")
    assert parse_args(["evaluate", "r", "--data", "d"]).engine == "keras"
    for argv, message in [
        (["compare", "r", "--data", "d", "--engine", "tflite"],
         "--engine must be one of keras, openvino, onnx, got 'tflite'"),
        (["export", "r", "--format", "pt", "--out", "x"], "--format must be one of saved_model, onnx, openvino"),
        (["submit", "r", "--data", "d", "--out", "o.csv", "--precision", "half"],
         "--precision must be one of f32, bf16, got 'half'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # bf16 with the keras engine: exit 2 with the message, before any model is loaded.
    code = main(["evaluate", str(tiny["run"]), "--data", str(tmp_path), "--precision", "bf16"])
    assert code == 2 and "--precision bf16 needs --engine openvino (got --engine keras)" in capsys.readouterr().err
    (tmp_path / "keep.txt").write_text("x")
    assert main(["export", str(tiny["run"]), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} exists and is not an export folder" in capsys.readouterr().err


def test_load_runs_passes_the_engine_to_every_run(tiny):
    runs = load_runs([tiny["run"], tiny["run"]], engine="onnx")
    assert [(r.engine, r.precision, r.takes_pixels) for r in runs] == [("onnx", "f32", True)] * 2
    assert runs[0].model_sha256 == hashlib.sha256((tiny["run"] / "model.keras").read_bytes()).hexdigest()
    assert load_run(tiny["run"]).takes_pixels is False and load_run(tiny["run"]).model_sha256 is None
