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


# -- accuracy with its 95 % Wilson interval ---------------------------------------------------


@pytest.mark.parametrize("correct,total", [(0, 10), (3, 10), (95, 100), (100, 100), (956, 1000), (1, 1)])
def test_wilson_interval_solves_its_defining_equation(correct, total):
    """The Wilson bounds are the p with |p̂ - p| = z √(p(1-p)/n) (Wilson 1927): check each
    bound against that equation, independently of the closed form the code uses."""
    from duboko.evaluate.diffusion import WILSON_Z95, wilson_interval

    low, high = wilson_interval(correct, total)
    p_hat = correct / total
    assert 0.0 <= low <= p_hat <= high <= 1.0
    for p in (low, high):
        if 0 < p < 1:
            assert abs(p_hat - p) == pytest.approx(WILSON_Z95 * (p * (1 - p) / total) ** 0.5, abs=1e-9)
    if correct == 0:
        assert low == 0.0
    if correct == total:
        assert high == 1.0


def test_wilson_interval_known_values_and_bad_input():
    from duboko.evaluate.diffusion import wilson_interval

    # Textbook value (Newcombe 1998, table I: 0/10 -> 0 to 0.2775; 81/263 -> 0.2553 to 0.3662).
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(81, 263)
    assert (low, high) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    # N = 1,000 at 0.97: about ±1 pp; N = 300 at 0.93: about ±3 pp (the point).
    low, high = wilson_interval(970, 1000)
    assert 0.955 < low < 0.96 and 0.978 < high < 0.98
    for bad in ((5, 0), (-1, 10), (11, 10)):
        with pytest.raises(DubokoError, match="correct"):
            wilson_interval(*bad)


def test_accuracy_summary_per_digit():
    from duboko.evaluate.diffusion import accuracy_summary, wilson_interval

    labels = torch.arange(10).repeat(10)  # 100 per ... 10 per digit
    preds = labels.clone()
    preds[labels == 8] = 3  # every 8 drawn as a 3
    preds[(labels == 2).nonzero()[:5, 0]] = 7  # half of the 2s wrong
    out = accuracy_summary(preds, labels)
    assert out["prompt_accuracy"] == pytest.approx(85 / 100)
    assert (out["prompt_accuracy_low"], out["prompt_accuracy_high"]) == pytest.approx(wilson_interval(85, 100))
    per = out["prompt_accuracy_per_digit"]
    assert len(per) == 10 and per[8] == 0.0 and per[2] == 0.5 and per[0] == 1.0
