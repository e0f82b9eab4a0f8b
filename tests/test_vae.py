"""The VAE family and the "vae" task: shapes, the ELBO terms against a hand computation
(Kingma & Welling 2014, appendix B: closed-form Gaussian KL; Bernoulli likelihood), the plain
autoencoder, and a tiny run whose loss falls and that writes the four pictures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from duboko import config as C
from duboko import registry
from duboko.errors import DubokoError
from duboko.models.vae import bernoulli_nll, gaussian_kl

TINY_MODEL = ["model.base_channels=8", "model.groups=4"]


def test_shapes_and_latent_side():
    vae = registry.create_model("vae-mnist")
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    logits, mean, logvar = vae(x)
    assert logits.shape == (5, 1, 28, 28)
    assert mean.shape == logvar.shape == (5, 4, 7, 7) and vae.latent_shape == (4, 7, 7)
    assert vae.decode(mean).shape == (5, 1, 28, 28) and vae.decode(mean).abs().max() <= 1
    two = registry.create_model("vae-mnist", channel_mults=[1, 2], latent_channels=2)
    assert two(x)[1].shape == (5, 2, 14, 14)
    with pytest.raises(DubokoError, match="image_size must be divisible by 4"):
        registry.create_model("vae-mnist", image_size=30)


def test_elbo_terms_against_a_hand_computation():
    """KL and -log p(x|z) computed element by element with math (no torch functions)."""
    mean = torch.tensor([[0.5, -1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(0.25), math.log(4.0)]])
    hand_kl = sum(0.5 * (s2 + m * m - 1 - math.log(s2)) for m, s2 in ((0.5, 1.0), (-1.0, 0.25), (0.0, 4.0)))
    assert float(gaussian_kl(mean, logvar)) == pytest.approx(hand_kl, rel=1e-6)
    assert float(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max()) == 0.0  # q = prior: KL 0

    x = torch.tensor([[[[-1.0, 1.0], [0.0, 0.5]]]])  # intensities 0, 1, 0.5, 0.75
    logits = torch.tensor([[[[0.3, -2.0], [1.0, 0.0]]]])
    hand_nll = 0.0
    for v, l in zip([0.0, 1.0, 0.5, 0.75], [0.3, -2.0, 1.0, 0.0]):
        p = 1 / (1 + math.exp(-l))
        hand_nll -= v * math.log(p) + (1 - v) * math.log(1 - p)
    assert float(bernoulli_nll(logits, x)) == pytest.approx(hand_nll, rel=1e-6)


def test_loss_terms_weighting_and_plain_autoencoder():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    vae = registry.create_model("vae-mnist", base_channels=8, groups=4, kl_weight=0.5).eval()
    terms = vae.loss_terms(x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(terms["loss"], terms["nll"] + 0.5 * terms["kl"])
    assert torch.allclose(terms["elbo"], -(terms["nll"] + terms["kl"]))  # the true bound, whatever the weight
    # The reparameterisation: z = μ + σ ε with the generator's ε.
    mean, logvar = vae.encode(x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    z = vae.reparameterise(mean, logvar, torch.Generator().manual_seed(3))
    assert torch.allclose(z, mean + (0.5 * logvar).exp() * eps)
    ae = registry.create_model("ae-mnist", base_channels=8, groups=4).eval()
    m2, lv2 = ae.encode(x)
    assert torch.equal(ae.reparameterise(m2, lv2), m2)  # kl_weight 0: deterministic, z = μ
    t2 = ae.loss_terms(x)
    assert torch.allclose(t2["loss"], t2["nll"])
    with pytest.raises(DubokoError, match="kl_weight must be >= 0"):
        registry.create_model("vae-mnist", kl_weight=-1.0)


def test_tiny_vae_run_loss_falls_and_writes_the_pictures(tmp_path):
    from duboko.train.engine import fit

    torch.manual_seed(0)
    cfg = C.resolve("mnist-vae", TINY_MODEL + [
        "data.limit_train=300", "data.val_size=50", "data.limit_test=100", "data.eval_batch_size=50",
        "data.grid_rows=1", "train.epochs=3", "train.batch_size=25", "train.warmup_steps=0", "train.num_threads=1",
    ])
    metrics = fit(cfg, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    rows = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    losses = [float(r[rows[0].index("train_loss")]) for r in rows[1:]]
    assert losses[-1] < 0.8 * losses[0], losses
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("test_elbo", "test_recon_nll", "test_kl", "test_recon_mse"):
        assert key in saved and math.isfinite(saved[key])
    assert saved["test_elbo"] == pytest.approx(-(saved["test_recon_nll"] + saved["test_kl"]), rel=1e-6)
    assert saved["test_count"] == 100 and metrics["latent_shape"] == [4, 7, 7]
    for name in ("reconstructions.png", "prior_samples.png", "interpolation.png", "latent_map.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "samples" / "epoch_003.png").is_file()
