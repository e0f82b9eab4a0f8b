"""Task "ldm": latent diffusion (Rombach et al. 2022) on MNIST: the "diffusion" task's denoiser,
text conditioning and classifier-free guidance, on the latents of a frozen VAE.

    x (B, 1, 28, 28) --VAE encoder--> z ~ q(z|x) (B, 4, 7, 7) --× s--> x_0 of the diffusion
    sampling: x_T ~ N(0, I) (B, 4, 7, 7) --denoise--> x̂_0 --÷ s--> VAE decoder --> (B, 1, 28, 28)

s is the measured scaling factor (`duboko.diffusion.latent.scaling_factor`, 1/std of the training
latents, as Stable Diffusion does), so the cosine schedule sees unit-variance data. The denoiser
runs on 7×7×4 latents instead of 28×28×1 pixels (patch_size 1), which is what makes it cheaper
per step; the decoder runs once per image, after the last step.

Where the VAE comes from (`data.vae_run`):
  * a run folder of `duboko train mnist-vae` (verified against its manifest, safetensors only);
  * "" (the recipe's default): the task trains one first, inside this run, for
    `data.vae_epochs` epochs on the same training split (a plain Adam loop with a progress bar;
    KL weight `data.vae_kl_weight`), so that `duboko train mnist-ldm` works from one command in a
    fresh clone.
Either way the VAE's weights and config (with s) are copied into the run folder (vae.safetensors,
vae.json, listed in the manifest), so `sample`, `trajectory` and `eval` read only the run folder.
Grids, metrics (prompt_accuracy, fd_mnist) and trajectories show decoded images.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko import registry
from duboko.config import require_at_least
from duboko.data import mnist
from duboko.diffusion import latent as L
from duboko.diffusion.pipeline import SampleResult
from duboko.diffusion.schedulers import SchedulerConfig, validate_scheduler_config
from duboko.errors import DubokoError
from duboko.io import atomic_write_json, load_tensors, read_json, save_tensors
from duboko.seeding import generator
from duboko.tasks import register_task
from duboko.tasks.diffusion import DiffusionDataConfig, DiffusionTask

VAE_WEIGHTS, VAE_CONFIG = "vae.safetensors", "vae.json"


@dataclass
class LDMDataConfig(DiffusionDataConfig):
    vae_run: str = ""  # run folder of `duboko train mnist-vae` ("": train a VAE first, inside this run)
    vae_model: str = "vae-mnist"  # the VAE trained when vae_run is ""
    vae_kl_weight: float = 0.01  # its KL weight (small: sharper decodes, the latents are rescaled anyway)
    vae_epochs: int = 2  # its epochs
    vae_batch_size: int = 128  # its batch size
    vae_lr: float = 2e-3  # its Adam learning rate
    scale_images: int = 10000  # training images whose latents measure the scaling factor s
    latent_clip: float = 4.0  # the sampler clamps x̂_0 to ±this (unit-variance latents: ±4σ; images use 1)


def train_vae(cfg: LDMDataConfig, images: torch.Tensor, device: torch.device, seed: int, quiet: bool = False) -> nn.Module:
    """A VAE trained on uint8 images (N, 28, 28): loss = (recon NLL + kl_weight · KL) per pixel,
    Adam, `cfg.vae_epochs` epochs. Only used when no VAE run is given."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    vae = registry.create_model(cfg.vae_model, kl_weight=cfg.vae_kl_weight).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    steps = (len(images) + cfg.vae_batch_size - 1) // cfg.vae_batch_size
    total = steps * cfg.vae_epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total), eta_min=cfg.vae_lr * 0.1)
    vae.train()
    bar = tqdm(total=total, desc="VAE (for the latents)", unit="step", file=sys.stderr, disable=quiet)
    for epoch in range(cfg.vae_epochs):
        perm = torch.randperm(len(images), generator=generator(seed, epoch))
        for i in range(steps):
            idx = perm[i * cfg.vae_batch_size : (i + 1) * cfg.vae_batch_size]
            x = (images[idx].float().unsqueeze(1) / 127.5 - 1).to(device)
            loss = vae.loss_terms(x, generator=generator(seed, epoch, i))["loss"].mean() / x[0].numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    return L.freeze(vae)


