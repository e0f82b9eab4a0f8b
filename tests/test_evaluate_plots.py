"""evaluate/plots.py: `figure` is the one way a PNG is drawn: a 2-D grid of axes, an atomic PNG
at the end, the figure closed also when the drawing fails (and then no file)."""

from __future__ import annotations

import pytest

from duboko.evaluate.plots import _plt, figure, plot_confusion, plot_curves

PNG = b"\x89PNG\r\n\x1a\n"


def _open_figures() -> int:
    return len(_plt().get_fignums())


def test_figure_yields_a_grid_and_writes_a_png(tmp_path):
    before = _open_figures()
    out = tmp_path / "sub" / "grid.png"  # the folder is created
    with figure(out, 2, 3, size=(6, 4), title="a title") as (fig, axes):
        assert axes.shape == (2, 3)
        axes[1][2].plot([0, 1], [1, 0])
    assert out.read_bytes()[:8] == PNG
    assert fig.get_suptitle() == "a title"
    assert _open_figures() == before  # closed after writing
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left


def test_a_single_panel_is_still_indexed_as_a_grid(tmp_path):
    with figure(tmp_path / "one.png") as (fig, axes):
        assert axes.shape == (1, 1)
        axes[0][0].imshow([[0.0, 1.0], [1.0, 0.0]])
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG


def test_a_failed_drawing_writes_nothing_and_closes_the_figure(tmp_path):
    before = _open_figures()
    out = tmp_path / "broken.png"
    with pytest.raises(ZeroDivisionError):
        with figure(out) as (fig, axes):
            axes[0][0].plot([1, 2])
            1 / 0
    assert not out.exists()
    assert _open_figures() == before


def test_confusion_and_curves(tmp_path):
    plot_confusion([[5, 1], [0, 7]], ["cat", "dog"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == PNG
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "train_accuracy": 0.5, "val_accuracy": ""},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.9, "train_accuracy": 0.8, "val_accuracy": 0.7}]
    plot_curves(history, tmp_path / "curves.png", title="run")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    plot_curves([], tmp_path / "none.png")  # no epochs yet: no picture
    assert not (tmp_path / "none.png").exists()
