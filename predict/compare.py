"""Compare runs on one labelled DATA_DIR: a table sorted by mAP (Markdown and CSV) and a bar chart of mAP per backbone.

Each run is evaluated alone, twice: plain prediction (mAP without TTA, and the images per second, measured
after a warm-up batch so that tracing the model is not counted) and with `--tta N` views (mAP with TTA, and F2 at
0.5 and at the run's tuned thresholds, both on the TTA probabilities). Backbone, input size and parameter count
come from the run's config and model; epochs and training time from its metrics.json. The table is how a user
picks a backbone, in the spirit of timm's validate.py results CSV.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import atomic_write_bytes, atomic_write_csv, atomic_write_text
from predict.engines import DEFAULT_ENGINE, DEFAULT_PRECISION, check_engine, check_precision
from predict.errors import PredictError
from predict.evaluate import load_labelled
from predict.inference import DEFAULT_BATCH_SIZE, predict_ensemble
from predict.options import check_batch_size, check_beam, check_runs
from predict.runs import load_run
from predict.thresholds import apply_thresholds
from predict.tta import check_tta
from train.metrics import f2_samples, mean_average_precision

DEFAULT_OUT = Path("submissions/compare")
TABLE_MD, TABLE_CSV, CHART_PNG = "compare.md", "compare.csv", "compare.png"

# CSV column -> Markdown header ({n}: the TTA view count), in table order.
COLUMNS = {
    "run": "run",
    "backbone": "backbone",
    "input_size": "input (px)",
    "params": "parameters",
    "epochs": "epochs",
    "train_seconds": "training time",
    "map": "mAP (no TTA)",
    "map_tta": "mAP (TTA x{n})",
    "f2_at_0.5": "F2 @0.5",
    "f2_at_tuned": "F2 @tuned",
    "images_per_second": "images/s",
}


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of `python -m predict compare`; `resolve()` checks them (`compare` calls it)."""

    runs: tuple[Path, ...]
    data: Path
    tta: int = 8
    out: Path = DEFAULT_OUT
    batch_size: int = DEFAULT_BATCH_SIZE
    progress: bool = True
    beam: int = 1  # rnn runs: beam width of the decoder (1 = greedy, as trained and validated)
    engine: str = DEFAULT_ENGINE  # keras, openvino or onnx (predict.engines)
    precision: str = DEFAULT_PRECISION  # f32, or bf16 with the openvino engine on a CPU that has it

    def resolve(self) -> CompareConfig:
        """A copy with every option checked; raises PredictError."""
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise PredictError(f"--out {out} is a file; compare writes a folder (compare.md, compare.csv, compare.png)")
        return dataclasses.replace(
            self,
            runs=check_runs(self.runs),
            data=Path(self.data),
            tta=check_tta(self.tta),
            out=out,
            batch_size=check_batch_size(self.batch_size),
            beam=check_beam(self.beam),
            engine=check_engine(self.engine),
            precision=check_precision(self.precision, self.engine),
        )


@dataclass(frozen=True)
class CompareResult:
    """The comparison table (sorted by mAP with TTA) and the files written."""

    table: pd.DataFrame
    markdown: str
    markdown_path: Path
    csv_path: Path
    chart_path: Path


def _metric(metrics: dict | None, key: str) -> float:
    value = (metrics or {}).get(key)
    return float(value) if value is not None else float("nan")