@register_task
class LDMTask(DiffusionTask):
    name = "ldm"
    data_config = LDMDataConfig
    derived_model_fields = {
        **DiffusionTask.derived_model_fields,
        "in_channels": "the VAE's latent channels (data.vae_run, or the VAE trained first)",
        "image_size": "the side of the VAE's latents",
    }

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        cfg = config.data
        require_at_least("data", cfg, 0, "vae_kl_weight")
        require_at_least("data", cfg, 1, "vae_epochs", "vae_batch_size", "scale_images")
        if not cfg.vae_lr > 0 or not cfg.latent_clip > 0:
            raise DubokoError(f"data.vae_lr and data.latent_clip must be > 0, got {cfg.vae_lr} and {cfg.latent_clip}")
        if int(config.model.get("patch_size", 1)) != 1:
            raise DubokoError(f"model.patch_size must be 1 for latent diffusion (the latents are small), got {config.model.get('patch_size')}")

    @staticmethod
    def scheduler_config_of(data: LDMDataConfig) -> SchedulerConfig:
        schedule = SchedulerConfig(
            num_train_timesteps=data.num_train_timesteps,
            beta_schedule=data.beta_schedule,
            prediction_type=data.prediction_type,
            clip_sample_range=data.latent_clip,
        )
        validate_scheduler_config(schedule, prefix="data.")
        return schedule

    # -- setup: the frozen VAE -----------------------------------------------------------------
    def setup(self, run_dir: Path | None = None) -> None:
        super().setup(run_dir)
        cfg = self.config.data
        if run_dir is not None and (Path(run_dir) / VAE_WEIGHTS).is_file():
            self._vae_from_assets(Path(run_dir))  # resume, sample, eval: the run's own copy
        elif cfg.vae_run:
            self.vae, vae_config = L.load_vae_folder(cfg.vae_run, self.device)
            self.vae_source = str(cfg.vae_run)
            self.vae_model_config = dict(vae_config["model"])
            self.scale = self._measure_scale()
        else:
            x, _ = self._train_images()
            t0 = time.perf_counter()
            self.vae = train_vae(cfg, x, self.device, self.config.train.seed, quiet=self.rank != 0)
            self.vae_seconds = time.perf_counter() - t0
            self.vae_source = f"trained in this run ({cfg.vae_model}, {cfg.vae_epochs} epochs, kl_weight {cfg.vae_kl_weight})"
            self.vae_model_config = {"name": cfg.vae_model, **vars(self.vae.config)}
            self.scale = self._measure_scale()
        c, h, w = self.vae.latent_shape
        self.set_model_field("in_channels", c)
        self.set_model_field("image_size", h)

    def _train_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split's images (the same fixed split as the denoiser's)."""
        cfg = self.config.data
        x, y = mnist.load_split("train", cfg.data_dir or None, limit=cfg.limit_train)
        (train_x, train_y), _ = mnist.hold_out_validation(x, y, min(cfg.val_size, len(x) // 5))
        return train_x, train_y

    def _measure_scale(self) -> float:
        x, _ = self._train_images()
        x = x[: self.config.data.scale_images]
        mean, std = L.encode_latents(self.vae, x.float().unsqueeze(1) / 127.5 - 1)
        g = generator(self.config.train.seed, 7919)  # its own stream (any fixed key)
        z = L.posterior_sample(mean, std, g, self.vae.config.kl_weight)
        return L.scaling_factor(z)

    def _vae_from_assets(self, run_dir: Path) -> None:
        meta = read_json(run_dir / VAE_CONFIG)
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or not isinstance(meta.get("scaling_factor"), float):
            raise DubokoError(f"{run_dir / VAE_CONFIG} is not a latent run's VAE config (model, scaling_factor)")
        model_cfg = dict(meta["model"])
        self.vae_model_config = dict(model_cfg)
        vae = registry.build_model(model_cfg.pop("name"), model_cfg)
        try:
            vae.load_state_dict(load_tensors(run_dir / VAE_WEIGHTS))
        except RuntimeError as exc:
            raise DubokoError(f"{run_dir / VAE_WEIGHTS} does not fit {run_dir / VAE_CONFIG}: {str(exc).splitlines()[0]}") from exc
        self.vae = L.freeze(vae.to(self.device))
        self.scale = float(meta["scaling_factor"])
        self.vae_source = str(meta.get("source", ""))

    def save_assets(self, run_dir: Path) -> list[str]:
        names = super().save_assets(run_dir)
        save_tensors({k: v.detach().cpu().contiguous() for k, v in self.vae.state_dict().items()}, Path(run_dir) / VAE_WEIGHTS)
        atomic_write_json(Path(run_dir) / VAE_CONFIG, {"model": self.vae_model_config, "scaling_factor": self.scale,
                                                       "source": self.vae_source})
        return names + [VAE_WEIGHTS, VAE_CONFIG]

    # -- data: latents -------------------------------------------------------------------------
    def _load(self) -> dict[str, torch.Tensor]:
        """The base task's images, plus the posterior (mean, std) of every training image,
        encoded once: each batch then draws z = μ + σ ε without running the encoder."""
        data = super()._load()
        if "train_mean" not in data:
            mean, std = L.encode_latents(self.vae, data["train_x"].float().unsqueeze(1) / 127.5 - 1)
            data["train_mean"], data["train_std"] = mean.to(self.device), std.to(self.device)
        return data

    def train_x0(self, data: dict[str, torch.Tensor], idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """s · z with z ~ q(z | x) for the batch's images: (B, c, h, w), unit variance."""
        mean, std = data["train_mean"][idx].cpu(), data["train_std"][idx].cpu()
        return (L.posterior_sample(mean, std, g, self.vae.config.kl_weight) * self.scale).to(self.device)

    def eval_x0(self, images: torch.Tensor) -> torch.Tensor:
        """s · μ(x) (the posterior mean: the same validation latents every epoch)."""
        mean, _ = L.encode_latents(self.vae, images.float().unsqueeze(1) / 127.5 - 1)
        return mean * self.scale

    def sample_options(self) -> dict[str, Any]:
        return {"output_range": self.config.data.latent_clip}

    # -- sampling: decode through the VAE ------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, c, h, w) -> images (N, 1, 28, 28) in [-1, 1], in batches."""
        bs = self.config.data.eval_batch_size
        out = [self.vae.decode((z[i : i + bs] / self.scale).to(self.device)).cpu() for i in range(0, len(z), bs)]
        return torch.cat(out)

    def generate(self, model: nn.Module, n: int, **kwargs) -> SampleResult:
        """The base task's sampling in latent space, then every image (and every kept trajectory
        frame: x_t and x̂_0) decoded through the VAE."""
        result = super().generate(model, n, **kwargs)
        return SampleResult(
            images=self.decode(result.images).to(result.images.device),
            trajectory=[(t, self.decode(x)) for t, x in result.trajectory],
            predictions=[(t, self.decode(x)) for t, x in result.predictions],
        )

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]):
        evaluation = super().final_metrics(model, run_dir, history)
        extra = {"latent_shape": list(self.vae.latent_shape), "latent_scaling_factor": self.scale, "vae_source": self.vae_source}
        if hasattr(self, "vae_seconds"):
            extra["vae_train_seconds"] = self.vae_seconds
        evaluation.metrics.update(extra)
        evaluation.report += "".join(f"{k} = {v}\n" for k, v in extra.items())
        return evaluation
