"""Attacks (duboko.security.attacks): the threat model's invariants, determinism, relative
strength, and a cross-check of FGSM and PGD against IBM ART on the same model and inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duboko.data import mnist
from duboko.errors import DubokoError
from duboko.security.attacks import (
    AttackConfig, PixelModel, apgd_checkpoints, attack, dlr_loss, margin_loss, project, random_start,
)

MEAN, STD = 0.1307, 0.3081


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


@pytest.fixture(scope="module")
def tiny():
    """An MLP 784→64→10 trained for a few seconds on 2,000 MNIST images, wrapped with its
    normalisation: (PixelModel, test pixels (1000, 1, 28, 28) in [0, 1], labels)."""
    torch.manual_seed(0)
    images, labels = mnist.load_split("train", limit=2000)
    test_images, test_labels = mnist.load_split("test", limit=1000)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    model = PixelModel(net, lambda p: (p - MEAN) / STD)
    x = images.unsqueeze(1).float() / 255
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(8):
        for i in range(0, len(x), 100):
            loss = F.cross_entropy(model(x[i : i + 100]), labels[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, test_images.unsqueeze(1).float() / 255, test_labels


@pytest.mark.parametrize("method", ["fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_perturbation_stays_in_the_ball_and_the_pixel_range(tiny, method, norm, eps):
    model, x, y = tiny
    x, y = x[:64], y[:64]
    adv = attack(model, x, y, AttackConfig(method=method, eps=eps, norm=norm, steps=5, restarts=2))
    assert adv.shape == x.shape
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-4
    assert delta.abs().sum() > 0  # it moved
    assert _accuracy(model, adv, y) < _accuracy(model, x, y)


@pytest.mark.parametrize("method", ["pgd", "apgd-ce"])
def test_deterministic_under_a_seed(tiny, method):
    model, x, y = tiny
    x, y = x[:32], y[:32]
    cfg = AttackConfig(method=method, eps=0.1, steps=4, restarts=2, seed=3)
    a, b = attack(model, x, y, cfg), attack(model, x, y, cfg)
    assert torch.equal(a, b)
    other = attack(model, x, y, dataclasses.replace(cfg, seed=4))
    assert not torch.equal(a, other)  # the random start follows the seed


def test_parameter_gradients_are_left_alone(tiny):
    model, x, y = tiny
    for p in model.parameters():
        p.grad = None
    attack(model, x[:8], y[:8], AttackConfig(method="pgd", eps=0.1, steps=2))
    assert all(p.grad is None for p in model.parameters())


def test_stronger_attacks_are_not_weaker(tiny):
    """PGD ≥ FGSM, more restarts ≥ fewer, and APGD-CE ≥ PGD at the same budget (on 500 images)."""
    model, x, y = tiny
    x, y = x[:500], y[:500]
    eps = 0.1
    acc = {
        "fgsm": _accuracy(model, attack(model, x, y, AttackConfig(method="fgsm", eps=eps)), y),
        "pgd": _accuracy(model, attack(model, x, y, AttackConfig(method="pgd", eps=eps, steps=20)), y),
        "pgd3": _accuracy(model, attack(model, x, y, AttackConfig(method="pgd", eps=eps, steps=20, restarts=3)), y),
        "apgd": _accuracy(model, attack(model, x, y, AttackConfig(method="apgd-ce", eps=eps, steps=20)), y),
    }
    assert acc["pgd"] <= acc["fgsm"]
    assert acc["pgd3"] <= acc["pgd"]
    assert acc["apgd"] <= acc["pgd"] + 0.004  # not weaker (2 images of slack)
    assert acc["pgd"] < 0.5 * _accuracy(model, x, y)


def test_eps_zero_changes_nothing(tiny):
    model, x, y = tiny
    for method in ("fgsm", "pgd", "apgd-ce"):
        assert torch.equal(attack(model, x[:16], y[:16], AttackConfig(method=method, eps=0.0, steps=3)), x[:16])


def test_losses():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([1.0 - 3.0, 5.0 - 2.0]))
    # DLR is invariant to shifting and (positively) scaling the logits (Croce & Hein 2020, eq. 6).
    assert torch.allclose(dlr_loss(logits, y), dlr_loss(7 * logits + 2, y))
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-(3 - 1) / (3 - 0), -(2 - 5) / (5 - 1)]))


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, Section 3.2)
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_projection_and_random_start():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 4, 4, generator=gen)
    far = x + 10 * torch.randn(x.shape, generator=gen)
    p = project(far, x, 0.5, "l2")
    assert (p - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-6 and p.min() >= 0 and p.max() <= 1
    s = random_start(x, 0.2, "linf", gen)
    assert (s - x).abs().max() <= 0.2 + 1e-7 and s.min() >= 0 and s.max() <= 1


def test_bad_configs_name_the_range():
    with pytest.raises(DubokoError, match=r"eps must be a number in \[0, 1\]"):
        AttackConfig(eps=1.5).check()
    with pytest.raises(DubokoError, match="steps must be an integer in"):
        AttackConfig(steps=0).check()
    with pytest.raises(DubokoError, match="restarts must be an integer in"):
        AttackConfig(restarts=1000).check()
    with pytest.raises(DubokoError, match="unknown attack method"):
        AttackConfig(method="deepfool").check()
    with pytest.raises(DubokoError, match="attack inputs must be pixel images"):
        attack(nn.Flatten(), torch.full((1, 4), 2.0), torch.zeros(1, dtype=torch.long), AttackConfig())
    two = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(DubokoError, match=">= 3 classes"):
        attack(two, torch.rand(2, 4), torch.zeros(2, dtype=torch.long), AttackConfig(method="apgd-dlr", steps=2))


# -- IBM ART (adversarial-robustness-toolbox): the reference implementation --------------------
def _art_classifier(model):
    art = pytest.importorskip("art", reason="adversarial-robustness-toolbox is not installed (pip install duboko[test])")
    from art.estimators.classification import PyTorchClassifier

    del art
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                             clip_values=(0.0, 1.0), device_type="cpu")


def test_fgsm_equals_art(tiny):
    model, x, y = tiny
    classifier = _art_classifier(model)
    from art.attacks.evasion import FastGradientMethod

    eps = 0.1
    ours = attack(model, x, y, AttackConfig(method="fgsm", eps=eps)).numpy()
    theirs = FastGradientMethod(classifier, norm=np.inf, eps=eps, num_random_init=0, batch_size=500).generate(
        x.numpy(), y=y.numpy())
    assert np.abs(ours - theirs).max() <= 1e-6  # perturbations equal to float tolerance
    assert abs(_accuracy(model, torch.from_numpy(theirs), y) - _accuracy(model, torch.from_numpy(ours), y)) == 0


def test_pgd_robust_accuracy_matches_art_on_1000_images(tiny):
    model, x, y = tiny
    classifier = _art_classifier(model)
    from art.attacks.evasion import ProjectedGradientDescent

    eps, steps, alpha = 0.1, 10, 0.025
    ours = attack(model, x, y, AttackConfig(method="pgd", eps=eps, steps=steps, step_size=alpha, random_start=False))
    theirs = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                      num_random_init=0, batch_size=500, verbose=False).generate(x.numpy(), y=y.numpy())
    ours_acc, art_acc = _accuracy(model, ours, y), _accuracy(model, torch.from_numpy(theirs), y)
    assert len(x) == 1000
    assert abs(ours_acc - art_acc) <= 0.005, (ours_acc, art_acc)
