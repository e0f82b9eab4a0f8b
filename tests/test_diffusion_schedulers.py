"""Schedulers: equality with diffusers' DDPMScheduler/DDIMScheduler, and forward-process facts."""

from __future__ import annotations

import pytest
import torch

from duboko.diffusion.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    SchedulerConfig,
    cosine_betas,
    make_scheduler,
)
from duboko.errors import DubokoError

diffusers = pytest.importorskip("diffusers")

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours -> diffusers' name


def _ours(cls, schedule, prediction, spacing="leading"):
    return cls(SchedulerConfig(beta_schedule=schedule, prediction_type=prediction, timestep_spacing=spacing))


def _theirs(cls, schedule, prediction, spacing="leading"):
    return cls(
        num_train_timesteps=1000,
        beta_schedule=SCHEDULES[schedule],
        prediction_type=prediction,
        timestep_spacing=spacing,
        clip_sample=True,
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_betas_and_alphas_match_diffusers(schedule):
    ours = _ours(DDPMScheduler, schedule, "epsilon")
    theirs = _theirs(diffusers.DDPMScheduler, schedule, "epsilon")
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_and_velocity_match_diffusers(schedule):
    torch.manual_seed(0)
    ours = _ours(DDPMScheduler, schedule, "v_prediction")
    theirs = _theirs(diffusers.DDPMScheduler, schedule, "v_prediction")
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_ddpm_step_matches_diffusers(schedule, prediction, steps):
    torch.manual_seed(1)
    ours = _ours(DDPMScheduler, schedule, prediction)
    theirs = _theirs(diffusers.DDPMScheduler, schedule, prediction)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    sample = torch.randn(2, 1, 6, 6)
    output = torch.randn(2, 1, 6, 6)
    for t in [int(ours.timesteps[0]), int(ours.timesteps[len(ours.timesteps) // 2]), int(ours.timesteps[-1])]:
        a = ours.step(output, t, sample, generator=torch.Generator().manual_seed(5))
        b = theirs.step(output, t, sample, generator=torch.Generator().manual_seed(5)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clipped", [False, True])
def test_ddim_step_matches_diffusers(schedule, prediction, spacing, eta, clipped):
    torch.manual_seed(2)
    ours = _ours(DDIMScheduler, schedule, prediction, spacing)
    theirs = _theirs(diffusers.DDIMScheduler, schedule, prediction, spacing)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    sample = torch.randn(2, 1, 6, 6)
    output = 3 * torch.randn(2, 1, 6, 6)  # large, like a guided ε̂: x̂_0 gets clipped
    noise = torch.randn(2, 1, 6, 6)
    for t in ours.timesteps[[0, 10, 25, -1]].tolist():
        a = ours.step(output, t, sample, eta=eta, noise=noise, use_clipped_model_output=clipped)
        b = theirs.step(
            output, t, sample, eta=eta, variance_noise=noise, use_clipped_model_output=clipped
        ).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_full_ddim_chain_matches_diffusers():
    """A whole 20-step deterministic chain with a fixed toy 'network' stays equal."""
    torch.manual_seed(3)
    ours = _ours(DDIMScheduler, "cosine", "epsilon")
    theirs = _theirs(diffusers.DDIMScheduler, "cosine", "epsilon")
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x = y = torch.randn(3, 1, 5, 5)
    for t in ours.timesteps.tolist():
        x = ours.step(0.3 * x + 0.01 * t / 1000, t, x)
        y = theirs.step(0.3 * y + 0.01 * t / 1000, t, y).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_process_reaches_unit_variance_noise(schedule):
    torch.manual_seed(0)
    sched = _ours(DDPMScheduler, schedule, "epsilon")
    assert float(sched.alphas_cumprod[-1]) < 1e-4  # almost no signal is left at t = T
    x0 = torch.full((4000, 1, 4, 4), 0.9)  # far from noise: mean 0.9, variance 0
    t = torch.full((4000,), sched.num_train_timesteps - 1)
    xt = sched.add_noise(x0, torch.randn_like(x0), t)
    assert abs(float(xt.mean())) < 0.02
    assert abs(float(xt.var()) - 1.0) < 0.03
    # ... while at t = 0 the image is almost untouched.
    x1 = sched.add_noise(x0, torch.randn_like(x0), torch.zeros(4000, dtype=torch.long))
    assert float((x1 - x0).abs().mean()) < 0.1


def test_cosine_schedule_is_monotone_and_capped():
    b = cosine_betas(1000)
    assert float(b.max()) <= 0.999 + 1e-6 and float(b.min()) > 0
    assert bool((b[1:] >= b[:-1] - 1e-7).all())


def test_v_prediction_round_trip():
    """x̂_0 and ε̂ recovered from the exact v target are the true x_0 and ε."""
    torch.manual_seed(0)
    sched = _ours(DDIMScheduler, "cosine", "v_prediction")
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in (0, 300, 999):
        tt = torch.full((2,), t)
        xt = sched.add_noise(x0, eps, tt)
        v = sched.training_target(x0, eps, tt)
        x0_hat, eps_hat = sched.predict_original_and_noise(v, t, xt)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-3, atol=1e-3)


def test_perfect_denoiser_recovers_the_image_with_ddim():
    """With the exact ε (an oracle that knows x_0), 10 DDIM steps land on x_0."""
    torch.manual_seed(0)
    sched = _ours(DDIMScheduler, "cosine", "epsilon")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    sched.set_timesteps(10)
    x = torch.randn_like(x0)
    for t in sched.timesteps.tolist():
        a = sched.alphas_cumprod[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = sched.step(eps, t, x)
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)


def test_bad_names_and_steps_are_user_errors():
    with pytest.raises(DubokoError, match="beta_schedule 'quadratic'"):
        DDPMScheduler(beta_schedule="quadratic")
    with pytest.raises(DubokoError, match="prediction_type"):
        DDPMScheduler(prediction_type="sample")
    with pytest.raises(DubokoError, match="sampler 'euler'"):
        make_scheduler("euler")
    with pytest.raises(DubokoError, match="1..1000, got 0"):
        DDIMScheduler().set_timesteps(0)


class _ToyConditioned(torch.nn.Module):
    """A 'denoiser' with known outputs: ε = 0.5·x for the null label, 0.5·x + label/4 otherwise,
    and text-mode twin below, so a guided sampling step can be computed by hand."""

    def __init__(self, conditioning: str):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(conditioning=conditioning, num_classes=10, in_channels=1, image_size=3)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def null_condition(self, batch_size, device=None):
        if self.config.conditioning == "class":
            return torch.full((batch_size,), 10, dtype=torch.long, device=device)
        return torch.ones(batch_size, 1, dtype=torch.long, device=device)  # [BOS]

    def encode_text(self, tokens):
        mask = tokens == 0
        feats = (tokens * ~mask).sum(1, keepdim=True).float()[:, :, None].expand(-1, tokens.shape[1], 1)
        return feats, mask  # feature = sum of the prompt's token ids (the null prompt: 1)

    def forward(self, x, t, cond=None, *, context=None, context_mask=None):
        if self.config.conditioning == "class":
            shift = torch.where(cond == 10, torch.zeros_like(cond), cond).float()
        else:
            shift = context[:, 0, 0] - 1  # 0 for the null prompt
        return 0.5 * x + shift[:, None, None, None] / 4 + self.w


@pytest.mark.parametrize("conditioning", ["class", "text"])
@pytest.mark.parametrize("clipped", [False, True])
def test_guided_sampling_step_is_the_cfg_combination(conditioning, clipped):
    """One guided DDIM step equals ε_u + w(ε_c - ε_u) fed to the scheduler by hand; with
    use_clipped_model_output the ε̂ is re-derived from the clipped x̂_0 (what keeps large guidance
    scales from saturating the samples)."""
    from duboko.diffusion.pipeline import sample

    model = _ToyConditioned(conditioning)
    cond = torch.tensor([3, 7]) if conditioning == "class" else torch.tensor([[1, 5, 6], [1, 9, 0]])
    w = 4.0
    sched = _ours(DDIMScheduler, "cosine", "epsilon")
    got = sample(model, sched, 2, cond=cond, guidance=w, num_steps=3,
                 generator=torch.Generator().manual_seed(0), use_clipped_model_output=clipped).images
    x = torch.randn((2, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([3.0, 7.0]) if conditioning == "class" else torch.tensor([11.0, 9.0])
    ref = _ours(DDIMScheduler, "cosine", "epsilon")
    ref.set_timesteps(3)
    for t in ref.timesteps.tolist():
        eps_u, eps_c = 0.5 * x, 0.5 * x + shift[:, None, None, None] / 4
        eps = eps_u + w * (eps_c - eps_u)
        x = ref.step(eps, t, x, use_clipped_model_output=clipped)
    torch.testing.assert_close(got, x.clamp(-1, 1))
    other = sample(model, sched, 2, cond=cond, guidance=w, num_steps=3,
                   generator=torch.Generator().manual_seed(0), use_clipped_model_output=not clipped).images
    assert not torch.allclose(other, got)  # the switch matters
