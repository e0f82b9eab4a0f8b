"""UNet denoiser for diffusion (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021, "ADM").

The network ε_θ(x_t, t, c) takes a noisy image, its timestep and an optional condition, and
predicts the noise (or v, see `duboko.diffusion.schedulers`). Shapes for MNIST (B = batch,
C = base_channels = 32, mults (1, 2, 2), patch_size 2, 28×28 grey images):

    x (B, 1, 28, 28), t (B,)
    pixel-unshuffle 2             -> (B, 4, 14, 14)
    time embedding  sinusoidal(t) (B, C) -> MLP -> (B, 4C)          (+ class or pooled-text embedding)
    conv_in                       -> (B, C, 14, 14)
    down level 0: res block       -> (B, C, 14, 14),  downsample -> (B, C, 7, 7)
    down level 1: res + attention -> (B, 2C, 7, 7),   downsample -> (B, 2C, 4, 4)
    down level 2: res + attention -> (B, 2C, 4, 4)
    middle: res, attention, res   -> (B, 2C, 4, 4)
    up levels (mirror, each block takes the matching skip concatenated on channels) -> (B, C, 14, 14)
    GroupNorm, SiLU, conv_out     -> (B, 4, 14, 14), pixel-shuffle -> (B, 1, 28, 28)

Self-attention runs only at low resolution (7×7 and 4×4), where it is cheap and sees the whole
digit. Conditioning:
  * "none": unconditional;
  * "class": a learned embedding of the label (index `num_classes` is the "no label" used for
    classifier-free guidance) added to the time embedding;
  * "text": a prompt encoder (`PromptEncoder`: token embedding + the transformer helper's
    `TransformerEncoder`) gives features (B, L, text_dim); they are attended to by
    cross-attention blocks at the `cross_attention_resolutions` (as in Stable Diffusion), and
    their masked mean is also added to the time embedding (as in Imagen), which makes the
    prompt's digit easy to pick up early in training. Any module with
    `forward(tokens) -> (features (B, L, text_dim), key_padding_mask (B, L) True=pad)` can replace
    `model.text_encoder` (e.g. a pretrained one; set `text_dim` to its width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from duboko.nn.attention import MultiHeadAttention, TransformerEncoder
from duboko.nn.checks import check_divisible, check_one_of
from duboko.registry import register_model

CONDITIONINGS = ("none", "class", "text")


# ---------------------------------------------------------------------------------------------
# Blocks.


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), the transformer's positional encoding
    applied to t (Vaswani et al. 2017, §3.5; DDPM appendix B): [cos(t·ω_i), sin(t·ω_i)] with
    ω_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then GroupNorm modulated by the embedding (scale and shift,
    ADM's "use_scale_shift_norm") -> SiLU -> dropout -> conv; plus a 1×1 skip when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)  # -> (scale, shift)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head attention over the H·W pixels: self-attention when `context_dim` is 0,
    cross-attention to a text context (B, L, context_dim) otherwise (Rombach et al. 2022, eq. 3:
    Q from the image, K and V from the text)."""

    def __init__(self, channels: int, num_heads: int, groups: int, context_dim: int = 0):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = MultiHeadAttention(channels, num_heads)
        self.context_proj = nn.Linear(context_dim, channels) if context_dim else None
        nn.init.zeros_(self.attn.out_proj.weight)  # starts as the identity
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        if self.context_proj is None:
            out, _ = self.attn(q)
        else:
            kv = self.context_proj(context)  # (B, L, C)
            out, _ = self.attn(q, kv, key_padding_mask=context_mask)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution: (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 to the skip's size, then a 3×3 convolution (avoids checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class PromptEncoder(nn.Module):
    """Token embedding + transformer encoder over a prompt's tokens (pad id 0).

    tokens (B, L) -> features (B, L, d_model), key_padding_mask (B, L) True at padding."""

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.out_dim = d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.encoder = TransformerEncoder(
            num_layers, d_model, num_heads, 4 * d_model, dropout, max_len, positional="sinusoidal"
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens == 0  # (B, L) True = pad
        x = self.embed(tokens) * math.sqrt(self.out_dim)  # (B, L, D), scaled as in the transformer
        return self.encoder(x, key_padding_mask=mask), mask


# ---------------------------------------------------------------------------------------------
# Config.


@dataclass
class UNetConfig:
    in_channels: int = 1  # image channels (MNIST: 1); the output has as many
    image_size: int = 28  # height = width of the images
    # Pixel-unshuffle the input by this factor (2: 28×28×1 -> 14×14×4), undone at the output, so the
    # network runs at 14×14 and below: 3.5× fewer FLOPs than at 28×28 for the same widths (measured
    # 399 -> 112 MFLOP per image), the "patchify" stem of DiT (Peebles & Xie 2023).
    patch_size: int = 2
    base_channels: int = 32  # width C of the first level
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])  # width of level i = C·mult[i]
    num_res_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    attention_resolutions: list[int] = field(default_factory=lambda: [7, 4])  # self-attention at these sides
    num_heads: int = 4  # attention heads (self and cross)
    groups: int = 8  # GroupNorm groups
    dropout: float = 0.0  # dropout inside residual blocks
    conditioning: str = "none"  # none | class | text
    num_classes: int = 10  # labels for "class" conditioning (index num_classes = no label, for CFG)
    vocab_size: int = 0  # prompt tokenizer size for "text" (filled from the tokenizer by the task)
    max_prompt_len: int = 48  # longest prompt in tokens, BOS included
    text_dim: int = 64  # width of the text features (the prompt encoder's d_model)
    text_layers: int = 2  # prompt encoder layers
    text_heads: int = 4  # prompt encoder heads
    cross_attention_resolutions: list[int] = field(default_factory=lambda: [7, 4])  # text cross-attention sides


