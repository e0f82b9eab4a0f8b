"""Classifier-free guidance in the sampling loop: the conditional and unconditional passes run
as ONE batch of 2B, and give the same samples as two separate passes."""

from __future__ import annotations

import pytest
import torch

from duboko import registry
from duboko.diffusion.pipeline import _clamp, sample
from duboko.diffusion.schedulers import DDIMScheduler, DDPMScheduler, SchedulerConfig


def _two_pass_reference(model, scheduler, cond, guidance, steps, seed, null):
    """CFG as written in Ho & Salimans 2022, eq. 6: two forward passes per step."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn((cond.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps.tolist():
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        if cfg.conditioning == "text":
            ctx_c, mask_c = model.encode_text(cond)
            ctx_u, mask_u = model.encode_text(null)
            out_c = model(x, tt, None, context=ctx_c, context_mask=mask_c)
            out_u = model(x, tt, None, context=ctx_u, context_mask=mask_u)
        else:
            out_c, out_u = model(x, tt, cond), model(x, tt, null)
        out = out_u + guidance * (out_c - out_u)
        if isinstance(scheduler, DDIMScheduler):
            x = scheduler.step(out, t, x, eta=0.0, generator=g, use_clipped_model_output=True)
        else:
            x = scheduler.step(out, t, x, generator=g)
    return _clamp(x, 1.0)


def _model(conditioning):
    torch.manual_seed(0)
    kw = dict(base_channels=8, channel_mults=[1, 2], groups=4, num_heads=2, attention_resolutions=[7])
    if conditioning == "text":
        kw.update(text_dim=16, text_layers=1, text_heads=2, cross_attention_resolutions=[7], vocab_size=40)
        model = registry.create_model("unet-mnist-text", **kw)
    else:
        model = registry.create_model("unet-mnist-class", **kw)
    # Non-zero output layer: the zero-initialised one would make every pass trivially equal.
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.mark.parametrize("conditioning", ["class", "text"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_batched_guidance_equals_two_passes(conditioning, sampler):
    model = _model(conditioning)
    sched_cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    if conditioning == "text":
        cond = torch.randint(2, 40, (3, 9))
        cond[:, 0] = 1
        null = torch.zeros_like(cond)
        null[:, : model.null_condition(3).shape[1]] = model.null_condition(3)
    else:
        cond = torch.tensor([3, 8, 1])
        null = model.null_condition(3)
    batched = sample(model, sched_cls(SchedulerConfig()), 3, cond=cond, guidance=3.0, num_steps=4,
                     generator=torch.Generator().manual_seed(5)).images
    reference = _two_pass_reference(model, sched_cls(SchedulerConfig()), cond, 3.0, 4, 5, null)
    assert torch.allclose(batched, reference, atol=1e-5), (batched - reference).abs().max()
    # And guidance changes the result (the test is not vacuous).
    plain = sample(model, sched_cls(SchedulerConfig()), 3, cond=cond, guidance=1.0, num_steps=4,
                   generator=torch.Generator().manual_seed(5)).images
    assert not torch.allclose(plain, batched, atol=1e-3)


def test_guided_sampling_is_one_forward_per_step():
    model = _model("class")
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    sample(model, DDIMScheduler(SchedulerConfig()), 3, cond=torch.tensor([1, 2, 3]), guidance=2.0, num_steps=5,
           generator=torch.Generator().manual_seed(0))
    assert calls == [6] * 5  # 2B = [cond; null] in one batch, once per step


def test_output_range_clamps_or_not():
    model = _model("class")
    kw = dict(cond=torch.tensor([1, 2]), num_steps=2, generator=torch.Generator().manual_seed(0))
    out = sample(model, DDIMScheduler(SchedulerConfig(clip_sample_range=4.0)), 2, output_range=4.0, **kw).images
    assert out.abs().max() <= 4.0
    assert sample(model, DDIMScheduler(SchedulerConfig()), 2, **kw).images.abs().max() <= 1.0
