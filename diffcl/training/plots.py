"""Training curves as a PNG: the loss parts and the validation metric per epoch."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from diffcl.core.io import atomic_path


def plot_history(history: pl.DataFrame, target: Path, metric: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = history.get_column("epoch").to_numpy()
    skip = {"epoch", "train_seconds", "eval_seconds"}
    for column in history.columns:
        if column in skip or column.startswith("valid_"):
            continue
        ax_loss.plot(epochs, history.get_column(column).to_numpy(), label=column)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    key = f"valid_{metric}"
    if key in history.columns:
        evaluated = history.filter(pl.col(key).is_not_null())
        values = evaluated.get_column(key).to_numpy()
        ax_metric.plot(evaluated.get_column("epoch").to_numpy(), values, marker=".", label=metric)
        best = int(values.argmax())
        ax_metric.axvline(evaluated.get_column("epoch")[best], color="grey", linestyle=":", label="best")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"validation {metric}")
    ax_metric.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
