"""Load a RUN_DIR written by `python -m train`: its model, config, classes, tuned thresholds and class prevalence.

A RUN_DIR carries everything prediction needs (docs/CONTRACTS.md), so nothing here guesses: the image size and
preprocessing come from config.json, the class order from classes.txt (checked against config.json and the model's
output width), the thresholds from metrics.json. Both heads give one score per class: the sigmoid head's
probabilities, or the rnn head's decoder scores (train.rnn_head, imported here so that its layer is registered before
`load_model`); runs of different heads are not ensembled.

Each loaded run scores batches with an engine (`predict.engines`): `load_run(path, engine=..., precision=...,
beam=...)` records the choice and `Run.scorer` builds the scorer on first use (exporting the run into its cache for
openvino and onnx), so `with_beam` before any scoring costs no export.

A k-fold folder (train/kfold_dir.py) loads as one Run: its model is the mean of its folds' models (one Keras model,
so every consumer of `Run.model` works unchanged), its tuned thresholds are those tuned on the out-of-fold
predictions (kfold.json), and in an ensemble it counts as one member. It
scores with the keras engine only (a k-fold folder has no model.keras of its own to export).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from predict import engines
from predict.errors import PredictError
from train import kfold_dir, rnn_head, rundir  # rnn_head registers TagDecoder, which an rnn run's model.keras holds
from train.preprocess import PREPROCESSING
from train.rundir import CLASSES_FILE, CONFIG_FILE, METRICS_FILE, MODEL_FILE, RunDirError, RunRecord


@dataclass(frozen=True)
class Run:
    """A loaded RUN_DIR."""

    path: Path
    config: RunRecord
    classes: list[str]
    metrics: dict | None  # None when metrics.json is absent (tuned thresholds and compare then fail clearly)
    model: keras.Model = field(repr=False, compare=False)
    engine: str = engines.DEFAULT_ENGINE
    precision: str = engines.DEFAULT_PRECISION
    beam: int = 1  # rnn runs: the decoder's beam width (1: greedy, the saved model itself)
    model_sha256: str | None = None  # model.keras's sha256 as loaded (taken before loading for the export engines)
    _scorers: dict = field(init=False, default_factory=dict, repr=False, compare=False)  # built on first use
    # A k-fold folder's folds (each a loaded RUN_DIR); `model` is then their mean and `metrics` its kfold.json.
    folds: tuple[Run, ...] = field(default=(), repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics_path(self) -> Path:
        """Where the thresholds and training figures come from: metrics.json, or a k-fold folder's kfold.json."""
        return self.path / (kfold_dir.KFOLD_FILE if self.folds else METRICS_FILE)

    @property
    def scorer(self) -> engines.KerasScorer | engines.OnnxScorer | engines.OpenVINOScorer:
        """The engine's scorer of batches, built on first use (openvino and onnx: exported into the RUN_DIR's cache
        first, unless a current export is there)."""
        if "scorer" not in self._scorers:
            self._scorers["scorer"] = engines.make_scorer(self, self.engine, self.precision, self.model_sha256)
        return self._scorers["scorer"]

    def prepare(self) -> Run:
        """Build the scorer now (export and compile for openvino/onnx) rather than at the first batch; returns self."""
        _ = self.scorer
        return self

    @property
    def takes_pixels(self) -> bool:
        """True when the engine's model includes the preprocessing (openvino, onnx): feed it 0..255 pixels."""
        return self.engine != "keras"

    def score(self, batch) -> np.ndarray:
        """Scores (B, K) of a batch: preprocessed images for keras, 0..255 pixels otherwise (`takes_pixels`)."""
        return self.scorer(batch)

    @property
    def head(self) -> str:
        """"sigmoid" or "rnn" (config.json's head record; absent in runs from before the rnn head: sigmoid)."""
        return self.config.head_name

    def with_beam(self, beam: int) -> Run:
        """This run decoding with a beam of width `beam` (rnn head; 1 is greedy, the saved model itself)."""
        if beam == self.beam:
            return self
        if self.head != "rnn":
            raise PredictError(f"--beam {beam}: {self.path} is a {self.head}-head run; beam search is for rnn runs")
        if self.folds:
            folds = tuple(fold.with_beam(beam) for fold in self.folds)
            return dataclasses.replace(self, folds=folds, beam=beam,
                                       model=fold_mean([f.model for f in folds], self.image_size))
        return dataclasses.replace(self, model=rnn_head.with_beam(self.model, beam), beam=beam)

    @property
    def backbone(self) -> str:
        return str(self.config.backbone["name"])

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def preprocessing(self) -> str:
        return str(self.config.backbone["preprocessing"])

    @property
    def class_prevalence(self) -> np.ndarray:
        """Training prevalence per class (config.json's class_prevalence): the probabilities of missing images."""
        return np.asarray(self.config.class_prevalence, dtype=np.float64)

    @property
    def tuned_thresholds(self) -> np.ndarray:
        """Per-class thresholds tuned on validation (metrics.json's thresholds; a k-fold folder's are tuned on its
        out-of-fold predictions, kfold.json's), in class order."""
        path = self.metrics_path
        if self.metrics is None:
            raise PredictError(f"{path}: not found; --threshold tuned needs the thresholds training stores there")
        stored = self.metrics.get("thresholds")
        if not isinstance(stored, dict):
            raise PredictError(f"{path}: has no 'thresholds' mapping; use --threshold 0.5 or a number")
        absent = [c for c in self.classes if c not in stored]
        if absent:
            raise PredictError(f"{path}: thresholds missing for class(es) {', '.join(absent)}")
        return np.asarray([float(stored[c]) for c in self.classes], dtype=np.float64)


