"""The sampling loop, apart from the network and the scheduler (as diffusers' pipelines).

Text-to-image in the primer's three steps: encode the prompt (once), draw Gaussian noise x_T,
then denoise step by step with the scheduler, guided by the prompt.

Classifier-free guidance (Ho & Salimans 2022, eq. 6, in the convention of diffusers/Imagen where
scale 1 is the plain conditional model):

    ε̃ = ε_θ(x_t, ∅) + w · (ε_θ(x_t, c) - ε_θ(x_t, ∅))

The conditional and unconditional passes run as one batch of 2B. The denoiser is any module
called as `model(x_t, t, cond, context=..., context_mask=...)`; a text-conditioned one also has
`encode_text(tokens) -> (features, key_padding_mask)`, and conditioned ones `null_condition(B)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from duboko.diffusion.schedulers import DDIMScheduler, NoiseScheduler
from duboko.errors import DubokoError


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    trajectory: list[tuple[int, torch.Tensor]]  # (timestep, x_t) snapshots when asked for
    predictions: list[tuple[int, torch.Tensor]]  # (timestep, predicted x̂_0) snapshots when asked for


def _conditioning(model: nn.Module, cond: torch.Tensor | None, guided: bool) -> dict:
    """Model keyword arguments for the batch: [cond; null] when guided, else cond alone.
    Text is encoded here once, not at every step."""
    kind = getattr(getattr(model, "config", None), "conditioning", "none")
    if kind == "none" or cond is None:
        return {"cond": None}
    null = model.null_condition(cond.shape[0], cond.device)
    if kind == "text":
        if guided:
            pad = torch.zeros_like(cond)
            pad[:, : null.shape[1]] = null  # the empty prompt, padded to the prompt batch's width
            cond = torch.cat([cond, pad])
        context, mask = model.encode_text(cond)
        return {"cond": None, "context": context, "context_mask": mask}
    return {"cond": torch.cat([cond, null]) if guided else cond}


def _clamp(x: torch.Tensor, bound: float | None) -> torch.Tensor:
    return x if bound is None else x.clamp(-bound, bound)


@torch.no_grad()
def sample(
    model: nn.Module,
    scheduler: NoiseScheduler,
    num_images: int,
    *,
    cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    image_shape: tuple[int, int, int] | None = None,
    device: torch.device | str | None = None,
    keep_every: int = 0,
    progress: Callable[[int, int], None] | None = None,
    use_clipped_model_output: bool = True,
    output_range: float | None = 1.0,
) -> SampleResult:
    """Draw `num_images` samples. `cond`: labels (N,) or prompt tokens (N, L) for conditioned
    models (None: unconditional). `guidance` > 1 applies classifier-free guidance (needs `cond`).
    `keep_every` > 0 keeps x_t and x̂_0 every that many steps (for trajectory pictures). The
    initial noise and any sampler noise come from `generator` (CPU), so a seed gives the same
    images on any device up to float rounding. `use_clipped_model_output` (DDIM): re-derive ε̂
    from the clipped x̂_0, as GLIDE does; without it a large guidance scale drives the samples to
    saturated noise (measured: see docs/diffusion.md). `output_range`: the result (and the kept
    x̂_0) is clamped to [-range, range]; images 1, a latent diffusion run its latent bound (None:
    no clamp)."""
    cfg = getattr(model, "config", None)
    if image_shape is None:
        if cfg is None:
            raise DubokoError("pass image_shape for a model without a config")
        image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cond is not None:
        if cond.shape[0] != num_images:
            raise DubokoError(f"got {cond.shape[0]} conditions for {num_images} images")
        cond = cond.to(device)
    guided = cond is not None and guidance != 1.0
    if guidance != 1.0 and cond is None:
        raise DubokoError("guidance != 1 needs a condition (a label or a prompt); this model samples unconditionally")
    kwargs = _conditioning(model, cond, guided)
    scheduler.set_timesteps(num_steps)
    x = torch.randn((num_images, *image_shape), generator=generator).to(device)  # x_T ~ N(0, I)
    trajectory, predictions = [], []
    steps = scheduler.timesteps.tolist()
    for i, t in enumerate(steps):
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        out = model(x_in, t_in, kwargs["cond"], **{k: v for k, v in kwargs.items() if k != "cond"})
        if guided:
            out_c, out_u = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)  # CFG (works for ε and for v: both linear)
        keep = keep_every and (i % keep_every == 0 or i == len(steps) - 1)
        if keep:
            trajectory.append((t, x.detach().cpu()))
            x0, _ = scheduler.predict_original_and_noise(out, t, x)
            predictions.append((t, _clamp(x0, output_range).cpu()))
        if isinstance(scheduler, DDIMScheduler):
            x = scheduler.step(out, t, x, eta=eta, generator=generator, use_clipped_model_output=use_clipped_model_output)
        else:
            x = scheduler.step(out, t, x, generator=generator)
        if progress is not None:
            progress(i + 1, len(steps))
    images = _clamp(x, output_range)
    if keep_every:
        trajectory.append((-1, images.cpu()))
    return SampleResult(images, trajectory, predictions)
