"""Pictures that people would rather look at than read (matplotlib, Agg backend)."""

from __future__ import annotations

import io
from pathlib import Path

from duboko.io import atomic_write_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Render a figure to PNG and write it atomically."""
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_confusion(cm, class_names: list[str], path: str | Path, title: str = "Confusion matrix") -> None:
    """Labelled heat map; rows = true class, columns = predicted class, counts in the cells."""
    plt = _plt()
    import numpy as np

    cm = np.asarray(cm)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    # Log colour scale so the off-diagonal mistakes are visible beside the large diagonal.
    shown = np.log1p(cm)
    ax.imshow(shown, cmap="Blues")
    ax.set_xticks(range(n), class_names)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > threshold else "black")
    save_figure(fig, path)


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Loss and (when present) accuracy per epoch, train vs validation."""
    plt = _plt()
    if not history:
        return
    epochs = [row["epoch"] for row in history]
    has_acc = any("train_accuracy" in row or "val_accuracy" in row for row in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6), squeeze=False)
    panels = [("loss", axes[0][0])] + ([("accuracy", axes[0][1])] if has_acc else [])
    for metric, ax in panels:
        for split, style in (("train", "-o"), ("val", "--s")):
            key = f"{split}_{metric}"
            points = [(e, row[key]) for e, row in zip(epochs, history) if row.get(key) not in (None, "")]
            if points:
                ax.plot([p[0] for p in points], [float(p[1]) for p in points], style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
