"""curves.png: training and validation loss and validation mAP per epoch, with the stage boundary marked."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.atomic import atomic_write_bytes

STAGE_BOUNDARY_LABEL = "stage 1 | stage 2"


def curves_figure(history: pd.DataFrame, frozen_epochs: int, title: str = "") -> Figure:
    """Loss and val_loss (left), val_map (right) against epoch; a dashed line at `frozen_epochs` + 0.5 marks stage 2.

    The line is drawn only when both stages have epochs in `history`. The caller closes the figure.
    """
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["loss"], "o-", label="train loss")
    ax_loss.plot(epochs, history["val_loss"], "s-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("binary cross-entropy")
    ax_map.plot(epochs, history["val_map"], "o-", color="tab:green", label="val mAP")
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("mAP")
    if len(history):
        best = history.loc[history["val_map"].idxmax()]
        ax_map.plot([best["epoch"]], [best["val_map"]], "*", color="tab:red", markersize=14, label="best")
    for ax in (ax_loss, ax_map):
        if 0 < frozen_epochs < (epochs.max() if len(history) else 0):
            ax.axvline(frozen_epochs + 0.5, color="grey", linestyle="--", label=STAGE_BOUNDARY_LABEL)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(history: pd.DataFrame, frozen_epochs: int, path: str | Path, title: str = "") -> None:
    """Write `curves_figure` as a PNG to `path`, atomically."""
    fig = curves_figure(history, frozen_epochs, title)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
