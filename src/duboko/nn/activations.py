"""Activation functions by name, with their derivatives written out by hand.

The primer's backpropagation needs σ'(z) for every activation σ (the δ = (Wᵀδ') ⊙ σ'(z) step), so
each activation here comes with its derivative in closed form, tested against autograd and
against torch's own implementation. `get_activation(name)` gives the `nn.Module` that models use.

    sigmoid     σ(x) = 1 / (1 + e^-x)                 σ'(x) = σ(x)(1 - σ(x))
    tanh        tanh(x)                               1 - tanh²(x)
    relu        max(0, x)                             1 if x > 0 else 0 (0 at x = 0, as torch)
    leaky_relu  x if x > 0 else a·x  (a = 0.01)       1 if x > 0 else a
    gelu        x·Φ(x)   (Hendrycks & Gimpel 2016)    Φ(x) + x·φ(x)
    silu        x·σ(x)   (a.k.a. swish)               σ(x)(1 + x(1 - σ(x)))
    softmax     e^xᵢ / Σⱼ e^xⱼ  over the last dim      ∂sᵢ/∂xⱼ = sᵢ(δᵢⱼ - sⱼ)  (a Jacobian)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from duboko.errors import unknown_name

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default negative slope


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def sigmoid_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


def tanh_derivative(x: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(x) ** 2


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, min=0)


def relu_derivative(x: torch.Tensor) -> torch.Tensor:
    # The subgradient at 0 is taken as 0, which is what torch's autograd uses.
    return (x > 0).to(x.dtype)


def leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, LEAKY_SLOPE * x)


def leaky_relu_derivative(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, LEAKY_SLOPE))


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:  # Φ(x)
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))


def _normal_pdf(x: torch.Tensor) -> torch.Tensor:  # φ(x)
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def gelu(x: torch.Tensor) -> torch.Tensor:
    # The exact (erf) form, as torch.nn.GELU(approximate="none").
    return x * _normal_cdf(x)


def gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    return _normal_cdf(x) + x * _normal_pdf(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def silu_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def softmax(x: torch.Tensor) -> torch.Tensor:
    # Subtracting the max changes nothing mathematically and keeps exp() from overflowing.
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def softmax_jacobian(x: torch.Tensor) -> torch.Tensor:
    """(..., n) logits -> (..., n, n) Jacobian J[i, j] = ∂sᵢ/∂xⱼ = sᵢ(δᵢⱼ - sⱼ)."""
    s = softmax(x)
    return torch.diag_embed(s) - s.unsqueeze(-1) * s.unsqueeze(-2)


def softmax_derivative(x: torch.Tensor) -> torch.Tensor:
    """The diagonal of the softmax Jacobian, ∂sᵢ/∂xᵢ = sᵢ(1 - sᵢ) (what a 1-D plot can show)."""
    s = softmax(x)
    return s * (1 - s)


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # the function, written out
    derivative: Callable[[torch.Tensor], torch.Tensor]  # its derivative (elementwise; diagonal for softmax)
    module: Callable[[], nn.Module]  # torch's module for it (what models use)
    formula: str  # for plot titles and `duboko activations`
    elementwise: bool = True  # False for softmax, which mixes the entries of the last dim


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("sigmoid", sigmoid, sigmoid_derivative, nn.Sigmoid, "1/(1+e^-x)"),
        Activation("tanh", tanh, tanh_derivative, nn.Tanh, "tanh(x)"),
        Activation("relu", relu, relu_derivative, nn.ReLU, "max(0, x)"),
        Activation(
            "leaky_relu",
            leaky_relu,
            leaky_relu_derivative,
            lambda: nn.LeakyReLU(LEAKY_SLOPE),
            f"max({LEAKY_SLOPE}x, x)",
        ),
        Activation("gelu", gelu, gelu_derivative, nn.GELU, "x·Φ(x)"),
        Activation("silu", silu, silu_derivative, nn.SiLU, "x·σ(x)"),
        Activation(
            "softmax", softmax, softmax_derivative, lambda: nn.Softmax(dim=-1), "e^xᵢ/Σe^xⱼ", False
        ),
    )
}

# Activations usable between hidden layers (softmax normalises a whole vector: it belongs to the
# output, and there the loss applies it).
HIDDEN_ACTIVATIONS = tuple(n for n, a in ACTIVATIONS.items() if a.elementwise)


def get(name: str) -> Activation:
    """The `Activation` record for a name; unknown names fail with the list of valid ones."""
    if name not in ACTIVATIONS:
        raise unknown_name("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def get_activation(name: str) -> nn.Module:
    """A fresh `nn.Module` for an activation name, e.g. get_activation("gelu") -> nn.GELU()."""
    return get(name).module()


def activation_names() -> list[str]:
    return list(ACTIVATIONS)
