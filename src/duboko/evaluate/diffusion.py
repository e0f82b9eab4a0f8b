"""Pictures of the two diffusion processes on MNIST-sized images (values in [-1, 1]).

- The forward (noising) process in closed form, x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, at a few
  timesteps for each beta schedule: `forward_process` computes it, `plot_noising` draws it.
- The reverse (denoising) process of one sample: x_t and the network's estimate of the clean
  image x̂_0 at the steps that `duboko.diffusion.pipeline.sample(keep_every=...)` kept
  (`plot_trajectory`).
- How sure an accuracy over N samples is: the 95 % Wilson interval (`wilson_interval`,
  `accuracy_summary`, with the accuracy for each asked-for digit).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from duboko.diffusion.pipeline import SampleResult
from duboko.diffusion.schedulers import DDPMScheduler
from duboko.errors import DubokoError


def forward_process(
    x0: torch.Tensor, noise: torch.Tensor, beta_schedule: str, timesteps: list[int]
) -> list[tuple[int, float, torch.Tensor]]:
    """(t, ᾱ_t, x_t) for each t of `timesteps`, counted 0..T (0: the clean image, ᾱ = 1).

    x0, noise: (B, C, H, W); x_t has their shape. Noising for t steps is index t-1 of the
    scheduler's 0-based schedule."""
    sched = DDPMScheduler(beta_schedule=beta_schedule)
    T = sched.num_train_timesteps
    out = []
    for t in timesteps:
        if not 0 <= t <= T:
            raise DubokoError(f"timesteps must be in 0..{T}, got {t}")
        if t == 0:
            out.append((0, 1.0, x0))
        else:
            out.append((t, float(sched.alphas_cumprod[t - 1]), sched.add_noise(x0, noise, torch.tensor([t - 1]))))
    return out


def plot_noising(
    image: torch.Tensor, path: str | Path, timesteps: list[int], schedules: list[str], seed: int = 0, title: str = ""
) -> None:
    """One row per beta schedule, one column per timestep, for one uint8 image (H, W); the same
    noise ε (drawn with `seed`) in every panel, so the rows differ by the schedule alone."""
    from duboko.evaluate.plots import figure, hide_ticks

    x0 = image.float()[None, None] / 127.5 - 1  # (1, 1, H, W) in [-1, 1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = {name: forward_process(x0, noise, name, timesteps) for name in schedules}  # errors before drawing
    size = (1.6 * len(timesteps), 1.9 * len(schedules))
    with figure(path, len(schedules), len(timesteps), size=size, title=title, title_size=10) as (fig, axes):
        for r, (name, row) in enumerate(rows.items()):
            for c, (t, abar, xt) in enumerate(row):
                ax = axes[r][c]
                ax.imshow(xt[0, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_title(f"t = {t}\nᾱ = {abar:.3f}", fontsize=8)
                hide_ticks(ax)
                if c == 0:
                    ax.set_ylabel(name, fontsize=9)


def plot_trajectory(result: SampleResult, path: str | Path, title: str = "") -> None:
    """Top row x_t, bottom row x̂_0, at each kept step of the first sample, then the result.

    `result` comes from `sample(..., keep_every=k)`: `trajectory` holds (t, x_t (N, C, H, W))
    for the kept steps and a last (-1, images) entry, `predictions` (t, x̂_0) for the kept steps."""
    from duboko.evaluate.plots import figure, hide_ticks

    frames = result.trajectory[:-1]  # the last entry is the finished images, drawn separately
    if not frames:
        raise DubokoError("the sample kept no trajectory; sample with keep_every > 0")
    cols = len(frames) + 1
    with figure(path, 2, cols, size=(1.3 * cols, 3.0), title=title, title_size=10) as (fig, axes):
        for c in range(cols):
            for r, kept in enumerate((frames, result.predictions)):
                ax = axes[r][c]
                hide_ticks(ax)
                if c < len(frames):
                    t, img = kept[c]
                    ax.imshow(img[0, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                    label = f"t = {t}"
                else:
                    ax.imshow(result.images[0, 0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
                    label = "result"
                if r == 0:
                    ax.set_title(label, fontsize=8)
                if c == 0:
                    ax.set_ylabel("x_t" if r == 0 else "x̂_0", fontsize=9)


# ---------------------------------------------------------------------------------------------
# Accuracy with its uncertainty.

WILSON_Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson_interval(correct: int, total: int, z: float = WILSON_Z95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of a proportion correct/total:

        centre = (p̂ + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · √(p̂(1-p̂)/n + z²/4n²)

    Unlike the normal approximation p̂ ± z√(p̂(1-p̂)/n) it stays inside [0, 1] and does not
    collapse to a point at p̂ = 0 or 1, which matters for accuracies near 1."""
    if total <= 0 or not 0 <= correct <= total:
        raise DubokoError(f"need 0 <= correct <= total and total > 0, got correct={correct}, total={total}")
    n, p = float(total), correct / total
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_summary(preds: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> dict:
    """prompt_accuracy, its 95 % Wilson interval and the accuracy for each asked-for class.
    preds, labels: (N,) ints."""
    preds, labels = preds.long().cpu(), labels.long().cpu()
    hits = preds == labels
    correct, total = int(hits.sum()), len(labels)
    low, high = wilson_interval(correct, total)
    per_class = []
    for c in range(num_classes):
        asked = labels == c
        per_class.append(float(hits[asked].double().mean()) if asked.any() else float("nan"))
    return {
        "prompt_accuracy": correct / total,
        "prompt_accuracy_low": low,
        "prompt_accuracy_high": high,
        "prompt_accuracy_per_digit": per_class,
    }
