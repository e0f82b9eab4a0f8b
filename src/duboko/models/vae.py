"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"), the
autoencoder of latent diffusion (Rombach et al. 2022, "High-resolution image synthesis with
latent diffusion models", §3.1).

Shapes for MNIST (B = batch, C = base_channels = 8, mults (1, 2, 4), latent_channels 4):

    x (B, 1, 28, 28) in [-1, 1]
    encoder: conv_in -> (B, C, 28, 28); res block per level, a stride-2 conv before each level
             after the first: (B, C, 28, 28) -> (B, 2C, 14, 14) -> (B, 4C, 7, 7);
             res block; conv -> (B, 2·latent, 7, 7)
    split  -> mean μ, log-variance log σ² (B, latent, 7, 7)
    reparameterise  z = μ + σ ⊙ ε, ε ~ N(0, I)                        (Kingma & Welling, eq. 10)
    decoder: the mirror, nearest-neighbour upsampling -> logits (B, 1, 28, 28)

The likelihood p(x | z) is a Bernoulli per pixel on the intensity in [0, 1] (the paper's MNIST
choice), so the decoder outputs logits and the reconstruction term is the binary cross-entropy,
summed over pixels. With a standard normal prior the KL term has the closed form (appendix B)

    KL(q(z|x) || N(0, I)) = -½ Σ_j (1 + log σ_j² - μ_j² - σ_j²)

and the ELBO per image is  E_q[log p(x|z)] - KL  (in nats; the loss trains on
recon + kl_weight · KL, a β-VAE for kl_weight ≠ 1, a plain autoencoder for kl_weight = 0, where
z = μ and the log-variance is unused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from duboko.nn.checks import check_divisible
from duboko.registry import register_model

# ---------------------------------------------------------------------------------------------
# Blocks.


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3×3 conv, twice, plus a (1×1 when the width changes) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, 1)) summed over all but the batch dimension: (B, ...) -> (B,)
    (Kingma & Welling 2014, appendix B)."""
    kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp())
    return kl.flatten(1).sum(1)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) for a Bernoulli per pixel, x in [-1, 1] read as intensities in [0, 1]:
    (B, C, H, W) -> (B,), summed over pixels, in nats."""
    target = ((x + 1) / 2).clamp(0, 1)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# Config.


@dataclass
class VAEConfig:
    in_channels: int = 1  # image channels (MNIST: 1)
    image_size: int = 28  # height = width of the images (divisible by 2^(levels - 1))
    base_channels: int = 8  # width C of the first level (at full resolution: narrow, 16 costs 4× the FLOPs)
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])  # width of level i = C·mult[i]; each level after the first halves the side
    latent_channels: int = 4  # channels of the latent z (MNIST: (4, 7, 7) = 196 numbers for 784 pixels)
    groups: int = 4  # GroupNorm groups
    kl_weight: float = 1.0  # β on the KL term of the loss (1: the ELBO; 0: a plain autoencoder)
    logvar_min: float = -30.0  # the log-variance is clamped to [min, max] (finite exp, as Stable Diffusion's VAE)
    logvar_max: float = 20.0  # upper clamp of the log-variance


# ---------------------------------------------------------------------------------------------
# Model.


class VAE(nn.Module):
    """Encoder q(z | x) = N(μ(x), σ²(x)), decoder p(x | z) (Bernoulli logits); see the module
    docstring for the shapes."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        widths = [config.base_channels * m for m in config.channel_mults]
        if not widths:
            raise ValueError("channel_mults needs at least one level")
        for w in widths:
            check_divisible("base_channels * channel_mult", w, config.groups, "groups")
        factor = 2 ** (len(widths) - 1)
        check_divisible("image_size", config.image_size, factor, "2^(levels - 1), one halving per level after the first")
        if config.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {config.kl_weight}")
        self.latent_size = config.image_size // factor  # side of the latent

        g = config.groups
        enc: list[nn.Module] = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for i, w in enumerate(widths):
            if i > 0:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve the side
            enc.append(ResBlock(ch, w, g))
            ch = w
        enc += [ResBlock(ch, ch, g), nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, 2 * config.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(config.latent_channels, ch, 3, padding=1), ResBlock(ch, ch, g)]
        for i, w in reversed(list(enumerate(widths))):
            dec.append(ResBlock(ch, w, g))
            ch = w
            if i > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        dec += [nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, self.latent_size, self.latent_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> mean, log-variance, each (B, latent, h, w)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max)

    def reparameterise(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ⊙ ε (Kingma & Welling 2014, eq. 10); the mean for a plain autoencoder."""
        if self.config.kl_weight == 0:
            return mean
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + (0.5 * logvar).exp() * eps

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent, h, w) -> Bernoulli logits (B, C, H, W)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> images in [-1, 1]: the Bernoulli means σ(logits), rescaled."""
        return torch.sigmoid(self.decoder(z).float()) * 2 - 1

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> (reconstruction logits (B, C, H, W), mean, log-variance)."""
        mean, logvar = self.encode(x)
        return self.decode_logits(self.reparameterise(mean, logvar, generator)), mean, logvar

    def loss_terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per image (B,): reconstruction NLL, KL, the ELBO (= -(nll + kl), the true bound for
        any kl_weight) and the training loss nll + kl_weight · KL."""
        logits, mean, logvar = self(x, generator)
        nll = bernoulli_nll(logits, x)
        kl = gaussian_kl(mean.float(), logvar.float())
        return {"nll": nll, "kl": kl, "elbo": -(nll + kl), "loss": nll + self.config.kl_weight * kl,
                "recon_mse": (torch.sigmoid(logits.float()) * 2 - 1 - x.float()).pow(2).flatten(1).mean(1)}


def _vae_input(config: VAEConfig, batch_size: int) -> tuple:
    return (torch.rand(batch_size, config.in_channels, config.image_size, config.image_size) * 2 - 1,)


_register = partial(register_model, family="vae", model_cls=VAE, config_cls=VAEConfig, example_input=_vae_input)
_register(
    "vae-mnist",
    description="Convolutional VAE for 28×28 MNIST: latent (4, 7, 7), Bernoulli decoder, closed-form Gaussian KL",
)
_register(
    "ae-mnist",
    description="The same network as a plain autoencoder (kl_weight = 0: z = μ, no KL term)",
    kl_weight=0.0,
)
