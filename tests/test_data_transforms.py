import math

import torch
import torch.nn.functional as F

from duboko.data import transforms as T


def _images(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)


def test_train_transform_shapes_ranges_and_channels():
    x = T.train_transform(_images(), size=48, channels=3, rotation=10, brightness=0.2, contrast=0.2,
                          mean=0.1307, std=0.3081, generator=torch.Generator().manual_seed(1))
    assert x.shape == (8, 3, 48, 48) and x.dtype == torch.float32
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey replicated to RGB


def test_determinism_under_a_seed():
    kw = dict(size=48, channels=3, rotation=10, brightness=0.2, contrast=0.2, mean=0.1307, std=0.3081)
    a = T.train_transform(_images(), generator=torch.Generator().manual_seed(5), **kw)
    b = T.train_transform(_images(), generator=torch.Generator().manual_seed(5), **kw)
    c = T.train_transform(_images(), generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_rotation_equals_bilinear_resize():
    imgs = _images()
    x = T.random_affine_resize(imgs, 48, 0.0, None)
    ref = F.interpolate(imgs.unsqueeze(1).float() / 255, size=(48, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, ref)
    # A zero-angle affine resample is the same bilinear resize (so rotation and resize are one op),
    # except on the outermost pixel ring, where it blends with the zero fill of RandomRotation
    # instead of clamping (MNIST's 4-pixel black border makes that ring 0 either way).
    theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).expand(8, 2, 3)
    grid = F.affine_grid(theta, [8, 1, 48, 48], align_corners=False)
    resampled = F.grid_sample(imgs.unsqueeze(1).float() / 255, grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resampled[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_matches_rot90():
    # With max_degrees=90 and a draw at the edge we can't force the angle; test the geometry with
    # the affine math directly: a 90° rotation of a square image is torch.rot90.
    img = _images(1)
    angle = torch.tensor([math.pi / 2])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(1)], 1), torch.stack([sin, cos, torch.zeros(1)], 1)], 1)
    grid = F.affine_grid(theta, [1, 1, 28, 28], align_corners=False)
    out = F.grid_sample(img.unsqueeze(1).float(), grid, mode="bilinear", align_corners=False)
    assert torch.allclose(out, torch.rot90(img.unsqueeze(1).float(), 1, dims=(2, 3)), atol=1e-3) or torch.allclose(
        out, torch.rot90(img.unsqueeze(1).float(), -1, dims=(2, 3)), atol=1e-3)


def test_jitter_factors_stay_in_range():
    x = torch.full((1000, 1, 4, 4), 0.5)
    g = torch.Generator().manual_seed(0)
    out = T.color_jitter(x, 0.2, 0.0, g)
    factors = out[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6
    assert factors.std() > 0.05  # really random


def test_eval_transform_is_resize_and_normalise():
    imgs = _images()
    x = T.eval_transform(imgs, size=48, channels=1, mean=0.5, std=0.25)
    ref = (F.interpolate(imgs.unsqueeze(1).float() / 255, size=(48, 48), mode="bilinear", align_corners=False) - 0.5) / 0.25
    torch.testing.assert_close(x, ref)


# -- crop / shift / flip for folders and Fashion-MNIST (transforms.augment) -------------------


def test_augment_without_crop_shift_flip_is_the_eval_transform():
    x = _images()
    plain = T.augment(x, size=28, channels=1, mean=0.5, std=0.5)
    assert torch.equal(plain, T.eval_transform(x, size=28, channels=1, mean=0.5, std=0.5))
    assert torch.equal(T.eval_transform_any(x, size=40, channels=3, mean=0.2, std=0.3),
                       T.eval_transform(x, size=40, channels=3, mean=0.2, std=0.3))


def test_hflip_mirrors_about_half_of_the_images_exactly():
    x = _images(64)
    out = T.random_crop_flip_rotate(x, 28, hflip=True, generator=torch.Generator().manual_seed(3))
    ref = x.unsqueeze(1).float() / 255
    same = [(o - r).abs().max().item() < 1e-5 for o, r in zip(out, ref)]
    mirrored = [(o - r.flip(-1)).abs().max().item() < 1e-5 for o, r in zip(out, ref)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48  # p = 1/2 per image


def test_translate_shifts_by_whole_pixels_within_the_bound():
    # A single bright pixel moves by at most ±translate·side in each direction.
    x = torch.zeros(32, 28, 28, dtype=torch.uint8)
    x[:, 14, 14] = 255
    out = T.random_crop_flip_rotate(x, 28, translate=0.1, generator=torch.Generator().manual_seed(0))
    ys, xs = [], []
    for o in out[:, 0]:
        weight = o.sum()
        assert weight > 0.5  # the pixel stays inside (a bilinear spread of one pixel's mass)
        ys.append(float((o.sum(1) * torch.arange(28)).sum() / weight))
        xs.append(float((o.sum(0) * torch.arange(28)).sum() / weight))
    assert max(abs(v - 14) for v in ys + xs) <= 0.1 * 28 + 1e-4
    assert len({round(v, 3) for v in xs}) > 10  # really random


def test_random_resized_crop_zooms_in_and_keeps_channels():
    # An RGB folder batch (B, C, H, W): channels kept; a crop of area s shows a window of ~sqrt(s) of the side.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = T.augment(x, size=32, channels=3, mean=0.5, std=0.5, crop_scale=0.25, generator=torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 32, 32) and out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    again = T.augment(x, size=32, channels=3, mean=0.5, std=0.5, crop_scale=0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    # A horizontal ramp: a crop spans a narrower range of values than the whole image (zoom).
    ramp = torch.arange(64, dtype=torch.float32).mul(4).to(torch.uint8).expand(8, 64, 64).contiguous()
    crop = T.random_crop_flip_rotate(ramp, 64, crop_scale=0.25, generator=torch.Generator().manual_seed(2))
    spans = crop[:, 0, 32].amax(-1) - crop[:, 0, 32].amin(-1)
    assert (spans < 0.95).all() and (spans > 0.3).all()
