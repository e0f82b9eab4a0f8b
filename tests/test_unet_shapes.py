"""UNet denoiser: shapes for every conditioning mode, guidance plumbing, and pluggable text encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duboko import registry
from duboko.diffusion.pipeline import sample
from duboko.diffusion.schedulers import DDIMScheduler, DDPMScheduler
from duboko.errors import DubokoError
from duboko.models.unet import UNet, UNetConfig, timestep_embedding

SMALL = dict(base_channels=16, channel_mults=[1, 2], attention_resolutions=[7], cross_attention_resolutions=[7], groups=4, text_dim=16, text_layers=1)


def _x(b=3, side=28):
    return torch.randn(b, 1, side, side)


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("conditioning", ["none", "class", "text"])
def test_output_shape_matches_input_for_every_conditioning(conditioning, patch):
    torch.manual_seed(0)
    model = UNet(UNetConfig(conditioning=conditioning, patch_size=patch, vocab_size=45, **SMALL))
    t = torch.tensor([0, 500, 999])
    cond = None
    if conditioning == "class":
        cond = torch.tensor([0, 7, 10])  # 10 = the null label
    elif conditioning == "text":
        cond = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0], [1, 0, 0, 0]])  # padded prompts; the last is empty
    out = model(_x(), t, cond)
    assert out.shape == (3, 1, 28, 28)
    assert torch.isfinite(out).all()


def test_odd_sizes_and_three_levels():
    model = UNet(UNetConfig(base_channels=8, channel_mults=[1, 2, 2], attention_resolutions=[4], groups=4, image_size=20))
    assert model(torch.randn(2, 1, 20, 20), torch.tensor([1, 2])).shape == (2, 1, 20, 20)


def test_condition_changes_the_output_and_is_per_sample():
    torch.manual_seed(0)
    model = UNet(UNetConfig(conditioning="class", **SMALL))
    for p in model.parameters():  # zero-initialised output layers would hide the dependence
        nn.init.normal_(p, std=0.05)
    x, t = _x(2), torch.tensor([10, 10])
    a = model(x, t, torch.tensor([3, 3]))
    b = model(x, t, torch.tensor([3, 5]))
    torch.testing.assert_close(a[0], b[0])  # sample 0 unchanged
    assert (a[1] - b[1]).abs().max() > 1e-4  # sample 1 follows its label


def test_text_padding_does_not_change_the_output():
    """Extra padding tokens are masked out of cross-attention and of the pooled prompt."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(conditioning="text", vocab_size=45, **SMALL)).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    x, t = _x(1), torch.tensor([100])
    short = torch.tensor([[1, 9, 12, 4]])
    padded = torch.tensor([[1, 9, 12, 4, 0, 0, 0]])
    torch.testing.assert_close(model(x, t, short), model(x, t, padded), rtol=1e-5, atol=1e-5)


def test_any_text_encoder_can_be_plugged_in():
    """A user's encoder: any module returning (features (B, L, text_dim), pad mask (B, L))."""

    class BagOfChars(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(45, 16)

        def forward(self, tokens):
            return self.embed(tokens), tokens == 0

    model = UNet(UNetConfig(conditioning="text", vocab_size=45, **SMALL))
    model.text_encoder = BagOfChars()
    tokens = torch.tensor([[1, 4, 5], [1, 0, 0]])
    assert model(_x(2), torch.tensor([1, 2]), tokens).shape == (2, 1, 28, 28)
    context, mask = model.encode_text(tokens)
    assert model(_x(2), torch.tensor([1, 2]), context=context, context_mask=mask).shape == (2, 1, 28, 28)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 1]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(freqs), torch.sin(freqs)]))


@pytest.mark.parametrize("name", ["unet-mnist", "unet-mnist-class", "unet-mnist-text"])
def test_registered_variants_build_and_run(name):
    model = registry.create_model(name, **{k: v for k, v in SMALL.items()})
    out = model(*registry.example_input(name, 2, model))
    assert out.shape == (2, 1, 28, 28)


def test_bad_configs_are_refused():
    with pytest.raises(DubokoError, match="conditioning"):
        registry.create_model("unet-mnist", conditioning="audio")
    with pytest.raises(DubokoError, match="divisible by groups"):
        registry.create_model("unet-mnist", base_channels=12, groups=8)
    with pytest.raises(DubokoError, match="vocab_size"):
        registry.create_model("unet-mnist-text", vocab_size=0)


@pytest.mark.parametrize("conditioning", ["none", "class", "text"])
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_pipeline_samples_with_and_without_guidance(conditioning, scheduler_cls):
    torch.manual_seed(0)
    model = UNet(UNetConfig(conditioning=conditioning, vocab_size=45, **SMALL)).eval()
    cond = None
    if conditioning == "class":
        cond = torch.tensor([1, 2])
    elif conditioning == "text":
        cond = torch.tensor([[1, 5, 6], [1, 7, 0]])
    guidance = 3.0 if cond is not None else 1.0
    result = sample(model, scheduler_cls(), 2, cond=cond, guidance=guidance, num_steps=4,
                    generator=torch.Generator().manual_seed(0), keep_every=2)
    assert result.images.shape == (2, 1, 28, 28)
    assert result.images.abs().max() <= 1.0
    assert [t for t, _ in result.trajectory][-1] == -1 and len(result.predictions) == 3  # steps 0, 2 and the last
    again = sample(model, scheduler_cls(), 2, cond=cond, guidance=guidance, num_steps=4,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.images, again.images)  # a seed gives the same images


def test_guidance_combines_conditional_and_unconditional_outputs():
    """One DDIM step with guidance w equals the step taken with ε_u + w (ε_c - ε_u)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(conditioning="class", **SMALL)).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    sched = DDIMScheduler()
    got = sample(model, sched, 1, cond=torch.tensor([4]), guidance=2.5, num_steps=1,
                 generator=torch.Generator().manual_seed(3)).images
    x = torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    t = int(sched.timesteps[0])
    with torch.no_grad():
        eps_c = model(x, torch.tensor([t]), torch.tensor([4]))
        eps_u = model(x, torch.tensor([t]), torch.tensor([10]))
    want = sched.step(eps_u + 2.5 * (eps_c - eps_u), t, x).clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_guidance_without_condition_is_a_user_error():
    model = UNet(UNetConfig(**SMALL)).eval()
    with pytest.raises(DubokoError, match="guidance != 1 needs a condition"):
        sample(model, DDIMScheduler(), 1, guidance=3.0, num_steps=2)
