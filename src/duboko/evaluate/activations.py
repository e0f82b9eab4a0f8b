"""Activation functions made visible: each one and its derivative, plotted and tabulated.

The values come from the hand-written formulas in `duboko.nn.activations` (not from autograd),
so the picture shows what the formulas say; `tests/test_basics_activations.py` checks the
formulas against autograd.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from duboko.errors import DubokoError
from duboko.nn import activations as A


def _checked(names: list[str] | None) -> list[str]:
    """The names asked for (default: all), each known; an unknown one fails with the valid list."""
    names = list(names or A.activation_names())
    for n in names:
        A.get(n)
    return names


def activation_values(names: list[str] | None, points: torch.Tensor) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (f(points), f'(points))} for the elementwise activations among `names` (softmax
    mixes the entries of a vector, so it has no value at a single point). points: (N,)."""
    table = {}
    for name in _checked(names):
        act = A.get(name)
        if act.elementwise:
            table[name] = (act.fn(points).tolist(), act.derivative(points).tolist())
    return table


def plot_activations(path: str | Path, names: list[str] | None = None, x_range: float = 5.0) -> list[str]:
    """One panel per activation on x in [-x_range, x_range]: the function (solid) and its
    derivative (dashed). Returns the names drawn."""
    from duboko.evaluate.plots import figure

    names = _checked(names)
    if x_range <= 0:
        raise DubokoError(f"x_range must be > 0, got {x_range}")
    x = torch.linspace(-x_range, x_range, 801, dtype=torch.float64)  # (801,)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    title = "activations (solid) and their derivatives (dashed)"
    with figure(path, rows, cols, size=(3.6 * cols, 3.0 * rows), title=title) as (fig, axes):
        for i, name in enumerate(names):
            act = A.get(name)
            ax = axes[i // cols][i % cols]
            if act.elementwise:
                ax.plot(x, act.fn(x), label=f"{name}(x)")
                ax.plot(x, act.derivative(x), "--", label=f"{name}'(x)")
                ax.set_title(f"{name}: {act.formula}", fontsize=9)
            else:  # softmax of the logits [x, 0] (N, 2): its first entry (= sigmoid(x)) and ∂s₀/∂x₀
                logits = torch.stack([x, torch.zeros_like(x)], dim=-1)
                ax.plot(x, act.fn(logits)[:, 0], label="s₀")
                ax.plot(x, act.derivative(logits)[:, 0], "--", label="∂s₀/∂x₀ = s₀(1-s₀)")
                ax.set_title(f"softmax([x, 0])₀: {act.formula}", fontsize=9)
            ax.axhline(0, color="gray", lw=0.5)
            ax.axvline(0, color="gray", lw=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for k in range(len(names), rows * cols):
            axes[k // cols][k % cols].axis("off")
    return names
