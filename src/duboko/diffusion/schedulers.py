"""Noise schedulers for denoising diffusion, apart from the network (the split `diffusers` uses).

A scheduler holds the noise schedule β_1..β_T and knows three things:

* `add_noise(x0, noise, t)`: the closed-form forward process q(x_t | x_0) used in training,
  x_t = √ᾱ_t · x_0 + √(1-ᾱ_t) · ε  (Ho et al. 2020, "DDPM", eq. 4), with ᾱ_t = Π_{s≤t} (1-β_s);
* `set_timesteps(n)`: which of the T training timesteps a sampler visits, from noisy to clean;
* `step(model_output, t, x_t)`: one reverse step x_t -> x_{t_prev}.

`DDPMScheduler.step` is ancestral sampling (DDPM eq. 6-7: the posterior q(x_{t-1} | x_t, x̂_0)),
`DDIMScheduler.step` is DDIM (Song et al. 2021, eq. 12) with `eta` interpolating between the
deterministic sampler (eta = 0) and DDPM-like noise (eta = 1), for any number of steps.

Timesteps are 0-based like `diffusers` (t = 0 .. T-1; t = 0 is the first noising step), and for the
same settings the numbers match `diffusers.DDPMScheduler` / `DDIMScheduler` (tests cross-check
betas, ᾱ, add_noise and single steps). The network may predict ε ("epsilon") or the velocity
v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0 ("v_prediction", Salimans & Ho 2022, "Progressive distillation", §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duboko.errors import DubokoError, unknown_name

BETA_SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing")


def linear_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule: β from 1e-4 to 0.02 over T = 1000 steps (Ho et al. 2020, §4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2),
    β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped at 0.999 so the last step stays finite. It destroys
    information more slowly than the linear schedule, which wastes many steps on near-pure noise
    for small images like MNIST."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    t = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)]
    return torch.tensor(betas, dtype=torch.float32)


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000  # T, the number of forward noising steps
    beta_schedule: str = "cosine"  # linear | cosine
    beta_start: float = 1e-4  # first β of the linear schedule
    beta_end: float = 0.02  # last β of the linear schedule
    prediction_type: str = "epsilon"  # what the network predicts: epsilon | v_prediction
    clip_sample: bool = True  # clamp the predicted x̂_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0  # data range (images are scaled to [-1, 1])
    timestep_spacing: str = "leading"  # leading (diffusers' default) | trailing (starts at T-1)


def validate_scheduler_config(cfg: SchedulerConfig, prefix: str = "") -> None:
    """Refuse unknown names and a non-positive T; errors name the fields as `prefix + field`
    (a task passes "data." so that they name its config keys)."""
    if cfg.beta_schedule not in BETA_SCHEDULES:
        raise unknown_name(f"{prefix}beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise unknown_name(f"{prefix}prediction_type", cfg.prediction_type, PREDICTION_TYPES)
    if cfg.timestep_spacing not in TIMESTEP_SPACINGS:
        raise unknown_name(f"{prefix}timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
    if cfg.num_train_timesteps < 1:
        raise DubokoError(f"{prefix}num_train_timesteps must be >= 1, got {cfg.num_train_timesteps}")


class NoiseScheduler:
    """Shared part of the schedulers: the schedule, q(x_t | x_0), and x̂_0 / ε̂ from the output."""

    def __init__(self, config: SchedulerConfig | None = None, **overrides):
        config = config or SchedulerConfig()
        if overrides:
            config = SchedulerConfig(**{**config.__dict__, **overrides})
        validate_scheduler_config(config)
        self.config = config
        T = config.num_train_timesteps
        if config.beta_schedule == "linear":
            self.betas = linear_betas(T, config.beta_start, config.beta_end)  # (T,)
        else:
            self.betas = cosine_betas(T)
        self.alphas = 1.0 - self.betas  # (T,)  α_t
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)  ᾱ_t
        self.one = torch.tensor(1.0)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long)  # (T,) noisy -> clean

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    # -- training ------------------------------------------------------------------------------
    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (B, 1, 1, ...) to broadcast against `like` (B, C, H, W)."""
        out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return out.reshape(out.shape + (1,) * (like.dim() - out.dim()))

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t · x_0 + √(1-ᾱ_t) · ε  (DDPM eq. 4). timesteps: (B,) ints in [0, T)."""
        a = self._gather(self.alphas_cumprod, timesteps, original)  # (B, 1, 1, 1)
        return a.sqrt() * original + (1 - a).sqrt() * noise

    def get_velocity(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t · ε - √(1-ᾱ_t) · x_0: the v-prediction target (Salimans & Ho 2022, §4)."""
        a = self._gather(self.alphas_cumprod, timesteps, original)
        return a.sqrt() * noise - (1 - a).sqrt() * original

    def training_target(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for this prediction type."""
        if self.config.prediction_type == "epsilon":
            return noise
        return self.get_velocity(original, noise, timesteps)

    def predict_original_and_noise(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the network output at one timestep (before any clipping)."""
        a = self.alphas_cumprod[timestep]
        b = 1 - a
        if self.config.prediction_type == "epsilon":
            x0 = (sample - b**0.5 * model_output) / a**0.5
            eps = model_output
        else:  # v = √ᾱ ε - √(1-ᾱ) x_0  =>  x_0 = √ᾱ x_t - √(1-ᾱ) v,  ε = √ᾱ v + √(1-ᾱ) x_t
            x0 = a**0.5 * sample - b**0.5 * model_output
            eps = a**0.5 * model_output + b**0.5 * sample
        return x0, eps

    # -- sampling ------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Choose the timesteps the sampler visits (noisy -> clean), as diffusers does."""
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise DubokoError(f"number of sampling steps must be in 1..{T}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        if self.config.timestep_spacing == "leading":
            ratio = T // num_inference_steps  # 1000 // 50 = 20: t = 980, 960, ..., 0
            steps = torch.arange(0, num_inference_steps) * ratio
            self.timesteps = steps.flip(0).long()
        else:  # trailing: t = 999, 979, ..., 19 (starts at pure noise)
            ratio = T / num_inference_steps
            steps = torch.round(torch.arange(T, 0, -ratio, dtype=torch.float64)) - 1
            self.timesteps = steps.long()
        return self.timesteps

    def previous_timestep(self, timestep: int) -> int:
        n = self.num_inference_steps or self.num_train_timesteps
        if self.config.timestep_spacing == "trailing" and self.num_inference_steps:
            idx = (self.timesteps == timestep).nonzero()
            i = int(idx[0, 0]) if len(idx) else len(self.timesteps) - 1
            return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        return timestep - self.num_train_timesteps // n

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            return x0.clamp(-r, r)
        return x0

    def step(self, model_output, timestep, sample, generator=None, noise=None) -> torch.Tensor:
        raise NotImplementedError


def _noise_like(sample: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
    if noise is not None:
        return noise
    # Drawn on the generator's device (diffusers' randn_tensor does the same on CPU).
    gen_device = generator.device if generator is not None else sample.device
    return torch.randn(sample.shape, generator=generator, device=gen_device, dtype=sample.dtype).to(sample.device)


class DDPMScheduler(NoiseScheduler):
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, eq. 6-7), fixed-small variance."""

    def step(self, model_output, timestep, sample, generator=None, noise=None) -> torch.Tensor:
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]  # ᾱ_t
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one  # ᾱ_{t_prev}
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha_t = a_t / a_prev  # α_t of this (possibly strided) step
        beta_t = 1 - alpha_t
        x0, _ = self.predict_original_and_noise(model_output, t, sample)
        x0 = self._clip(x0)
        # Posterior mean μ̃_t(x_t, x̂_0) (DDPM eq. 7): coefficients of x̂_0 and of x_t.
        c0 = (a_prev**0.5 * beta_t) / b_t
        ct = alpha_t**0.5 * b_prev / b_t
        mean = c0 * x0 + ct * sample
        if t > 0:
            var = (b_prev / b_t * beta_t).clamp(min=1e-20)  # β̃_t (DDPM eq. 7)
            mean = mean + var**0.5 * _noise_like(sample, generator, noise)
        return mean


class DDIMScheduler(NoiseScheduler):
    """DDIM (Song et al. 2021, eq. 12): x_{t'} = √ᾱ_{t'} x̂_0 + √(1-ᾱ_{t'}-σ²) ε̂ + σ z, with
    σ = eta · √((1-ᾱ_{t'})/(1-ᾱ_t)) · √(1-ᾱ_t/ᾱ_{t'}) (eq. 16). eta = 0 is deterministic."""

    def __init__(self, config: SchedulerConfig | None = None, set_alpha_to_one: bool = True, **overrides):
        super().__init__(config, **overrides)
        # ᾱ "before" t = 0: 1 (a clean image) as in diffusers' default set_alpha_to_one=True.
        self.final_alpha_cumprod = self.one if set_alpha_to_one else self.alphas_cumprod[0]

    def step(
        self, model_output, timestep, sample, eta: float = 0.0, generator=None, noise=None,
        use_clipped_model_output: bool = False,
    ) -> torch.Tensor:
        """One DDIM step. `use_clipped_model_output` re-derives ε̂ from the clipped x̂_0 (GLIDE's
        choice, diffusers' argument of the same name): x_t = √ᾱ x̂_0 + √(1-ᾱ) ε̂ then still holds,
        which keeps a guided ε̂ (often of norm well above 1 when the guidance scale is large)
        from pushing x_{t'} off the noise level the network expects at the next step."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        x0, eps = self.predict_original_and_noise(model_output, t, sample)
        x0 = self._clip(x0)
        if use_clipped_model_output:
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        var = (b_prev / b_t) * (1 - a_t / a_prev)  # σ²/eta² (eq. 16)
        std = eta * var**0.5
        direction = (1 - a_prev - std**2) ** 0.5 * eps  # "direction pointing to x_t"
        prev = a_prev**0.5 * x0 + direction
        if eta > 0:
            prev = prev + std * _noise_like(sample, generator, noise)
        return prev


SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def make_scheduler(sampler: str, config: SchedulerConfig | None = None) -> NoiseScheduler:
    if sampler not in SAMPLERS:
        raise unknown_name("sampler", sampler, SAMPLERS)
    return SAMPLERS[sampler](config)
