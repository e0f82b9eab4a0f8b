"""Multi-layer perceptrons: the primer's fully connected network, any depth and width.

Each hidden layer is the primer's  a⁽ˡ⁾ = σ(W⁽ˡ⁾ a⁽ˡ⁻¹⁾ + b⁽ˡ⁾)  (a Linear layer, then the
activation σ, then optional dropout); the output layer is a plain Linear layer giving logits
(classes), one logit (binary) or the regression targets. Softmax/sigmoid are NOT applied here: the
loss applies them (cross-entropy = log-softmax + NLL, BCE-with-logits), which is numerically
safer, and `predict` turns logits into probabilities.

The input is flattened, so a (B, 1, 28, 28) image batch and a (B, 784) table batch both work.

Shapes for `mlp-mnist` (B = batch):
    input (B, 1, 28, 28) -> flatten (B, 784)
    fc1 784→512 -> (B, 512)   params (784+1)·512 = 401,920
    fc2 512→256 -> (B, 256)   params (512+1)·256 = 131,328
    head 256→10 -> (B, 10)    params (256+1)·10  = 2,570
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from duboko.errors import unknown_name
from duboko.nn.activations import HIDDEN_ACTIVATIONS, get_activation
from duboko.nn.checks import check_at_least_one, check_dropout
from duboko.registry import register_model


@dataclass
class MLPConfig:
    in_features: int = 784  # inputs per example after flattening (784 = 28·28 MNIST pixels)
    hidden_sizes: list[int] = field(default_factory=lambda: [128])  # width of each hidden layer; [] = linear model
    out_features: int = 10  # outputs: classes (logits), 1 (binary logit) or regression targets
    activation: str = "relu"  # hidden activation: sigmoid | tanh | relu | leaky_relu | gelu | silu
    dropout: float = 0.0  # dropout probability after each hidden activation


class MLP(nn.Module):
    """Flatten, then [Linear → activation → dropout] per hidden size, then a Linear head."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        if config.activation not in HIDDEN_ACTIVATIONS:
            raise unknown_name("hidden activation", config.activation, HIDDEN_ACTIVATIONS)
        check_at_least_one(in_features=config.in_features, out_features=config.out_features)
        if any(h < 1 for h in config.hidden_sizes):
            raise ValueError(f"hidden_sizes must all be >= 1, got {config.hidden_sizes}")
        check_dropout(config.dropout)
        self.config = config
        self.flatten = nn.Flatten()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = config.in_features
        for i, hidden in enumerate(config.hidden_sizes, start=1):
            layers[f"fc{i}"] = nn.Linear(width, hidden)
            layers[f"act{i}"] = get_activation(config.activation)
            if config.dropout > 0:  # no parameters, so the state dict is the same either way
                layers[f"dropout{i}"] = nn.Dropout(config.dropout)
            width = hidden
        self.hidden = nn.Sequential(layers)
        self.head = nn.Linear(width, config.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # (B, in_features)
        if x.shape[1] != self.config.in_features:
            raise ValueError(
                f"MLP expects {self.config.in_features} input features per example, "
                f"got input of shape {tuple(x.shape)}"
            )
        return self.head(self.hidden(x))  # (B, out_features) logits / predictions


def _vector_input(config: MLPConfig, batch_size: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, config.in_features),)


def _mnist_input(config: MLPConfig, batch_size: int) -> tuple[torch.Tensor]:
    if config.in_features == 28 * 28:
        return (torch.randn(batch_size, 1, 28, 28),)
    return _vector_input(config, batch_size)


# Registered variants: the family's arguments once, then each name with what it overrides.
_register = partial(register_model, family="mlp", model_cls=MLP, config_cls=MLPConfig, example_input=_vector_input)
_register("mlp", description="Multi-layer perceptron: any depth/width, activation by name, dropout")
_register(
    "mlp-mnist",
    description="MLP for 28×28 MNIST digits: 784→512→256→10, ReLU, dropout 0.2",
    example_input=_mnist_input,
    in_features=784,
    hidden_sizes=[512, 256],
    out_features=10,
    dropout=0.2,
)
_register(
    "mlp-tabular",
    description="Small MLP for tabular sets (in/out features are filled from the data): 64→64",
    in_features=64,
    hidden_sizes=[64, 64],
    out_features=10,
)