def load_run(
    path: str | Path,
    *,
    engine: str = engines.DEFAULT_ENGINE,
    precision: str = engines.DEFAULT_PRECISION,
    beam: int = 1,
) -> Run:
    """Read and check a RUN_DIR, or a k-fold folder as one Run (`load_kfold`); raises PredictError naming the
    file at fault.

    `engine` and `precision` (`predict.engines`; taken as checked: the configs' `resolve()` checks them) choose what
    scores its batches; `beam` > 1 makes an rnn run decode with a beam (PredictError for a sigmoid run).
    """
    path = Path(path)
    if not path.is_dir():
        raise PredictError(f"{path}: not a RUN_DIR (no such directory)")
    if kfold_dir.is_kfold_dir(path):
        if engine != "keras":
            raise PredictError(
                f"--engine {engine}: {path} is a k-fold folder, which predicts with the keras engine only (it has no "
                "model.keras of its own to export); use --engine keras, or a single fold's RUN_DIR"
            )
        return load_kfold(path).with_beam(beam)
    try:
        config = rundir.read_config(path)
        classes = rundir.read_classes(path)
        metrics = rundir.read_metrics(path)
    except RunDirError as err:
        raise PredictError(str(err)) from None
    preprocessing = config.backbone["preprocessing"]
    if preprocessing not in PREPROCESSING:
        raise PredictError(
            f"{path / CONFIG_FILE}: unknown preprocessing {preprocessing!r}; known: {', '.join(sorted(PREPROCESSING))}"
        )
    classes_path = path / CLASSES_FILE
    if classes != list(config.classes):
        raise PredictError(
            f"{classes_path}: classes differ from those in {CONFIG_FILE} ({classes} vs {list(config.classes)})"
        )

    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise PredictError(f"{model_path}: not found; did training finish an epoch?")
    # The export engines' cache key, taken before loading: a file replaced meanwhile is then exported afresh.
    digest = rundir.model_sha256(path) if engine != "keras" else None
    try:
        model = keras.saving.load_model(model_path)  # safe mode: a RUN_DIR model holds no Lambda layers
    except Exception as err:  # Keras raises many types for a damaged or foreign file
        raise PredictError(f"{model_path}: cannot be loaded ({type(err).__name__}: {err})") from None
    in_shape, out_shape = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    image_size = config.image_size
    if tuple(in_shape[1:]) != (image_size, image_size, 3):
        raise PredictError(
            f"{model_path}: model input {in_shape} does not match image_size {image_size} in {CONFIG_FILE}"
        )
    if out_shape[-1] != len(classes):
        raise PredictError(
            f"{model_path}: model has {out_shape[-1]} outputs but {classes_path} lists {len(classes)} classes"
        )
    run = Run(path=path, config=config, classes=classes, metrics=metrics, model=model, engine=engine,
              precision=precision, model_sha256=digest)
    return run.with_beam(beam)


