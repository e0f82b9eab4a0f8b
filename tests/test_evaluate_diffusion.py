"""evaluate/diffusion.py: the forward process in closed form and the pictures of both processes."""

from __future__ import annotations

import pytest
import torch

from duboko.diffusion.pipeline import SampleResult
from duboko.diffusion.schedulers import DDPMScheduler
from duboko.errors import DubokoError
from duboko.evaluate.diffusion import forward_process, plot_noising, plot_trajectory

PNG = b"\x89PNG\r\n\x1a\n"


def _x0_noise() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand((1, 1, 8, 8), generator=g) * 2 - 1, torch.randn((1, 1, 8, 8), generator=g)


def test_forward_process_is_the_closed_form():
    x0, noise = _x0_noise()
    rows = forward_process(x0, noise, "linear", [0, 1, 500, 1000])
    assert [t for t, _, _ in rows] == [0, 1, 500, 1000]
    t0, abar0, xt0 = rows[0]
    assert abar0 == 1.0 and torch.equal(xt0, x0)  # t = 0: the clean image
    abar = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    for t, a, xt in rows[1:]:
        assert a == pytest.approx(float(abar[t - 1]))  # t steps of noising: index t-1
        assert torch.allclose(xt, a ** 0.5 * x0 + (1 - a) ** 0.5 * noise, atol=1e-5)
    assert rows[1][1] > 0.99 and rows[-1][1] < 1e-3  # barely noised ... almost pure noise


def test_the_cosine_schedule_keeps_more_signal_midway():
    x0, noise = _x0_noise()
    (_, linear, _), = forward_process(x0, noise, "linear", [300])
    (_, cosine, _), = forward_process(x0, noise, "cosine", [300])
    assert cosine > linear  # Nichol & Dhariwal 2021: the linear schedule destroys information early


def test_timesteps_out_of_range_are_one_clear_error(tmp_path):
    x0, noise = _x0_noise()
    with pytest.raises(DubokoError, match="timesteps must be in 0..1000, got 2000"):
        forward_process(x0, noise, "linear", [0, 2000])
    with pytest.raises(DubokoError, match="got -1"):
        plot_noising(torch.zeros(8, 8, dtype=torch.uint8), tmp_path / "bad.png", [-1], ["linear"])
    assert not (tmp_path / "bad.png").exists()


def test_noising_picture(tmp_path):
    image = (torch.arange(64).reshape(8, 8) * 4).to(torch.uint8)  # (H, W) uint8, as MNIST stores it
    out = tmp_path / "forward.png"
    plot_noising(image, out, [0, 250, 1000], ["linear", "cosine"], seed=1, title="forward")
    assert out.read_bytes()[:8] == PNG


def test_trajectory_picture(tmp_path):
    frames = [(t, torch.randn(1, 1, 8, 8)) for t in (900, 500, 100)]
    images = torch.zeros(1, 1, 8, 8)
    result = SampleResult(images, frames + [(-1, images)], [(t, x.clamp(-1, 1)) for t, x in frames])
    out = tmp_path / "trajectory.png"
    plot_trajectory(result, out, title="denoising")
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(DubokoError, match="keep_every"):
        plot_trajectory(SampleResult(images, [], []), tmp_path / "none.png")
