"""A small MNIST classifier used to score generated digits (prompt_accuracy, fd_mnist).

It plays the role Inception-v3 plays for FID on natural images, but is trained by the project on
MNIST (recipe `mnist-scorer`) so no download is needed; its weights ship in
`duboko/data/bundled/scorer/` (see the README there). Small on purpose (≈ 0.23 M parameters,
≈ 4.6 MFLOP per image) so that scoring hundreds of samples costs nothing next to sampling them.

Shapes (B = batch), input normalised like the image-classification task ((x - 0.1307) / 0.3081):
    input (B, 1, 28, 28)
    conv1 1→16, 3×3, pad 1, ReLU, 2×2 max-pool  -> (B, 16, 14, 14)
    conv2 16→32, 3×3, pad 1, ReLU, 2×2 max-pool -> (B, 32, 7, 7)
    conv3 32→64, 3×3, pad 1, ReLU               -> (B, 64, 7, 7)
    fc1 3136→64, ReLU                           -> (B, 64)   the features for the Fréchet distance
    dropout, fc2 64→10                          -> (B, 10)   logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duboko.models.cnn import ConvClassifier, image_input
from duboko.registry import register_model


@dataclass
class ScorerConfig:
    in_channels: int = 1  # grey MNIST
    image_size: int = 28  # input side; divisible by 4 (two pools)
    num_classes: int = 10  # digits
    feature_dim: int = 64  # width of the penultimate layer (the Fréchet-distance features)
    dropout: float = 0.25  # dropout before the classifier layer


class MnistScorer(ConvClassifier):
    """Three 3×3 convolutions, two max-pools, a 64-wide feature layer and a linear classifier."""

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        side = self.pooled_side
        self.conv1 = nn.Conv2d(config.in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * side * side, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, H/4, W/4)
        x = F.relu(self.conv3(x))  # (B, 64, H/4, W/4)
        return F.relu(self.fc1(torch.flatten(x, 1)))  # (B, feature_dim)


register_model(
    "mnist-scorer",
    family="cnn",
    model_cls=MnistScorer,
    config_cls=ScorerConfig,
    description="Small MNIST classifier (0.23M params) whose features score generated digits (fd_mnist)",
    example_input=image_input,
)