def fold_mean(models: Sequence[keras.Model], image_size: int) -> keras.Model:
    """One Keras model whose output is the mean of `models`' outputs (each renamed fold_<i>: Keras wants unique
    names, and every fold model carries its run's)."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    outputs = [keras.Model(m.inputs[0], m.outputs[0], name=f"fold_{i}")(inputs) for i, m in enumerate(models)]
    mean = keras.layers.Average(name="fold_mean", dtype="float32")(outputs)
    return keras.Model(inputs, mean, name="kfold_mean")


def load_kfold(path: str | Path) -> Run:
    """A finished k-fold folder as one Run: the mean of its folds' models, the thresholds tuned on its out-of-fold
    predictions, the folds' mean class prevalence. PredictError when a fold is unfinished or the folds differ."""
    path = Path(path)
    try:
        summary = kfold_dir.read_summary(path)
    except RunDirError as err:
        unfinished = [p.name for p in kfold_dir.fold_dirs(path) if not kfold_dir.fold_finished(p)]
        hint = f" (unfinished: {', '.join(unfinished)})" if unfinished else ""
        raise PredictError(f"{err}{hint}; finish it with `python -m train ... --folds K --out {path}`") from None
    folds = []
    for i in range(summary["folds"]):
        fold_path = kfold_dir.fold_dir(path, i)
        if not kfold_dir.fold_finished(fold_path):
            raise PredictError(f"{fold_path}: fold {i} of the k-fold folder {path} is not a finished run")
        folds.append(load_run(fold_path))
    first = folds[0]
    for fold in folds[1:]:
        differs = [what for what, a, b in (("classes", first.classes, fold.classes), ("head", first.head, fold.head),
                                           ("backbone", first.config.backbone, fold.config.backbone),
                                           ("image size", first.image_size, fold.image_size)) if a != b]
        if differs:
            raise PredictError(f"{fold.path}: its {differs[0]} differ from {first.path}'s; the folds of {path} are "
                               "not one k-fold run")
    if first.classes != list(summary["classes"]):
        raise PredictError(f"{path / kfold_dir.KFOLD_FILE}: its classes differ from the folds' ({first.classes})")
    prevalence = np.mean([fold.class_prevalence for fold in folds], axis=0)
    config = dataclasses.replace(first.config, class_prevalence=tuple(float(p) for p in prevalence))
    return Run(path=path, config=config, classes=first.classes, metrics=summary,
               model=fold_mean([fold.model for fold in folds], first.image_size), folds=tuple(folds))


def load_runs(
    paths: Sequence[str | Path],
    *,
    engine: str = engines.DEFAULT_ENGINE,
    precision: str = engines.DEFAULT_PRECISION,
    beam: int = 1,
) -> list[Run]:
    """Load several RUN_DIRs for an ensemble (each as `load_run` with these options); refuses runs whose heads or
    classes (names or order) differ. `engine` and `precision` are checked here, before any run is read (a bf16
    request on a CPU without bfloat16 fails now, not at the first batch)."""
    if not paths:
        raise PredictError("no RUN_DIR given")
    engines.check_precision(precision, engines.check_engine(engine))
    runs = [load_run(p, engine=engine, precision=precision) for p in paths]
    check_same_head(runs)
    check_same_classes(runs)
    return [run.with_beam(beam) for run in runs]


def check_same_head(runs: Sequence[Run]) -> str:
    """The runs' common head; PredictError naming every run and its head when they differ."""
    heads = {run.head for run in runs}
    if len(heads) > 1:
        listed = ", ".join(f"{run.path} ({run.head} head)" for run in runs)
        raise PredictError(
            f"cannot ensemble runs of different heads: {listed}. A sigmoid probability and an rnn decoder score "
            "are different kinds of number, so averaging them has no meaning; ensemble runs of one head."
        )
    return heads.pop()


def check_same_classes(runs: Sequence[Run]) -> list[str]:
    """The runs' common class list; PredictError naming the runs and the difference when they disagree."""
    first = runs[0]
    for run in runs[1:]:
        if run.classes != first.classes:
            only_first = [c for c in first.classes if c not in run.classes]
            only_other = [c for c in run.classes if c not in first.classes]
            if not only_first and not only_other:
                detail = "the same classes in a different order"
            else:
                detail = f"only in {first.path}: {only_first or 'none'}; only in {run.path}: {only_other or 'none'}"
            raise PredictError(
                f"cannot ensemble {first.path} and {run.path}: their classes differ ({detail}). "
                "Ensembles average probabilities class by class, so every run must predict the same classes in the "
                "same order."
            )
    return list(first.classes)
