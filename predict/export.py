"""Export a RUN_DIR's tagger with Keras's `Model.export` (TensorFlow SavedModel, ONNX, OpenVINO IR), preprocessing
included, plus `tagger.json` describing how to feed it and read it; the one owner of the export folder's format.

The exported model is `serving_model(run)`: float32 RGB pixels 0..255 of shape (batch, S, S, 3), S the run's input
size and the batch dynamic, through a `Preprocess` layer (the run's `train.preprocess` mode, the very function
training used) and the RUN_DIR's model, to one float32 score per class. A consumer decodes and resizes an image as
`tagger.json`'s "resize" says (`train.data.decode_resize`) and nothing else. Both heads export to every format: the
rnn head's greedy decoder is a `while` loop in the graph, which the SavedModel keeps, tf2onnx turns into an ONNX
`Loop` and OpenVINO into a `Loop` of its own.

An export folder (`--out DIR`) holds the model (`saved_model/`, `model.onnx`, or `model.xml` + `model.bin`) and
`tagger.json`. It is written into a temporary sibling folder and renamed into place when complete, so DIR is
either the previous export, or the new one, never half of one. predict's `--engine openvino|onnx` caches such
folders inside the RUN_DIR (`predict.engines`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras

from common.atomic import atomic_write_json
from predict.errors import PredictError
from predict.options import check_choice
from train import rundir
from train.data import resize_rule
from train.preprocess import PREPROCESSING, preprocess

if TYPE_CHECKING:  # predict.runs imports this module's users; the Run type is only needed for the hints
    from predict.runs import Run

EXPORT_FORMATS = ("saved_model", "onnx", "openvino")
TAGGER_FILE = "tagger.json"
TAGGER_FORMAT_VERSION = 1
MODEL_FILES = {"saved_model": "saved_model", "onnx": "model.onnx", "openvino": "model.xml"}  # openvino: + model.bin
_KERAS_FORMATS = {"saved_model": "tf_saved_model", "onnx": "onnx", "openvino": "openvino"}
INPUT_NAME = "image"
# Formats that cannot hold a model of a given head (format, head name) -> reason. Empty: with the decoder's argmax
# as top_k and its one-hot over all tokens (train.rnn_head), both heads export to every format. A refusal added
# here is reported by `check_exportable` before any work.
UNSUPPORTED: dict[tuple[str, str], str] = {}


@keras.saving.register_keras_serializable(package="fashion_tagger")
class Preprocess(keras.layers.Layer):
    """The run's preprocessing as a layer: float32 RGB 0..255 -> the backbone's input (`train.preprocess`)."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing {mode!r}; known: {', '.join(sorted(PREPROCESSING))}")
        self.mode = mode

    def call(self, images):
        return preprocess(images, self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def serving_model(run: Run) -> keras.Model:
    """Pixels 0..255 (batch, S, S, 3) float32 -> the run's scores: `Preprocess` then the run's model (shared
    weights), as `preprocess()` then the model in the tf.data pipeline of the keras engine."""
    size = run.image_size
    pixels = keras.Input((size, size, 3), dtype="float32", name=INPUT_NAME)
    scores = run.model(Preprocess(run.preprocessing, name="preprocess")(pixels))
    return keras.Model(pixels, scores, name=f"{run.model.name}_serving")


def check_exportable(run: Run, fmt: str) -> None:
    """PredictError naming the format and the reason when `fmt` cannot hold this run's model."""
    reason = UNSUPPORTED.get((fmt, run.head))
    if reason:
        raise PredictError(f"{run.path}: cannot export an {run.head}-head run as {fmt}: {reason}")


def tagger_record(run: Run, fmt: str, *, model_digest: str | None = None) -> dict:
    """tagger.json: how to feed the exported model and read its output, and which run it came from."""
    thresholds = None
    if run.metrics is not None and isinstance(run.metrics.get("thresholds"), dict):
        with contextlib.suppress(PredictError):  # thresholds for only some classes: none are recorded
            thresholds = dict(zip(run.classes, (float(t) for t in run.tuned_thresholds), strict=True))
    size = run.image_size
    scores = ("sigmoid probabilities" if run.head == "sigmoid" else
              "decoder scores: >= 0.5 exactly for the classes the decoder emitted (train/rnn_head.py)")
    return {
        "format_version": TAGGER_FORMAT_VERSION,
        "format": fmt,
        "model": MODEL_FILES[fmt],
        "input": {"name": INPUT_NAME, "shape": [None, size, size, 3], "dtype": "float32", "layout": "NHWC",
                  "channels": "RGB", "range": [0, 255]},
        "output": {"index": 0, "shape": [None, len(run.classes)], "dtype": "float32", "scores": scores},
        "classes": list(run.classes),
        "image_size": size,
        "resize": resize_rule(size),
        "preprocessing": {"mode": run.preprocessing, "in_model": True},
        "thresholds": {"default": 0.5, "tuned": thresholds},
        "head": dict(run.config.head),
        "decoder": None if run.head == "sigmoid" else ("greedy" if run.beam == 1 else f"beam {run.beam}"),
        "run": run.name,
        "backbone": run.backbone,
        "config_sha256": rundir.config_sha256(run.path),
        "model_sha256": model_digest or rundir.model_sha256(run.path),
        "versions": {"keras": keras.__version__, **_runtime_versions(fmt)},
    }


def _runtime_versions(fmt: str) -> dict:
    import tensorflow as tf

    versions = {"tensorflow": tf.__version__}
    if fmt == "onnx":
        import onnx
        import tf2onnx

        versions.update(tf2onnx=tf2onnx.__version__, onnx=onnx.__version__, opset=_onnx_opset())
    elif fmt == "openvino":
        import openvino

        versions["openvino"] = openvino.__version__
    return versions


def _onnx_opset() -> int:
    from tf2onnx import constants

    return int(constants.PREFERRED_OPSET)


def read_tagger(folder: str | Path) -> dict | None:
    """An export folder's tagger.json, or None when it is absent or unreadable (no complete export there)."""
    try:
        data = json.loads((Path(folder) / TAGGER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _check_out(out: Path) -> None:
    """Refuse an --out that holds something other than an earlier export: replacing it would lose files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / TAGGER_FILE).is_file())):
        raise PredictError(
            f"--out {out} exists and is not an export folder (no {TAGGER_FILE}); give a new or empty folder, or an "
            "earlier export to replace"
        )


@contextlib.contextmanager
def _quiet_converters():
    """tf2onnx logs a warning per op it rewrites and Keras's numpy-2 patch warns; errors still show."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_run(run: Run, fmt: str, out: str | Path, *, model_digest: str | None = None) -> Path:
    """Export `run` in format `fmt` (of EXPORT_FORMATS) into the folder `out`, atomically; returns `out`.

    `out` may be absent, empty, or an earlier export (replaced); anything else is refused. `model_digest` is
    model.keras's sha256 when the caller already has it (the engine cache's key).
    """
    check_choice("--format", fmt, EXPORT_FORMATS)
    out = Path(out)
    _check_out(out)
    check_exportable(run, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    tmp = out.parent / f".{out.name}.{token}.tmp"
    old = out.parent / f".{out.name}.{token}.old"
    try:
        tmp.mkdir()
        size = run.image_size
        signature = [keras.InputSpec(shape=(None, size, size, 3), dtype="float32", name=INPUT_NAME)]
        try:
            with _quiet_converters():
                serving_model(run).export(str(tmp / MODEL_FILES[fmt]), format=_KERAS_FORMATS[fmt], verbose=False,
                                          input_signature=signature)
        except Exception as err:  # the converters raise many types; the message names the format and the cause
            raise PredictError(
                f"{run.path}: Keras could not export the model as {fmt} ({type(err).__name__}: {err})"
            ) from err
        atomic_write_json(tmp / TAGGER_FILE, tagger_record(run, fmt, model_digest=model_digest))
        if out.exists():
            os.replace(out, old)  # a folder renames onto a new name only: the earlier export steps aside first
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


# --- python -m predict export -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Settings of `python -m predict export`; `resolve()` checks them (`export` calls it)."""

    run: Path
    format: str
    out: Path

    def resolve(self) -> ExportConfig:
        """A copy with every option checked; raises PredictError."""
        out = Path(self.out)
        _check_out(out)
        return dataclasses.replace(self, run=Path(self.run), format=check_choice("--format", self.format,
                                                                                    EXPORT_FORMATS), out=out)


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote."""

    out: Path
    format: str
    tagger: dict[str, Any]

    def summary(self) -> str:
        t = self.tagger
        return (f"wrote {self.out}: {self.format} model {t['model']} and {TAGGER_FILE} "
                f"({len(t['classes'])} classes, {t['image_size']} px, {t['head']['name']} head)")


def export(config: ExportConfig) -> ExportResult:
    """Export the RUN_DIR `config.run` as `config.format` into `config.out` (see `export_run`)."""
    from predict.runs import load_run  # here: predict.runs reaches this module through predict.engines

    config = config.resolve()
    run = load_run(config.run)
    export_run(run, config.format, config.out)
    return ExportResult(out=config.out, format=config.format, tagger=read_tagger(config.out) or {})
