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

import torch
import torch.nn.functional as F
from torch import nn

from duboko.registry import register_model


@dataclass
class MyNetConfig:
    in_channels: int = 3  # image channels (MNIST is grey, replicated to RGB as in the primer)
    image_size: int = 48  # input height = width; must be divisible by 4 (two 2×2 pools)
    num_classes: int = 10  # output logits
    dropout: float = 0.5  # dropout before the last layer


class MyNet(nn.Module):
    """The primer's CNN: three 3×3 convolutions, two max-pools, two fully connected layers."""

    def __init__(self, config: MyNetConfig):
        super().__init__()
        if config.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {config.image_size}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        side = config.image_size // 4
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))  # (B, num_classes) logits


def _image_input(config: MyNetConfig, batch_size: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, config.in_channels, config.image_size, config.image_size),)


register_model(
    "my_net",
    family="cnn",
    model_cls=MyNet,
    config_cls=MyNetConfig,
    description="The primer's CNN: conv 3→32→64, pool, conv 64→128, pool, fc 18432→512→classes",
    example_input=_image_input,
)
register_model(
    "my_net_28",
    family="cnn",
    model_cls=MyNet,
    config_cls=MyNetConfig,
    description="MY_NET on raw 28×28 grey MNIST (one input channel)",
    example_input=_image_input,
    in_channels=1,
    image_size=28,
)
