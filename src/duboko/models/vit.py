"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), built from the
pre-LayerNorm encoder in `duboko.nn.attention`.

The image is cut into P×P patches, each patch linearly embedded (a Conv2d with kernel = stride =
P is exactly that linear map applied to every patch, eq. 1 of the paper), a learned class token is
prepended, positions are added, and the sequence goes through pre-LN transformer blocks (x +
MSA(LN(x)), x + MLP(LN(x)), eqs. 2-3) and a final LayerNorm (eq. 4); a linear head reads the
class token.

Shapes for vit-tiny on 28×28 grey images (P = 4, D = 128, B = batch):
    input                         (B, 1, 28, 28)
    patch embedding Conv2d 4×4/4  (B, 128, 7, 7) -> flatten -> (B, 49, 128)   N = (28/4)² = 49 patches
    prepend class token           (B, 50, 128)
    + positions, 6 encoder blocks, LayerNorm  (B, 50, 128)
    class token -> head           (B, num_classes)

Positions (config `positional`): "learned", one D-vector per token (the paper's 1-D learned
embedding, initialised N(0, 0.02²)), or "sinusoidal", the fixed table of Vaswani et al. 2017
(section 3.5) over the token index, with no parameters. The paper found 2-D-aware encodings no
better than 1-D ones (appendix D.4). `pool = "mean"` drops the class token and averages the patch
tokens instead (the global average pooling of Beyer et al. 2022, "Better plain ViT baselines").

Variants:
    vit-tiny   28×28 grey, patch 4, D 128, 6 blocks, 4 heads, MLP 256   0.81 M    Fashion-MNIST on a CPU
    vit-ti16   224×224 RGB, patch 16, D 192, 12 blocks, 3 heads, MLP 768, 1000 classes: ViT-Ti/16
               (Steiner et al. 2021; DeiT-Ti of Touvron et al. 2021), 5,717,416 parameters, the
               published 5.7 M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from duboko.nn.attention import TransformerEncoder
from duboko.registry import register_model

POSITIONAL = ("learned", "sinusoidal")
POOLING = ("cls", "mean")

# ---------------------------------------------------------------------------------------------
# Blocks.


class PatchEmbedding(nn.Module):
    """Non-overlapping P×P patches, each mapped linearly to D features (eq. 1: x_p E)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


# ---------------------------------------------------------------------------------------------
# Config and model.


@dataclass
class ViTConfig:
    image_size: int = 28  # input height = width; a multiple of patch_size
    patch_size: int = 4  # P: side of the square patches, giving (image_size / P)² tokens
    in_channels: int = 1  # image channels
    num_classes: int = 10  # output logits
    embed_dim: int = 128  # D: width of every token
    depth: int = 6  # encoder blocks
    num_heads: int = 4  # attention heads; must divide embed_dim
    mlp_dim: int = 256  # hidden width of each block's MLP (the paper uses 4·D)
    dropout: float = 0.0  # dropout after the embedding and inside every block
    positional: str = "learned"  # "learned" (the paper's 1-D embedding) or "sinusoidal" (fixed, no parameters)
    pool: str = "cls"  # "cls": the head reads the class token (paper); "mean": average of the patch tokens


class ViT(nn.Module):
    """Vision Transformer: see the module docstring."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.image_size < 1 or config.patch_size < 1 or config.image_size % config.patch_size:
            raise ValueError(
                f"image_size must be a positive multiple of patch_size, got image_size={config.image_size}, "
                f"patch_size={config.patch_size}"
            )
        if config.embed_dim % config.num_heads:
            raise ValueError(f"embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")
        if config.positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {', '.join(POSITIONAL)}, got {config.positional!r}")
        if config.pool not in POOLING:
            raise ValueError(f"pool must be one of {', '.join(POOLING)}, got {config.pool!r}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        self.num_patches = (config.image_size // config.patch_size) ** 2  # N
        self.patch_embed = PatchEmbedding(config.in_channels, config.embed_dim, config.patch_size)
        if config.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))  # x_class of eq. 1
        else:
            self.cls_token = None
        tokens = self.num_patches + (1 if config.pool == "cls" else 0)
        # Positions, dropout, the pre-LN blocks and the final LayerNorm (eqs. 1-4) are the shared
        # encoder's; its max_len is exactly the token count, so a wrong input size cannot pass.
        self.encoder = TransformerEncoder(
            num_layers=config.depth,
            d_model=config.embed_dim,
            num_heads=config.num_heads,
            dim_feedforward=config.mlp_dim,
            dropout=config.dropout,
            max_len=tokens,
            positional=config.positional,
        )
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As in the reference implementations (timm, MAE): truncated-normal(0.02) linear layers
        # with zero biases, the patch projection initialised like the linear map it is.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # (D, C, P, P), a (D, C·P·P) matrix
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, D) representation the head reads: the class token or the mean patch token."""
        side = self.config.image_size
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or tuple(x.shape[-2:]) != (side, side):
            raise ValueError(
                f"ViT expects images (B, {self.config.in_channels}, {side}, {side}), got {tuple(x.shape)}; "
                "set model.image_size and model.in_channels to the data"
            )
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = self.encoder(x)  # + positions, blocks, LayerNorm -> (B, T, D)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits


def _image_input(config: ViTConfig, batch_size: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, config.in_channels, config.image_size, config.image_size),)


register_model(
    "vit-tiny", family="transformer", model_cls=ViT, config_cls=ViTConfig,
    description="ViT for 28×28 grey images: 4×4 patches, 6 blocks × 128 wide, 4 heads, class token (0.81M)",
    example_input=_image_input,
)
register_model(
    "vit-ti16", family="transformer", model_cls=ViT, config_cls=ViTConfig,
    description="ViT-Ti/16 at 224×224 RGB, 1000 classes: 12 blocks × 192, 3 heads, MLP 768 (5.7M)",
    example_input=_image_input, image_size=224, patch_size=16, in_channels=3, num_classes=1000,
    embed_dim=192, depth=12, num_heads=3, mlp_dim=768,
)
