"""The RUN_DIR format: the one place that names its files and reads and writes them.

A RUN_DIR is what `python -m train` leaves and `python -m predict` needs (docs/CONTRACTS.md):

- ``config.json``: a `RunRecord` (settings, backbone entry, classes, versions, the data's fingerprints, and for
  an rnn-head run its `head` record), written before training starts;
- ``classes.txt``: the class names in output order, one per line;
- ``val_ids.csv``: the validation ids; ``history.csv``: one row per finished epoch (`HISTORY_COLUMNS`);
- ``model.keras``: the best epoch's model, without optimizer;
- ``metrics.json``, ``val_predictions.csv`` (id + one probability per class), ``curves.png``: the final record;
- ``logs/`` (TensorBoard) and, while a run is unfinished, ``backup/`` (BackupAndRestore folders, progress.json);
- ``engines/``: exports of model.keras that `python -m predict ... --engine openvino|onnx` made and reuses, one
  folder per engine and model.keras hash (`engine_cache_dir`); deleting it only costs a re-export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from common.atomic import atomic_write_csv, atomic_write_json, atomic_write_text
from train.config import ConfigError

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.txt"
VAL_IDS_FILE = "val_ids.csv"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
CURVES_FILE = "curves.png"
LOGS_DIR = "logs"
BACKUP_DIR = "backup"  # BackupAndRestore folders (one per stage) and PROGRESS_FILE; removed when the run ends
PROGRESS_FILE = "progress.json"  # inside BACKUP_DIR: the best val mAP and epoch so far
ENGINES_DIR = "engines"  # predict's cached exports of model.keras (--engine openvino|onnx), keyed on its sha256

HISTORY_COLUMNS = ["epoch", "stage", "lr", "loss", "val_loss", "val_map", "seconds", "images_per_second"]
FORMAT_VERSION = 1  # config.json files without "format_version" are version 1
BACKBONE_KEYS = ("name", "input_size", "preprocessing", "min_input_size")  # train.backbones.Backbone.to_config()
SIGMOID_HEAD = {"name": "sigmoid"}  # the head of a config.json without a "head" key (every run before issue 11)
# The "head" record of an rnn run: its decoder settings, the label order and the class order it resolved to (class
# names, the order of each training sequence), and whether the empty set may be decoded.
RNN_HEAD_KEYS = ("name", "cell", "units", "label_embedding", "label_order", "class_order", "allow_empty")


class RunDirError(ConfigError):
    """The RUN_DIR holds something else: another run's settings, or files that are not a run (or not this format)."""


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """config.json: every resolved setting, the backbone entry, classes, versions and the data's fingerprint."""

    format_version: int = FORMAT_VERSION
    backbone: dict  # Backbone.to_config(): name, input_size, preprocessing, min_input_size
    image_size: int
    classes: tuple[str, ...]
    train: dict  # TrainConfig.to_json()
    versions: dict  # tensorflow, keras, python
    manifest_sha256: str
    val_manifest_sha256: str | None  # None when validation was split off the training DATA_DIR
    class_prevalence: tuple[float, ...]  # training prevalence per class, in class order
    n_train: int
    n_val: int
    runtime: dict  # replicas, mixed_precision
    head: dict = field(default_factory=lambda: dict(SIGMOID_HEAD))  # SIGMOID_HEAD, or RNN_HEAD_KEYS for rnn

    @property
    def head_name(self) -> str:
        return str(self.head["name"])

    def to_json(self) -> dict:
        """The record as config.json's JSON object (sequences as lists); a sigmoid run's file has no "head" key, so
        it is byte for byte what it was before the rnn head existed."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.head == SIGMOID_HEAD:
            del out["head"]
        return out


# The JSON types each config.json key must have (bool is excluded from the numbers below).
_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "backbone": (dict,),
    "image_size": (int,),
    "classes": (list,),
    "train": (dict,),
    "versions": (dict,),
    "manifest_sha256": (str,),
    "val_manifest_sha256": (str, type(None)),
    "class_prevalence": (list,),
    "n_train": (int,),
    "n_val": (int,),
    "runtime": (dict,),
}
_OPTIONAL = {"head": SIGMOID_HEAD}  # keys a config.json may leave out, and what their absence means


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found; is {path.parent} a RUN_DIR written by `python -m train`?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None


def record_from_json(data: Any, path: str | Path = CONFIG_FILE) -> RunRecord:
    """Check a config.json object and make it a RunRecord; RunDirError naming `path` and the key at fault."""
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object")
    version = data.get("format_version", 1)  # written before format_version existed: version 1
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise RunDirError(f"{path}: format_version {version!r} is not one this code reads ({FORMAT_VERSION})")
    data = {**_OPTIONAL, **data, "format_version": version}
    unknown = sorted(set(data) - set(_TYPES) - set(_OPTIONAL))
    if unknown:
        raise RunDirError(f"{path}: unknown key {unknown[0]!r} (format_version {version})")
    for key, types in _TYPES.items():
        if key not in data:
            raise RunDirError(f"{path}: missing key {key!r}")
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise RunDirError(f"{path}: key {key!r} should be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    missing = [k for k in BACKBONE_KEYS if k not in data["backbone"]]
    if missing:
        raise RunDirError(f"{path}: missing key 'backbone.{missing[0]}'")
    classes, prevalence = data["classes"], data["class_prevalence"]
    if not all(isinstance(c, str) and c for c in classes):
        raise RunDirError(f"{path}: key 'classes' should list non-empty names, got {classes!r}")
    numbers = all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) for p in prevalence)
    if not numbers or len(prevalence) != len(classes):
        raise RunDirError(
            f"{path}: key 'class_prevalence' should hold one number per class ({len(classes)}), got {prevalence!r}"
        )
    _check_head(data["head"], classes, path)
    return RunRecord(**{**data, "classes": tuple(classes), "class_prevalence": tuple(float(p) for p in prevalence)})


def _check_head(head: Any, classes: list[str], path: str | Path) -> None:
    if not isinstance(head, dict) or head.get("name") not in ("sigmoid", "rnn"):
        raise RunDirError(f"{path}: key 'head' should be an object with name sigmoid or rnn, got {head!r}")
    if head["name"] == "rnn":
        missing = [k for k in RNN_HEAD_KEYS if k not in head]
        if missing:
            raise RunDirError(f"{path}: missing key 'head.{missing[0]}'")
        if sorted(head["class_order"]) != sorted(classes):
            raise RunDirError(f"{path}: key 'head.class_order' should list the classes once each, got "
                              f"{head['class_order']!r}")


# --- config.json, classes.txt ---------------------------------------------------------------------------------


def write_config(run_dir: str | Path, record: RunRecord) -> None:
    atomic_write_json(Path(run_dir) / CONFIG_FILE, record.to_json())


def read_config(run_dir: str | Path) -> RunRecord:
    """config.json as a RunRecord; RunDirError when it is absent, not JSON, or has a missing or unknown key."""
    path = Path(run_dir) / CONFIG_FILE
    return record_from_json(_read_json(path), path)


def write_classes(run_dir: str | Path, classes: Sequence[str]) -> None:
    atomic_write_text(Path(run_dir) / CLASSES_FILE, "".join(f"{c}\n" for c in classes))


def read_classes(run_dir: str | Path) -> list[str]:
    """classes.txt's names in order; RunDirError when it is absent."""
    path = Path(run_dir) / CLASSES_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- model.keras ----------------------------------------------------------------------------------------------


