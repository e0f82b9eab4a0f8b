"""The reference (primer) pipeline: torchvision-semantics PIL transforms, cross-checked against
duboko's batched tensor transforms, and the primer's training loop on a few batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from duboko.bench import reference as R
from duboko.data import transforms as T
from duboko.data.mnist import MEAN, STD, load_mnist


@pytest.fixture(scope="module")
def digits():
    x, y = load_mnist("test")
    return x[:16], y[:16]


def _pil(a: torch.Tensor) -> Image.Image:
    return Image.fromarray(a.numpy(), "L")


def test_train_transform_shape_range_and_grey_channels(digits):
    torch.manual_seed(0)
    t = R.train_transform()
    for a in digits[0][:4]:
        x = t(_pil(a))
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
        assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # Grayscale(3) replicates
        assert x.max() > 2.0  # a digit's strokes survive (bright pixels near (1-MEAN)/STD = 2.82)


def test_test_transform_is_deterministic_and_matches_manual_pipeline(digits):
    a = digits[0][0]
    x = R.test_transform()(_pil(a))
    manual = np.asarray(_pil(a).resize((48, 48), Image.BILINEAR)).astype(np.float32) / 255
    expected = (torch.from_numpy(manual) - MEAN) / STD
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert torch.equal(x, R.test_transform()(_pil(a)))


def test_pil_resize_matches_duboko_batched_resize(digits):
    """PIL's bilinear upscale and F.interpolate(bilinear, align_corners=False) agree to PIL's
    uint8 rounding: the two pipelines see the same images."""
    images = digits[0]
    pil = torch.stack([torch.from_numpy(np.array(_pil(a).resize((48, 48), Image.BILINEAR))) for a in images]).float() / 255
    batched = T.resize(images, 48)[:, 0]
    assert (pil - batched).abs().max().item() <= 1 / 255 + 1e-6
    assert (pil - batched).abs().mean().item() < 1e-3


@pytest.mark.parametrize("factor", [0.8, 0.93, 1.2])
def test_brightness_and_contrast_match_torchvision_formulas(digits, factor):
    a = digits[0][1].numpy().astype(np.float64)
    img = _pil(digits[0][1])
    bright = np.asarray(ImageEnhance.Brightness(img).enhance(factor)).astype(np.float64)
    assert np.abs(bright - np.clip(a * factor, 0, 255)).max() <= 1.0  # blend with black, uint8 rounding
    mean = int(a.mean() + 0.5)  # PIL: the grey image's mean level, rounded
    contrast = np.asarray(ImageEnhance.Contrast(img).enhance(factor)).astype(np.float64)
    assert np.abs(contrast - np.clip(mean + factor * (a - mean), 0, 255)).max() <= 1.0


def test_color_jitter_draws_from_torch_rng_and_is_reproducible(digits):
    img = _pil(digits[0][2]).convert("RGB")
    jitter = R.ColorJitter(brightness=0.2, contrast=0.2)
    torch.manual_seed(3)
    a = np.asarray(jitter(img))
    torch.manual_seed(3)
    b = np.asarray(jitter(img))
    torch.manual_seed(4)
    c = np.asarray(jitter(img))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # torchvision's draw order: randperm(4), then the brightness, then the contrast factor
    torch.manual_seed(3)
    torch.randperm(4)
    bf = float(torch.empty(1).uniform_(0.8, 1.2))
    assert 0.8 <= bf <= 1.2


def test_rotation_keeps_size_fills_black_and_rotates(digits):
    img = _pil(digits[0][3]).resize((48, 48), Image.BILINEAR)
    torch.manual_seed(0)
    angle = float(torch.empty(1).uniform_(-10, 10))
    torch.manual_seed(0)
    out = R.RandomRotation(10)(img)
    assert out.size == (48, 48)
    assert np.array_equal(np.asarray(out), np.asarray(img.rotate(angle, Image.BILINEAR, fillcolor=0)))
    assert R.RandomRotation(0)(img).tobytes() == img.tobytes()  # zero degrees: the identity


def test_dataset_and_loader_give_the_primers_batches(digits):
    x, y = digits
    ds = R.MNISTImages(x, y, R.train_transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 48, 48) and labels.dtype == torch.int64


def test_reference_trainer_runs_windows_and_evaluates():
    trainer = R.ReferenceTrainer(R.ReferenceConfig(batch_size=16, limit_train=40, limit_test=32, seed=0))
    w = trainer.run(4)  # crosses the epoch end (40 images = 3 batches)
    assert w["images"] == 16 + 16 + 8 + 16 and w["seconds"] > 0
    assert math.isfinite(w["loss_sum"]) and 0 <= w["correct"] <= w["images"]
    assert trainer.epoch == 1 and trainer.steps == 4
    ev = trainer.evaluate()
    assert ev["images"] == 32 and 0.0 <= ev["accuracy"] <= 1.0 and math.isfinite(ev["loss"])