def compare_run(
    run_path: str | Path,
    data: str | Path,
    *,
    tta: int,
    batch_size: int,
    progress: bool,
    beam: int = 1,
    engine: str = DEFAULT_ENGINE,
    precision: str = DEFAULT_PRECISION,
) -> dict:
    """One row of the comparison table for one RUN_DIR (`beam` applies to rnn runs; sigmoid runs have none), scored
    by `engine` at `precision` (taken as checked)."""
    run = load_run(run_path, engine=engine, precision=precision)
    if run.head == "rnn":
        run = run.with_beam(beam)
    images = load_labelled(data, run.classes)
    if not images.ids:
        raise PredictError(f"{data}: no stored images to evaluate on")
    common = dict(ids=images.ids, batch_size=batch_size, progress=progress)
    plain = predict_ensemble([run], images.paths, tta=1, warmup=True, **common)
    with_tta = predict_ensemble([run], images.paths, tta=tta, **common) if tta > 1 else plain
    k = len(run.classes)
    row = {
        "run": run.name,
        "backbone": run.backbone,
        "input_size": run.image_size,
        "params": int(run.model.count_params()),
        "epochs": _metric(run.metrics, "epochs_trained"),
        "train_seconds": _metric(run.metrics, "train_seconds"),
        "map": float(mean_average_precision(images.labels, plain.probabilities)),
        "map_tta": float(mean_average_precision(images.labels, with_tta.probabilities)),
        "f2_at_0.5": float(f2_samples(images.labels, apply_thresholds(with_tta.probabilities, np.full(k, 0.5)))),
        "f2_at_tuned": float(f2_samples(images.labels, apply_thresholds(with_tta.probabilities, run.tuned_thresholds))),
        "images_per_second": float(plain.images_per_second),
    }
    del run
    keras.backend.clear_session()  # free the model before the next (possibly large) one loads
    gc.collect()
    return row


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _cell(column: str, value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    if column == "epochs":
        return f"{value:.0f}"
    if column == "train_seconds":
        return _duration(value)
    if column == "images_per_second":
        return f"{value:.1f}"
    if column in ("map", "map_tta", "f2_at_0.5", "f2_at_tuned"):
        return f"{value:.4f}"
    return str(value)


def markdown_table(table: pd.DataFrame, tta: int) -> str:
    """The table as GitHub Markdown, numbers rounded for reading (the CSV keeps them whole)."""
    headers = [COLUMNS[c].format(n=tta) for c in table.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in table.columns) + " |")
    return "\n".join(lines) + "\n"


def _labels(table: pd.DataFrame) -> list[str]:
    # The backbone names the bar, unless two runs share a backbone: then the run name tells them apart.
    counts = table["backbone"].value_counts()
    return [b if counts[b] == 1 else f"{b}\n{r}" for b, r in zip(table["backbone"], table["run"], strict=True)]


def chart_png(table: pd.DataFrame, tta: int, title: str) -> bytes:
    """A grouped bar chart of mAP per backbone, without and with TTA, as PNG bytes (Agg, no display needed)."""
    fig = Figure(figsize=(max(5.0, 1.6 * len(table) + 2), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(table))
    width = 0.38
    for offset, column, label in ((-width / 2, "map", "no TTA"), (width / 2, "map_tta", f"TTA x{tta}")):
        bars = ax.bar(x + offset, table[column].to_numpy(), width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(x, _labels(table))
    ax.set_ylabel("mAP")
    ax.set_ylim(0, min(1.35, max(0.1, float(np.nanmax(table[["map", "map_tta"]].to_numpy())) * 1.3)))
    ax.set_title(title)
    ax.legend(loc="upper right", ncol=2)  # above the bars: the y range leaves headroom
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def compare(config: CompareConfig) -> CompareResult:
    """Evaluate each run on the DATA_DIR and write compare.md, compare.csv and compare.png into `config.out`."""
    config = config.resolve()
    tta, out = config.tta, config.out
    rows = [
        compare_run(p, config.data, tta=tta, batch_size=config.batch_size, progress=config.progress,
                    beam=config.beam, engine=config.engine, precision=config.precision)
        for p in config.runs
    ]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table = table.sort_values(["map_tta", "map"], ascending=False, kind="stable").reset_index(drop=True)
    markdown = markdown_table(table, tta) + (
        f"\nData: `{config.data}`. Sorted by mAP with TTA. F2 columns use the TTA x{tta} probabilities; "
        f"images/s is plain prediction (decode, resize, model; batch {config.batch_size}; "
        f"engine {config.engine} {config.precision}) on this machine.\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / TABLE_MD, out / TABLE_CSV, out / CHART_PNG)
    atomic_write_text(paths[0], markdown)
    atomic_write_csv(paths[1], table)
    atomic_write_bytes(paths[2], chart_png(table, tta, f"mAP per backbone on {Path(config.data).name}"))
    return CompareResult(table, markdown, *paths)
