"""The k-fold folder format (a member of the RUN_DIR family): the one place that names its files and reads and
writes them.

A k-fold folder is what `python -m train ... --folds K --out DIR` leaves and `python -m predict` reads as one model:

- ``fold_0`` ... ``fold_<K-1>``: one RUN_DIR per fold (train.rundir's format), validated on its held-out part;
- ``oof_predictions.csv``: the out-of-fold predictions, once every fold is finished: id and one probability per
  class, one row per readable training image, in the DATA_DIR's manifest order (val_predictions.csv's layout);
- ``kfold.json``: the summary (`SUMMARY_KEYS`): folds, seed, classes, each fold's val mAP, the OOF mAP, F2 at 0.5,
  per-class thresholds tuned for F2 on the OOF predictions and the F2 they reach, the training images left out as
  unreadable, epochs and training time. Written last: a folder with kfold.json is a finished k-fold model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import atomic_write_csv, atomic_write_json
from train.rundir import BACKUP_DIR, CONFIG_FILE, METRICS_FILE, RunDirError

FOLD_DIR_PREFIX = "fold_"
OOF_PREDICTIONS_FILE = "oof_predictions.csv"
KFOLD_FILE = "kfold.json"
FORMAT_VERSION = 1
# kfold.json's keys; `thresholds` is {class: threshold}, `fold_val_map` one val mAP per fold (fold order),
# `epochs_trained` the most epochs a fold trained, `train_seconds` the folds' training time summed.
SUMMARY_KEYS = ("format_version", "folds", "seed", "classes", "fold_val_map", "oof_map", "f2_at_0.5", "thresholds",
                "f2_at_tuned", "n_oof", "unreadable_ids", "epochs_trained", "train_seconds")
_FOLD_DIR = re.compile(rf"^{FOLD_DIR_PREFIX}\d+$")


def fold_dir(root: str | Path, fold: int) -> Path:
    """The RUN_DIR of fold `fold` (0-based) under the k-fold folder `root`."""
    return Path(root) / f"{FOLD_DIR_PREFIX}{fold}"


def fold_dirs(root: str | Path) -> list[Path]:
    """The fold RUN_DIRs present under `root`, in fold order (gaps included as they are)."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and _FOLD_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(FOLD_DIR_PREFIX):]))


def is_kfold_dir(path: str | Path) -> bool:
    """Whether `path` is a k-fold folder (finished or not): no config.json of its own, and a kfold.json or a fold."""
    path = Path(path)
    return path.is_dir() and not (path / CONFIG_FILE).exists() and (
        (path / KFOLD_FILE).exists() or bool(fold_dirs(path)))


def fold_finished(run_dir: str | Path) -> bool:
    """Whether a fold's RUN_DIR holds a finished run (its final record written, no backup left to resume from)."""
    run_dir = Path(run_dir)
    return (run_dir / METRICS_FILE).is_file() and not (run_dir / BACKUP_DIR).exists()


def check_kfold_out(root: str | Path) -> None:
    """Refuse a --out for --folds that holds something else: a single run, or files that are not a k-fold folder."""
    root = Path(root)
    if (root / CONFIG_FILE).exists():
        raise RunDirError(f"{root} holds a single run ({CONFIG_FILE}), not a k-fold folder; choose a new --out for "
                          "--folds")
    if root.is_dir() and any(root.iterdir()) and not is_kfold_dir(root):
        raise RunDirError(f"{root} exists, is not empty and is not a k-fold folder (no {KFOLD_FILE}, no "
                          f"{FOLD_DIR_PREFIX}N folders); choose an empty or new --out")


def write_oof_predictions(root: str | Path, ids: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> None:
    """oof_predictions.csv: one row per image, its id then one probability per class (val_predictions.csv's
    layout and number format)."""
    frame = pd.DataFrame(np.asarray(probs), columns=list(classes))
    frame.insert(0, "id", list(ids))
    atomic_write_csv(Path(root) / OOF_PREDICTIONS_FILE, frame)


def read_oof_predictions(root: str | Path) -> pd.DataFrame:
    path = Path(root) / OOF_PREDICTIONS_FILE
    if not path.is_file():
        raise RunDirError(f"{path}: not found; the k-fold run is not finished")
    return pd.read_csv(path, dtype={"id": str})


def write_summary(root: str | Path, summary: dict) -> None:
    """kfold.json, after checking it has exactly SUMMARY_KEYS."""
    if set(summary) != set(SUMMARY_KEYS):
        raise ValueError(f"k-fold summary keys {sorted(summary)} are not {sorted(SUMMARY_KEYS)}")
    atomic_write_json(Path(root) / KFOLD_FILE, {k: summary[k] for k in SUMMARY_KEYS})


def read_summary(root: str | Path) -> dict:
    """kfold.json; RunDirError when it is absent, not JSON, of another format version, or has a missing or unknown
    key or per-class thresholds that do not match its classes."""
    path = Path(root) / KFOLD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found; the k-fold run is not finished (train its remaining folds)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise RunDirError(f"{path}: format_version {data.get('format_version')!r} is not one this code reads "
                          f"({FORMAT_VERSION})")
    missing = [k for k in SUMMARY_KEYS if k not in data]
    if missing:
        raise RunDirError(f"{path}: missing key {missing[0]!r}")
    unknown = sorted(set(data) - set(SUMMARY_KEYS))
    if unknown:
        raise RunDirError(f"{path}: unknown key {unknown[0]!r}")
    folds, thresholds = data["folds"], data["thresholds"]
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise RunDirError(f"{path}: key 'folds' should be an integer of at least 2, got {folds!r}")
    if not isinstance(thresholds, dict) or sorted(thresholds) != sorted(data["classes"]):
        raise RunDirError(f"{path}: key 'thresholds' should map each class to a threshold, got {thresholds!r}")
    return data
