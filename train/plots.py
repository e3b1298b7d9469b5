"""curves.png: training and validation loss and validation mAP per epoch, with the stage boundary marked."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.atomic import atomic_write_bytes  # noqa: E402


def plot_curves(history: pd.DataFrame, frozen_epochs: int, path: str | Path, title: str = "") -> None:
    """Draw loss, val_loss and val_map against epoch; a dashed line after epoch `frozen_epochs` marks stage 2."""
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
            ax.axvline(frozen_epochs + 0.5, color="grey", linestyle="--", label="stage 1 | stage 2")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
