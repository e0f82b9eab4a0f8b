"""Batched image transforms as tensor ops on the training device (torchvision is not used).

The primer's per-sample pipeline — Resize(48) → Grayscale(3) → RandomRotation(±10°) →
ColorJitter(brightness 0.2, contrast 0.2) → ToTensor → Normalize — becomes a few ops on a whole
uint8 batch: resize and rotation are one affine resample (`affine_grid` + `grid_sample`, bilinear,
zeros outside as RandomRotation fills), jitter and normalisation are fused arithmetic, and the grey
channel is expanded to 3 without a copy. Random draws come from an explicit generator, so a batch's
augmentation is a pure function of its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) uint8 or float -> (B, 1, size, size) float in [0, 1], bilinear (no rotation)."""
    x = images.unsqueeze(1).float() if images.dtype == torch.uint8 else images.unsqueeze(1)
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def random_affine_resize(
    images: torch.Tensor, size: int, max_degrees: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, size, size) float in [0, 1]: resize and random rotation as one
    bilinear resample; rotation angle ~ U(-max_degrees, max_degrees) per image, zeros outside."""
    b = images.shape[0]
    x = images.unsqueeze(1).float() / 255.0  # (B, 1, H, W)
    if max_degrees <= 0:
        return resize(images, size)
    angle = (torch.rand(b, generator=generator, device=images.device) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    # Output pixel (x', y') samples the input at R·(x', y'): normalised coordinates are size-free,
    # so the same grid also resizes H×W to size×size.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator | None
) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast) for grey images (B, 1, H, W) in [0, 1]:
    brightness multiplies by b ~ U(1-β, 1+β); contrast blends with the image mean by c ~ U(1-γ, 1+γ);
    each result clamped to [0, 1]."""
    b = x.shape[0]
    if brightness > 0:
        factor = 1 + (torch.rand(b, 1, 1, 1, generator=generator, device=x.device) * 2 - 1) * brightness
        x = (x * factor).clamp_(0, 1)
    if contrast > 0:
        factor = 1 + (torch.rand(b, 1, 1, 1, generator=generator, device=x.device) * 2 - 1) * contrast
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (mean + (x - mean) * factor).clamp_(0, 1)
    return x


def normalize(x: torch.Tensor, mean: float, std: float, channels: int) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, channels, H, W) normalised; channels > 1 replicate the grey
    channel (the primer's Grayscale(num_output_channels=3)) as a zero-copy expand."""
    x = (x - mean) / std
    return x.expand(-1, channels, -1, -1) if channels > 1 else x


def train_transform(
    images: torch.Tensor,
    *,
    size: int,
    channels: int,
    rotation: float,
    brightness: float,
    contrast: float,
    mean: float,
    std: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The primer's training augmentation for a (B, H, W) uint8 batch -> (B, C, size, size)."""
    x = random_affine_resize(images, size, rotation, generator)
    x = color_jitter(x, brightness, contrast, generator)
    return normalize(x, mean, std, channels)


def eval_transform(images: torch.Tensor, *, size: int, channels: int, mean: float, std: float) -> torch.Tensor:
    """Test-time transform: resize + normalise only."""
    return normalize(resize(images, size), mean, std, channels)


# ---------------------------------------------------------------------------------------------
# Image folders and Fashion-MNIST: random resized crop, shift, flip and rotation as ONE affine
# resample per batch. The MNIST functions above are left exactly as they are (MNIST recipes stay
# bit-identical); these are used when a recipe asks for a crop, shift or flip, and for folders,
# whose cached rows already have C channels: (B, C, H, W) uint8.

CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the random resized crop (Szegedy et al. 2015; torchvision's default)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, C, H, W) uint8 -> (B, C, H, W) float in [0, 1] (C = 1 for 3-D input)."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    return x.float() / 255.0


def random_crop_flip_rotate(
    images: torch.Tensor,
    size: int,
    *,
    crop_scale: float = 1.0,
    translate: float = 0.0,
    hflip: bool = False,
    rotation: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, H, W) or (B, C, H, W) uint8 -> (B, C, size, size) float in [0, 1].

    Per image, in one bilinear `grid_sample`:
    - random resized crop (Inception's augmentation, Szegedy et al. 2015): a window of area share
      s ~ U(crop_scale, 1) and aspect ratio r ~ logU(3/4, 4/3), at a random place inside the image;
    - shift by up to ±translate of the side in x and y (zeros come in, as RandomAffine fills);
    - horizontal flip with probability 1/2 when `hflip`;
    - rotation by U(-rotation, rotation) degrees.
    The output pixel at normalised (u, v) samples the input at R·diag(w·f, h)·(u, v) + (cx, cy),
    with w, h the window's half-extents (1 = whole image), f = ±1 the flip, (cx, cy) its centre."""
    x = to_float(images)  # (B, C, H, W)
    b, dev = x.shape[0], x.device
    if crop_scale >= 1 and translate <= 0 and not hflip and rotation <= 0:
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x

    def uniform(low: float, high: float) -> torch.Tensor:  # (B,)
        return low + (high - low) * torch.rand(b, generator=generator, device=dev)

    if crop_scale < 1:
        area = uniform(crop_scale, 1.0)
        ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # half-width in normalised units (1 = whole)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=generator, device=dev) * 2 - 1) * (1 - w)  # window stays inside
        cy = (torch.rand(b, generator=generator, device=dev) * 2 - 1) * (1 - h)
    else:
        w = h = torch.ones(b, device=dev)
        cx = cy = torch.zeros(b, device=dev)
    if translate > 0:
        # A shift of t·side is 2t in normalised coordinates ([-1, 1] spans the side).
        cx = cx + uniform(-2 * translate, 2 * translate)
        cy = cy + uniform(-2 * translate, 2 * translate)
    flip = torch.ones(b, device=dev)
    if hflip:
        flip = torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -flip, flip)
    angle = uniform(-math.radians(rotation), math.radians(rotation)) if rotation > 0 else torch.zeros(b, device=dev)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = w * flip
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * h, cx], 1), torch.stack([sin * sx, cos * h, cy], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(
    images: torch.Tensor,
    *,
    size: int,
    channels: int,
    mean: float,
    std: float,
    crop_scale: float = 1.0,
    translate: float = 0.0,
    hflip: bool = False,
    rotation: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training augmentation for folders and Fashion-MNIST: (B, H, W) or (B, C, H, W) uint8 ->
    (B, channels, size, size) normalised. Crop/shift/flip/rotation as one resample, then the
    brightness/contrast jitter of `color_jitter` (the contrast mean is over all channels)."""
    x = random_crop_flip_rotate(images, size, crop_scale=crop_scale, translate=translate, hflip=hflip,
                                rotation=rotation, generator=generator)
    x = color_jitter(x, brightness, contrast, generator)
    return normalize(x, mean, std, channels)


def eval_transform_any(images: torch.Tensor, *, size: int, channels: int, mean: float, std: float) -> torch.Tensor:
    """Test-time transform for (B, H, W) or (B, C, H, W) uint8: resize (when needed) + normalise."""
    return normalize(random_crop_flip_rotate(images, size), mean, std, channels)
