"""The engines that score a batch for predict: Keras (the RUN_DIR's model), or the run's export run by OpenVINO or
onnxruntime; `--engine keras|openvino|onnx` and `--precision f32|bf16`.

- keras (default): `model.predict_on_batch` on preprocessed images, as predict always did.
- openvino, onnx: the run exported by `predict.export` (preprocessing inside, so these engines take the decoded,
  resized 0..255 pixels), made once and cached inside the RUN_DIR (`train.rundir.engine_cache_dir`: a folder per
  engine, decoder and model.keras sha256; a changed model.keras is exported again and the stale folder removed).
  Decoding, resizing, TTA views, ensembles and thresholds are the same code for every engine; only the model call
  differs, and the probabilities agree with Keras's within 1e-4 in f32.

Precision: OpenVINO's CPU plugin infers in bfloat16 by default where the CPU has it, which moves probabilities by
about 1e-2. `f32` (the default) sets INFERENCE_PRECISION_HINT to f32 and checks the compiled model kept it; `bf16`
asks for bfloat16 (openvino only), is refused where the CPU's OPTIMIZATION_CAPABILITIES lack BF16 (OpenVINO would
silently run f32 there), and is checked the same way. Keras and onnxruntime run float32 only here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from predict.errors import PredictError
from predict.export import MODEL_FILES, export_run, read_tagger
from predict.options import check_choice
from train import rundir

if TYPE_CHECKING:
    import keras

    from predict.runs import Run

ENGINES = ("keras", "openvino", "onnx")
PRECISIONS = ("f32", "bf16")
DEFAULT_ENGINE = "keras"
DEFAULT_PRECISION = "f32"
DEVICE = "CPU"  # OpenVINO device
# --precision values are OpenVINO's own names: the INFERENCE_PRECISION_HINT to set, and the type name
# (openvino.Type.get_type_name()) the compiled model must report back.


def check_engine(engine: str) -> str:
    """Validate `--engine`; returns it."""
    return check_choice("--engine", engine, ENGINES)


def openvino_capabilities() -> list[str]:
    """The OpenVINO CPU device's OPTIMIZATION_CAPABILITIES (FP32, BF16, INT8, ...): the probe of bf16 support."""
    import openvino as ov

    return [str(c) for c in ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]


def check_precision(precision: str, engine: str = DEFAULT_ENGINE) -> str:
    """Validate `--precision` for `--engine`; returns it. bf16 needs the openvino engine and a CPU with bfloat16."""
    check_choice("--precision", precision, PRECISIONS)
    if precision == "bf16":
        if engine != "openvino":
            raise PredictError(
                f"--precision bf16 needs --engine openvino (got --engine {engine}): Keras and onnxruntime run "
                "float32 only here"
            )
        capabilities = openvino_capabilities()
        if "BF16" not in capabilities:
            raise PredictError(
                f"--precision bf16: this CPU has no bfloat16 support (OpenVINO {DEVICE} OPTIMIZATION_CAPABILITIES: "
                f"{', '.join(capabilities)}), so OpenVINO would silently run float32; use --precision f32"
            )
    return precision


# --- scorers ----------------------------------------------------------------------------------------------------


class KerasScorer:
    """The RUN_DIR's Keras model on preprocessed images."""

    takes_pixels = False  # the tf.data pipeline preprocesses

    def __init__(self, model: keras.Model):
        self.model = model

    def __call__(self, batch) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(batch))


class OnnxScorer:
    """An exported model.onnx in an onnxruntime CPU session, on 0..255 pixels."""

    takes_pixels = True

    def __init__(self, path: Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.asarray(batch, dtype=np.float32)})[0]


class OpenVINOScorer:
    """An exported model.xml compiled for the CPU at the asked precision (checked back), on 0..255 pixels."""

    takes_pixels = True

    def __init__(self, path: Path, precision: str = DEFAULT_PRECISION):
        import openvino as ov

        check_choice("--precision", precision, PRECISIONS)
        hint = {"INFERENCE_PRECISION_HINT": precision}
        self.compiled = ov.Core().compile_model(str(path), DEVICE, hint)
        self.precision = check_compiled_precision(self.compiled, precision)
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch) -> np.ndarray:
        self.request.infer({0: np.asarray(batch, dtype=np.float32)})
        return np.array(self.request.get_output_tensor(0).data, copy=True)


def check_compiled_precision(compiled, precision: str) -> str:
    """The compiled model's INFERENCE_PRECISION_HINT must be the one asked; PredictError otherwise (OpenVINO falls
    back silently, to bf16 by default on CPUs that have it and to f32 where a bf16 request cannot be met)."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    got = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    if got != precision:
        raise PredictError(
            f"OpenVINO compiled the model with INFERENCE_PRECISION_HINT {got}, not the {precision} asked for "
            f"(--precision {precision})"
        )
    return precision


# --- the cache inside the RUN_DIR ---------------------------------------------------------------------------------


def cache_key(engine: str, beam: int) -> str:
    """The engine's folder name prefix in the RUN_DIR's cache: the engine, and the beam width when it is not 1."""
    return engine if beam == 1 else f"{engine}-beam{beam}"


def cached_export(run: Run, engine: str, model_digest: str | None = None) -> Path:
    """The folder of `run`'s `engine` export (with its beam), from the RUN_DIR's cache or exported into it now.

    The cache is keyed on model.keras's sha256 (`model_digest`, hashed now when not given: pass the digest taken
    before the model was loaded, so a file replaced since is not mistaken for the loaded one). An export is used
    only when its tagger.json records that digest, the format and the beam; older exports of the same engine and
    beam are removed once the new one is in place.
    """
    digest = model_digest or rundir.model_sha256(run.path)
    key = cache_key(engine, run.beam)
    folder = rundir.engine_cache_dir(run.path, key, digest)
    if not _is_current(folder, engine, digest, run.beam):
        try:
            export_run(run, engine, folder, model_digest=digest)
        except OSError as err:
            raise PredictError(f"{folder}: cannot write the {engine} export into the RUN_DIR ({err})") from None
    for stale in folder.parent.glob(f"{key}-*"):
        # Exactly "<key>-<hex digest>": "onnx-*" also matches "onnx-beam3-*", whose rest is not alphanumeric.
        if stale != folder and stale.is_dir() and stale.name[len(key) + 1:].isalnum():
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def _is_current(folder: Path, engine: str, digest: str, beam: int) -> bool:
    tagger = read_tagger(folder)
    decoder = tagger.get("decoder") if tagger else None
    return (
        tagger is not None
        and tagger.get("model_sha256") == digest
        and tagger.get("format") == engine
        and (decoder is None or decoder == ("greedy" if beam == 1 else f"beam {beam}"))
        and (folder / MODEL_FILES[engine]).exists()
    )


def make_scorer(run: Run, engine: str, precision: str, model_digest: str | None = None):
    """The scorer of `run` for `engine` (KerasScorer, OnnxScorer or OpenVINOScorer), exporting if needed."""
    check_engine(engine)
    if engine == "keras":
        if precision != "f32":
            check_precision(precision, engine)  # refuses, naming the engine
        return KerasScorer(run.model)
    folder = cached_export(run, engine, model_digest)
    path = folder / MODEL_FILES[engine]
    return OnnxScorer(path) if engine == "onnx" else OpenVINOScorer(path, precision)