def save_model(model: keras.Model, run_dir: str | Path) -> None:
    """Save the model (without its optimizer) as model.keras via a temporary file and a rename."""
    path = Path(run_dir) / MODEL_FILE
    # A fresh functional model over the same layers carries no optimizer: the file holds only what predict needs.
    export = keras.Model(model.inputs, model.outputs, name=model.name)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        export.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (model.keras can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(run_dir: str | Path) -> str:
    """sha256 of model.keras: the key of the engine cache (a retrained or replaced model is exported again)."""
    return file_sha256(Path(run_dir) / MODEL_FILE)


def config_sha256(run_dir: str | Path) -> str:
    """sha256 of config.json's bytes: names the run an export came from (tagger.json's config_sha256)."""
    return file_sha256(Path(run_dir) / CONFIG_FILE)


def engine_cache_dir(run_dir: str | Path, engine: str, model_digest: str) -> Path:
    """The folder inside ``engines/`` that holds the `engine` export of the model.keras whose sha256 is
    `model_digest` (its first 16 hex digits name the folder; the full digest is checked inside by the caller)."""
    return Path(run_dir) / ENGINES_DIR / f"{engine}-{model_digest[:16]}"


# --- metrics.json ---------------------------------------------------------------------------------------------


def write_metrics(run_dir: str | Path, metrics: dict) -> None:
    atomic_write_json(Path(run_dir) / METRICS_FILE, metrics)


def read_metrics(run_dir: str | Path) -> dict | None:
    """metrics.json, or None when the run has not finished (no such file)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object")
    return data


# --- history.csv, val_ids.csv, val_predictions.csv, backup/progress.json ----------------------------------------


def write_history(run_dir: str | Path, history: pd.DataFrame) -> None:
    atomic_write_csv(Path(run_dir) / HISTORY_FILE, history[HISTORY_COLUMNS])


def read_history(run_dir: str | Path) -> pd.DataFrame:
    """history.csv's rows; an empty frame with HISTORY_COLUMNS when there is none yet."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    return pd.read_csv(path)


def write_val_ids(run_dir: str | Path, ids: Sequence[str]) -> None:
    atomic_write_csv(Path(run_dir) / VAL_IDS_FILE, pd.DataFrame({"id": list(ids)}))


def read_val_ids(run_dir: str | Path) -> list[str]:
    return pd.read_csv(Path(run_dir) / VAL_IDS_FILE, dtype={"id": str})["id"].tolist()


def write_val_predictions(run_dir: str | Path, ids: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> None:
    """val_predictions.csv: one row per validation image, its id then one probability per class."""
    frame = pd.DataFrame(np.asarray(probs), columns=list(classes))
    frame.insert(0, "id", list(ids))
    atomic_write_csv(Path(run_dir) / VAL_PREDICTIONS_FILE, frame)


def read_val_predictions(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / VAL_PREDICTIONS_FILE, dtype={"id": str})


def write_progress(run_dir: str | Path, best_map: float, best_epoch: int | None) -> None:
    atomic_write_json(Path(run_dir) / BACKUP_DIR / PROGRESS_FILE, {"best_map": best_map, "best_epoch": best_epoch})


def read_progress(run_dir: str | Path) -> tuple[float, int | None]:
    """The best val mAP and its epoch so far of an unfinished run; (-inf, None) before any epoch finished."""
    path = Path(run_dir) / BACKUP_DIR / PROGRESS_FILE
    progress = _read_json(path) if path.is_file() else {}
    return progress.get("best_map", -math.inf), progress.get("best_epoch")