# ---------------------------------------------------------------------------------------------
# Model.


class UNet(nn.Module):
    """ε_θ(x_t, t, condition): see the module docstring for the shapes."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        check_one_of("conditioning", config.conditioning, CONDITIONINGS)
        widths = [config.base_channels * m for m in config.channel_mults]
        if any(w % config.groups for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by groups={config.groups}")
        if any(w % config.num_heads for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by num_heads={config.num_heads}")
        if config.conditioning == "text" and config.vocab_size < 2:
            raise ValueError(f"text conditioning needs vocab_size >= 2 (from the tokenizer), got {config.vocab_size}")
        self.config = config
        c0 = config.base_channels
        emb_dim = 4 * c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = None
        self.text_encoder = None
        self.text_pool_proj = None
        context_dim = 0
        if config.conditioning == "class":
            self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)  # + the null label
        elif config.conditioning == "text":
            self.text_encoder = PromptEncoder(
                config.vocab_size, config.text_dim, config.text_layers, config.text_heads, config.max_prompt_len
            )
            self.text_pool_proj = nn.Linear(config.text_dim, emb_dim)
            context_dim = config.text_dim

        def attn_blocks(ch: int, side: int) -> nn.ModuleList:
            blocks = nn.ModuleList()
            if side in config.attention_resolutions:
                blocks.append(AttentionBlock(ch, config.num_heads, config.groups))
            if context_dim and side in config.cross_attention_resolutions:
                blocks.append(AttentionBlock(ch, config.num_heads, config.groups, context_dim))
            return blocks

        check_divisible("image_size", config.image_size, config.patch_size, "patch_size")
        p2 = config.patch_size**2
        self.conv_in = nn.Conv2d(config.in_channels * p2, c0, 3, padding=1)
        sides = [config.image_size // config.patch_size]
        for _ in widths[1:]:
            sides.append((sides[-1] + 1) // 2)
        self.down = nn.ModuleList()
        skip_channels = [c0]
        ch = c0
        for level, (width, side) in enumerate(zip(widths, sides)):
            for _ in range(config.num_res_blocks):
                self.down.append(
                    nn.ModuleDict({"res": ResBlock(ch, width, emb_dim, config.groups, config.dropout), "attn": attn_blocks(width, side)})
                )
                ch = width
                skip_channels.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.ModuleDict({"down": Downsample(ch)}))
                skip_channels.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim, config.groups, config.dropout)
        self.mid_attn = attn_blocks(ch, sides[-1]) or nn.ModuleList([AttentionBlock(ch, config.num_heads, config.groups)])
        self.mid2 = ResBlock(ch, ch, emb_dim, config.groups, config.dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, side = widths[level], sides[level]
            for _ in range(config.num_res_blocks + 1):
                skip = skip_channels.pop()
                self.up.append(
                    nn.ModuleDict({"res": ResBlock(ch + skip, width, emb_dim, config.groups, config.dropout), "attn": attn_blocks(width, side)})
                )
                ch = width
            if level > 0:
                self.up.append(nn.ModuleDict({"up": Upsample(ch)}))
        self.norm_out = nn.GroupNorm(config.groups, ch)
        self.conv_out = nn.Conv2d(ch, config.in_channels * p2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predicts 0 at first
        nn.init.zeros_(self.conv_out.bias)

    # -- conditioning --------------------------------------------------------------------------
    def null_condition(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The "no condition" input used for classifier-free guidance: the null label, or the
        empty prompt (just the BOS token, id 1)."""
        if self.config.conditioning == "class":
            return torch.full((batch_size,), self.config.num_classes, dtype=torch.long, device=device)
        if self.config.conditioning == "text":
            tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            tokens[:, 0] = 1
            return tokens
        return None

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens (B, L) -> (features (B, L, text_dim), key_padding_mask (B, L)). Done once
        per prompt when sampling, not at every denoising step."""
        if self.text_encoder is None:
            raise ValueError("this UNet is not text-conditioned")
        return self.text_encoder(tokens)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C_in, H, W) noisy images, timesteps (B,) ints; `cond` is labels (B,) for "class"
        or prompt tokens (B, L) for "text" (or pass the encoded `context`/`context_mask`).
        Returns (B, C_in, H, W)."""
        cfg = self.config
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(timesteps, cfg.base_channels))  # (B, 4C)
        if cfg.conditioning == "class":
            if cond is None:
                cond = self.null_condition(x.shape[0], x.device)
            emb = emb + self.class_embed(cond)
        elif cfg.conditioning == "text":
            if context is None:
                if cond is None:
                    cond = self.null_condition(x.shape[0], x.device)
                context, context_mask = self.encode_text(cond)
            if context_mask is None:
                context_mask = torch.zeros(context.shape[:2], dtype=torch.bool, device=context.device)
            keep = (~context_mask).unsqueeze(-1).to(context.dtype)  # (B, L, 1)
            pooled = (context * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, text_dim) masked mean
            emb = emb + self.text_pool_proj(pooled)

        def run_attn(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            for block in blocks:
                h = block(h, context, context_mask) if block.context_proj is not None else block(h)
            return h

        if cfg.patch_size > 1:  # space-to-depth: the network runs at 1/patch resolution
            x = F.pixel_unshuffle(x, cfg.patch_size)  # (B, C·p², H/p, W/p)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            if "down" in block:
                h = block["down"](h)
            else:
                h = run_attn(block["attn"], block["res"](h, emb))
            skips.append(h)
        h = self.mid2(run_attn(self.mid_attn, self.mid1(h, emb)), emb)
        for block in self.up:
            if "up" in block:
                h = block["up"](h, skips[-1].shape[-2:])
            else:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + skip, H, W)
                h = run_attn(block["attn"], block["res"](h, emb))
        out = self.conv_out(F.silu(self.norm_out(h)))
        if cfg.patch_size > 1:
            out = F.pixel_shuffle(out, cfg.patch_size)  # back to (B, C, H, W)
        return out


def _unet_input(config: UNetConfig, batch_size: int) -> tuple:
    x = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size)
    t = torch.randint(0, 1000, (batch_size,))
    if config.conditioning == "class":
        return x, t, torch.randint(0, config.num_classes, (batch_size,))
    if config.conditioning == "text":
        tokens = torch.randint(2, max(config.vocab_size, 3), (batch_size, 12))
        tokens[:, 0] = 1
        return x, t, tokens
    return (x, t)


# Registered variants: the family's arguments once, then each name with what it overrides.
_register = partial(register_model, family="unet", model_cls=UNet, config_cls=UNetConfig, example_input=_unet_input)
_register(
    "unet-mnist",
    description="Unconditional UNet denoiser for 28×28 MNIST (patch 2, res blocks, attention at 7×7 and 4×4)",
)
_register(
    "unet-mnist-class",
    description="Label-conditioned UNet for 28×28 MNIST (class embedding, null label for guidance)",
    conditioning="class",
)
_register(
    "unet-mnist-text",
    description="Prompt-conditioned UNet for 28×28 MNIST (transformer prompt encoder, cross-attention)",
    conditioning="text",
    vocab_size=64,
)
