"""Residual networks for small images: the CIFAR-10 ResNets of He et al. 2016, "Deep Residual
Learning for Image Recognition", section 4.2.

The paper's CIFAR design: a 3×3 convolution with 16 filters, then 3 stages of n basic blocks
(two 3×3 convolutions each, BatchNorm after every convolution, ReLU after the first and after the
addition) with 16, 32 and 64 filters on feature maps of 32, 16 and 8 pixels, the first block of
stages 2 and 3 halving the map with stride 2; then global average pooling and a linear layer:
6n + 2 weighted layers (n = 3: ResNet-20, 0.27 M parameters; n = 9: ResNet-56, 0.85 M).

Shortcuts where the shape changes (first block of stages 2 and 3):
  * option A (the paper's choice for CIFAR, and the default): identity on every second pixel,
    with zero channels padded on for the extra filters; no parameters;
  * option B: a 1×1 convolution with stride 2 and BatchNorm (a projection), as in the ImageNet
    ResNets.
Elsewhere the shortcut is the identity.

Shapes for a 28×28 grey input (Fashion-MNIST) with widths 16/32/64, B = batch:
    input                 (B, 1, 28, 28)
    stem conv 3×3 + BN    (B, 16, 28, 28)
    stage 1 (n blocks)    (B, 16, 28, 28)
    stage 2 (stride 2)    (B, 32, 14, 14)
    stage 3 (stride 2)    (B, 64, 7, 7)
    global average pool   (B, 64)
    fc                    (B, num_classes)
Global average pooling makes the network independent of the input size (28, 32, 64, ...).

Variants:
    resnet-small   depth 8 (n = 1), widths 32/64/128, option B     0.31 M   Fashion-MNIST on a CPU
    resnet20       depth 20 (n = 3), widths 16/32/64, option A     0.27 M   the paper's ResNet-20
    resnet32       depth 32 (n = 5)                                0.46 M
    resnet56       depth 56 (n = 9)                                0.85 M
resnet-small trades depth for width: at 28×28 it costs 37 M mult-adds per image against
ResNet-20's 31 M, in 7 convolutions instead of 19, each wide enough to keep a CPU's vector units
busy, with 4× wider features at the classifier (128 instead of 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from duboko.registry import register_model

SHORTCUTS = ("A", "B")

# ---------------------------------------------------------------------------------------------
# Blocks.


class PadShortcut(nn.Module):
    """Option A: x[:, :, ::s, ::s] with (out - in) zero channels appended; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, ceil(H/s), ceil(W/s))
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # zeros after the last channel -> (B, C_out, ...)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU (fig. 2 of the paper)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


# ---------------------------------------------------------------------------------------------
# Config and model.


@dataclass
class ResNetConfig:
    in_channels: int = 3  # image channels (1 for Fashion-MNIST)
    num_classes: int = 10  # output logits
    depth: int = 20  # weighted layers, 2·n·stages + 2 (6n + 2 with 3 stages): 20, 32, 44, 56, 110
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # filters per stage; each later stage halves the map
    shortcut: str = "A"  # where the shape changes: "A" zero-padded identity (paper, CIFAR), "B" 1×1 projection
    stem_stride: int = 1  # stride of the first convolution: 2 halves big inputs (64×64 and up) before stage 1
    dropout: float = 0.0  # dropout before the final linear layer
    zero_init_residual: bool = False  # start every block's last BN at γ = 0, so blocks begin as identities (Goyal et al. 2017)


class ResNet(nn.Module):
    """CIFAR-style ResNet (section 4.2 of He et al. 2016): see the module docstring."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        widths = list(config.widths)
        stages = len(widths)
        if stages < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive channel counts, got {config.widths!r}")
        if config.depth < 2 * stages + 2 or (config.depth - 2) % (2 * stages):
            raise ValueError(
                f"depth must be 2·n·{stages} + 2 for n ≥ 1 blocks per stage with {stages} stages "
                f"(e.g. {2 * stages + 2}, {4 * stages + 2}, {6 * stages + 2}), got {config.depth}"
            )
        if config.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' (zero-padded identity) or 'B' (projection), got {config.shortcut!r}")
        if any(b < a for a, b in zip(widths, widths[1:])) and config.shortcut == "A":
            raise ValueError(f"option A shortcuts can only add channels; widths {widths} shrink, use shortcut 'B'")
        if config.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {config.stem_stride}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        blocks_per_stage = (config.depth - 2) // (2 * stages)  # n
        self.conv1 = nn.Conv2d(config.in_channels, widths[0], 3, stride=config.stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1  # stages 2, 3, ... start by halving the map
                blocks.append(BasicBlock(in_channels, width, stride, config.shortcut))
                in_channels = width
            layers.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(in_channels, config.num_classes)
        self._init_weights(config.zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He et al. 2015 ("Delving deep into rectifiers") initialisation, which the paper uses.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled (B, widths[-1]) features before the classifier."""
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, widths[0], H, W)
        x = self.stages(x)  # (B, widths[-1], H / 2^(stages-1), W / 2^(stages-1))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # global average pool -> (B, widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))  # (B, num_classes) logits


def _image_input(config: ResNetConfig, batch_size: int) -> tuple[torch.Tensor]:
    side = 28 if config.in_channels == 1 else 32  # Fashion-MNIST / CIFAR-sized example
    return (torch.randn(batch_size, config.in_channels, side, side),)


register_model(
    "resnet-small", family="cnn", model_cls=ResNet, config_cls=ResNetConfig,
    description="CIFAR-style ResNet-8 at widths 32/64/128, projection shortcuts, for 28×28 grey images (~0.31M)",
    example_input=_image_input, in_channels=1, depth=8, widths=[32, 64, 128], shortcut="B",
)
register_model(
    "resnet20", family="cnn", model_cls=ResNet, config_cls=ResNetConfig,
    description="He et al. 2016 CIFAR ResNet-20: 3×3 blocks at 16/32/64, option A shortcuts (0.27M)",
    example_input=_image_input, depth=20,
)
register_model(
    "resnet32", family="cnn", model_cls=ResNet, config_cls=ResNetConfig,
    description="He et al. 2016 CIFAR ResNet-32: 5 blocks per stage at 16/32/64, option A (0.46M)",
    example_input=_image_input, depth=32,
)
register_model(
    "resnet56", family="cnn", model_cls=ResNet, config_cls=ResNetConfig,
    description="He et al. 2016 CIFAR ResNet-56: 9 blocks per stage at 16/32/64, option A (0.85M)",
    example_input=_image_input, depth=56,
)
