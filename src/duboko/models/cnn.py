"""Convolutional networks: the primer's reference model MY_NET.

Layer names and shapes are exactly the primer's (`conv1 conv2 pool1 conv3 pool2 fc1 fc2 dropout`),
so a state dict saved by the primer's own code loads into `MyNet` unchanged.

Shapes for the primer's 48×48 RGB input (B = batch):
    input (B, 3, 48, 48)
    conv1 3→32, 3×3, pad 1  -> (B, 32, 48, 48)   params (3·3·3+1)·32   = 896
    conv2 32→64, 3×3, pad 1 -> (B, 64, 48, 48)   params (3·3·32+1)·64  = 18,496
    pool1 2×2               -> (B, 64, 24, 24)
    conv3 64→128, 3×3, pad 1-> (B, 128, 24, 24)  params (3·3·64+1)·128 = 73,856
    pool2 2×2               -> (B, 128, 12, 12)
    fc1 18432→512           -> (B, 512)          params (18432+1)·512  = 9,437,696
    dropout 0.5, fc2 512→10 -> (B, 10)           params (512+1)·10     = 5,130
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from duboko.nn.checks import check_divisible, check_dropout
from duboko.registry import register_model


class ImageClassifierConfig(Protocol):
    """The fields a `ConvClassifier` config has (MyNetConfig, models.scorer.ScorerConfig)."""

    in_channels: int
    image_size: int
    num_classes: int
    dropout: float


class ConvClassifier(nn.Module):
    """What the CNN classifiers share: the config checks, `features(x)` (B, F) written by each
    subclass, then dropout and the linear layer `fc2` -> (B, num_classes) logits. Subclasses
    create every layer (their names are the state dict's keys)."""

    def __init__(self, config: ImageClassifierConfig):
        super().__init__()
        # A negative size would pass the divisibility check and even give positive layer widths
        # (128·(-16/4)² > 0), so the sign is checked first.
        if not isinstance(config.image_size, int) or config.image_size < 4:
            raise ValueError(f"image_size must be an integer >= 4 (two 2×2 max-pools), got {config.image_size!r}")
        check_divisible("image_size", config.image_size, 4, "two 2×2 max-pools")
        check_dropout(config.dropout)
        self.config = config
        self.pooled_side = config.image_size // 4  # side of the feature map after the two pools

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))  # (B, num_classes) logits


@dataclass
class MyNetConfig:
    in_channels: int = 3  # image channels (MNIST is grey, replicated to RGB as in the primer)
    image_size: int = 48  # input height = width; must be divisible by 4 (two 2×2 pools)
    num_classes: int = 10  # output logits
    dropout: float = 0.5  # dropout before the last layer


class MyNet(ConvClassifier):
    """The primer's CNN: three 3×3 convolutions, two max-pools, two fully connected layers."""

    def __init__(self, config: MyNetConfig):
        super().__init__(config)
        side = self.pooled_side
        self.conv1 = nn.Conv2d(config.in_channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(128 * side * side, 512)  # 18432 = 128·12·12 for 48×48 input
        self.fc2 = nn.Linear(512, config.num_classes)
        self.dropout = nn.Dropout(config.dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (B, 512) features, also used to score generated images."""
        # The primer writes pool(relu(conv(x))). Max-pooling and ReLU commute (ReLU is monotone:
        # max(relu(a), relu(b)) = relu(max(a, b))), so relu(pool(conv(x))) gives the same values
        # and the same gradients while ReLU touches 4x fewer elements. ReLU runs in place: the
        # backward of conv, pool and linear needs their inputs, not their outputs. Together ~10%
        # of a CPU training step (docs/benchmarks.md); tests/test_models_cnn.py checks equality.
        x = F.relu(self.conv1(x), inplace=True)  # (B, 32, H, W)
        x = F.relu(self.pool1(self.conv2(x)), inplace=True)  # (B, 64, H/2, W/2)
        x = F.relu(self.pool2(self.conv3(x)), inplace=True)  # (B, 128, H/4, W/4)
        x = torch.flatten(x, 1)  # (B, 128·H/4·W/4)
        return F.relu(self.fc1(x), inplace=True)  # (B, 512)


def image_input(config: ImageClassifierConfig, batch_size: int) -> tuple[torch.Tensor]:
    """An example batch (B, in_channels, image_size, image_size) for an image classifier's config."""
    return (torch.randn(batch_size, config.in_channels, config.image_size, config.image_size),)


# Registered variants: the family's arguments once, then each name with what it overrides.
_register = partial(register_model, family="cnn", model_cls=MyNet, config_cls=MyNetConfig, example_input=image_input)
_register("my_net", description="The primer's CNN: conv 3→32→64, pool, conv 64→128, pool, fc 18432→512→classes")
_register("my_net_28", description="MY_NET on raw 28×28 grey MNIST (one input channel)", in_channels=1, image_size=28)


# -- Madry et al.'s MNIST CNN (the adversarial-training baseline of `mnist-robust`) ---------------
@dataclass
class MadryCNNConfig:
    in_channels: int = 1  # image channels
    image_size: int = 28  # input height = width; divisible by 4 (two 2×2 pools)
    num_classes: int = 10  # output logits
    channels: tuple[int, int] = (32, 64)  # widths of the two 5×5 convolutions (Madry et al.: 32, 64)
    hidden_size: int = 1024  # width of the fully connected layer (Madry et al.: 1024)


class MadryCNN(nn.Module):
    """Madry et al. 2018's MNIST classifier: conv 5×5 → pool → conv 5×5 → pool → fc → fc."""

    def __init__(self, config: MadryCNNConfig):
        super().__init__()
        check_divisible("image_size", config.image_size, 4, "two 2×2 pools")
        self.config = config
        c1, c2 = config.channels
        side = config.image_size // 4
        self.conv1 = nn.Conv2d(config.in_channels, c1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(c2 * side * side, config.hidden_size)
        self.fc2 = nn.Linear(config.hidden_size, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, S/4, S/4)
        x = F.relu(self.fc1(torch.flatten(x, 1)))  # (B, hidden)
        return self.fc2(x)  # (B, classes)


register_model("madry_cnn", family="cnn", model_cls=MadryCNN, config_cls=MadryCNNConfig, example_input=image_input,
               description="Madry et al.'s MNIST CNN: conv 5×5 1→32, pool, conv 5×5 32→64, pool, fc 3136→1024→10")
