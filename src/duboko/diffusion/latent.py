"""Latent diffusion's autoencoder side (Rombach et al. 2022, "High-resolution image synthesis
with latent diffusion models", §3): the denoiser works on z = s · E(x) of a frozen VAE and its
samples are decoded through D(z / s).

The scaling factor s makes the latents unit-variance, so that the noise schedule, made for data
of variance about 1, applies unchanged: Stable Diffusion measured s = 1 / std(z) over a batch of
its training latents (0.18215 for its VAE; the paper's appendix D.1, "rescale the latent space
... by the component-wise standard deviation", here one s for all components, as SD does).

`load_vae_folder` reads a `duboko train mnist-vae` run folder: its manifest's SHA-256 must match
config.json and model.safetensors (nothing is parsed before), the weights are safetensors (never a
pickle) and the config must be a "vae" run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.io import load_tensors, read_json, sha256_file

VAE_FILES = ("config.json", "model.safetensors")


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor, batch_size: int = 500,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) in [-1, 1] -> posterior mean and standard deviation (N, c, h, w),
    on the CPU, in batches (bounded memory)."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        mean, logvar = vae.encode(images[i : i + batch_size].to(device))
        means.append(mean.float().cpu())
        stds.append((0.5 * logvar.float()).exp().cpu())
    return torch.cat(means), torch.cat(stds)


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None, kl_weight: float) -> torch.Tensor:
    """z = μ + σ ε (the mean alone for a plain autoencoder, whose σ means nothing)."""
    if kl_weight == 0:
        return mean
    return mean + std * torch.randn(mean.shape, generator=generator)


def scaling_factor(latents: torch.Tensor) -> float:
    """s = 1 / std(z) over every component of the latents (N, c, h, w): s·z has unit variance."""
    std = float(latents.double().std())
    if not std > 0:
        raise DubokoError(f"the latents have standard deviation {std}; cannot scale them to unit variance")
    return 1.0 / std


def load_vae_folder(folder: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A trained VAE (eval mode, frozen) and its run config from a run folder of task "vae"."""
    from duboko import registry

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not folder.is_dir() or not manifest_path.is_file():
        raise DubokoError(f"data.vae_run {str(folder)!r} is not a run folder with a manifest.json "
                          "(train one with `duboko train mnist-vae --out DIR`)")
    listed = read_json(manifest_path).get("sha256")
    if not isinstance(listed, dict):
        raise DubokoError(f"{manifest_path} is not a duboko manifest (expected {{\"sha256\": {{...}}}})")
    for name in VAE_FILES:
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise DubokoError(f"data.vae_run: {path} is missing (or a link)")
        if listed.get(name) != sha256_file(path):
            raise DubokoError(f"data.vae_run: {path} does not match its manifest (edited or incomplete run folder)")
    config = read_json(folder / "config.json")
    if not isinstance(config, dict) or config.get("task") != "vae" or not isinstance(config.get("model"), dict):
        raise DubokoError(f"data.vae_run {str(folder)!r} is a {config.get('task') if isinstance(config, dict) else '?'!r} "
                          "run; expected a \"vae\" run (duboko train mnist-vae)")
    model_cfg = dict(config["model"])
    vae = registry.build_model(model_cfg.pop("name"), model_cfg)
    try:
        vae.load_state_dict(load_tensors(folder / "model.safetensors"))
    except RuntimeError as exc:
        raise DubokoError(f"{folder / 'model.safetensors'} does not fit its config: {str(exc).splitlines()[0]}") from exc
    return freeze(vae.to(device)), config


def freeze(vae: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the autoencoder stays fixed while the denoiser trains."""
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae
