"""Pictures that people would rather look at than read (matplotlib, Agg backend).

Every PNG that duboko draws with matplotlib goes through `figure`: it makes the grid of axes and,
when the drawing code is done, renders the figure, writes it atomically and closes it (also when
the drawing fails, so a failed picture neither leaks a figure nor leaves a half-written file):

    with figure("out.png", rows=2, cols=3, size=(9, 6), title="...") as (fig, axes):
        axes[0][0].plot(x, y)   # axes is always a rows x cols grid
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from duboko.errors import DubokoError
from duboko.io import atomic_write_bytes


def _plt():
    """matplotlib.pyplot on the Agg backend (no display needed); imported lazily, it is slow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_output(path: str | Path) -> Path:
    """The one rule for every picture duboko writes (commands' `--out x.png` included): the name
    ends in .png, and an existing file there is replaced only when it is a PNG itself, so a
    mistyped `--out` never replaces a run's config.json, a script or a folder."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DubokoError(f"picture output {str(path)!r} must end in .png")
    if path.is_symlink() or path.exists():
        if path.is_symlink() or not path.is_file():
            raise DubokoError(f"picture output {str(path)!r} exists and is not a regular file; pick another name")
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
        if head != PNG_SIGNATURE:
            raise DubokoError(f"picture output {str(path)!r} exists and is not a PNG; duboko never replaces it")
    return path


@contextmanager
def figure(
    path: str | Path,
    rows: int = 1,
    cols: int = 1,
    *,
    size: tuple[float, float] = (6.4, 4.8),
    title: str = "",
    title_size: float | None = None,
    dpi: int = 120,
) -> Iterator[tuple[Any, Any]]:
    """Yield (figure, axes) with `axes` a rows x cols grid (axes[r][c]); on leaving the block
    lay it out, add the `title` and write it to `path` as a PNG. `size` is in inches."""
    check_png_output(path)  # before anything is drawn
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    try:
        yield fig, axes
        if title:
            fig.suptitle(title, fontsize=title_size)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    save_figure(fig, path, dpi)


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Render a finished figure to PNG, write it atomically and close it (`figure` ends here)."""
    plt = _plt()
    try:
        check_png_output(path)
    except DubokoError:
        plt.close(fig)
        raise
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def hide_ticks(ax) -> None:
    """An image panel: no axis ticks (the pixels are the content)."""
    ax.set_xticks([])
    ax.set_yticks([])


def plot_confusion(cm, class_names: list[str], path: str | Path, title: str = "Confusion matrix") -> None:
    """Labelled heat map; rows = true class, columns = predicted class, counts in the cells."""
    import numpy as np

    cm = np.asarray(cm)  # (C, C) counts
    n = len(class_names)
    with figure(path, size=(1.0 + 0.6 * n, 0.8 + 0.55 * n)) as (fig, axes):
        ax = axes[0][0]
        # Log colour scale so the off-diagonal mistakes are visible beside the large diagonal.
        shown = np.log1p(cm)
        ax.imshow(shown, cmap="Blues")
        # Names longer than a digit ("T-shirt/top", "Sneaker") would run into each other under the
        # columns: those are slanted and anchored at their right end, under their own column.
        long_names = max((len(str(c)) for c in class_names), default=0) > 2
        ax.set_xticks(range(n), class_names, rotation=45 if long_names else 0,
                      ha="right" if long_names else "center", rotation_mode="anchor")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        threshold = shown.max() / 2 if shown.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > threshold else "black")


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Loss and (when present) accuracy per epoch, train vs validation."""
    if not history:
        return
    epochs = [row["epoch"] for row in history]
    has_acc = any("train_accuracy" in row or "val_accuracy" in row for row in history)
    with figure(path, 1, 2 if has_acc else 1, size=(10 if has_acc else 5, 3.6), title=title) as (fig, axes):
        panels = [("loss", axes[0][0])] + ([("accuracy", axes[0][1])] if has_acc else [])
        for metric, ax in panels:
            for split, style in (("train", "-o"), ("val", "--s")):
                key = f"{split}_{metric}"
                points = [(e, row[key]) for e, row in zip(epochs, history) if row.get(key) not in (None, "")]
                if points:
                    ax.plot([p[0] for p in points], [float(p[1]) for p in points], style, label=split)
            ax.set_xlabel("epoch")
            if all(float(e).is_integer() for e in epochs):
                # Whole epochs only: no 1.5, 2.5 ticks between them.
                from matplotlib.ticker import MaxNLocator

                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 2, pad: int = 2) -> None:
    """Images in [-1, 1] (N, 1, H, W) -> a PNG grid (white digits on black), written atomically.
    Pixels, not a chart: drawn with PIL at their own resolution (nearest-neighbour `scale`)."""
    from PIL import Image

    check_png_output(path)
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    canvas = torch.full((rows * (h + pad) + pad, ncol * (w + pad) + pad), 0.35)
    x01 = ((images[:, 0].float().cpu() + 1) / 2).clamp(0, 1)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x01[i]
    img = Image.fromarray((canvas * 255).round().byte().numpy(), mode="L")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
