"""evaluate/activations.py: the values table and the picture of every activation."""

from __future__ import annotations

import pytest
import torch

from duboko.errors import DubokoError
from duboko.evaluate.activations import activation_values, plot_activations
from duboko.nn import activations as A


def test_values_come_from_the_formulas():
    points = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    table = activation_values(["relu", "sigmoid", "softmax", "tanh"], points)
    assert list(table) == ["relu", "sigmoid", "tanh"]  # softmax has no value at a single point
    assert table["relu"] == ([0.0, 0.0, 2.0], [0.0, 0.0, 1.0])
    y, dy = table["sigmoid"]
    assert y[1] == pytest.approx(0.5) and dy[1] == pytest.approx(0.25)  # σ'(0) = 1/4
    assert dy[0] == pytest.approx(y[0] * (1 - y[0]))
    assert table["tanh"][1][1] == pytest.approx(1.0)  # tanh'(0) = 1


def test_default_is_every_elementwise_activation():
    table = activation_values(None, torch.zeros(1, dtype=torch.float64))
    assert set(table) == {n for n in A.activation_names() if A.get(n).elementwise}


def test_plot_writes_a_png_and_returns_the_names(tmp_path):
    out = tmp_path / "act.png"
    assert plot_activations(out, ["gelu", "softmax"], x_range=3.0) == ["gelu", "softmax"]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_activations(tmp_path / "all.png") == A.activation_names()


def test_bad_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(DubokoError, match="swish9"):
        plot_activations(tmp_path / "x.png", ["relu", "swish9"])
    with pytest.raises(DubokoError, match="x_range must be > 0"):
        plot_activations(tmp_path / "x.png", ["relu"], x_range=0)
    assert not (tmp_path / "x.png").exists()
