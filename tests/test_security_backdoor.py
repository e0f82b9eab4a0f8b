"""BadNets poisoning and spectral signatures (duboko.security.backdoor), on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duboko.errors import DubokoError
from duboko.security import backdoor as B


def test_trigger_is_stamped_where_asked():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    out = B.apply_trigger(images, B.TriggerConfig(size=3, value=200, location="bottom-right", margin=1))
    assert images.sum() == 0  # a copy
    assert (out[:, 24:27, 24:27] == 200).all() and int(out.sum()) == 2 * 9 * 200
    tl = B.apply_trigger(images, B.TriggerConfig(size=2, value=255, location="top-left", margin=0))
    assert (tl[:, :2, :2] == 255).all() and int((tl > 0).sum()) == 8
    tr = B.apply_trigger(images[0], B.TriggerConfig(size=4, location="top-right", margin=2))
    assert (tr[2:6, 22:26] == 255).all() and int((tr > 0).sum()) == 16


@pytest.mark.parametrize("trigger, message", [
    (B.TriggerConfig(location="middle"), "location"),
    (B.TriggerConfig(size=0), "size must be >= 1"),
    (B.TriggerConfig(size=28, margin=1), "does not fit"),
    (B.TriggerConfig(value=300), "value must be in"),
])
def test_bad_triggers_are_refused(trigger, message):
    with pytest.raises(DubokoError, match=message):
        B.apply_trigger(torch.zeros(1, 28, 28, dtype=torch.uint8), trigger)


def test_poisoning_is_seeded_counts_and_skips_the_target():
    labels = torch.arange(1000) % 10
    images = torch.zeros(1000, 28, 28, dtype=torch.uint8)
    a = B.poison_split(images, labels, B.TriggerConfig(), 0.05, target_class=3, seed=7)
    b = B.poison_split(images, labels, B.TriggerConfig(), 0.05, target_class=3, seed=7)
    c = B.poison_split(images, labels, B.TriggerConfig(), 0.05, target_class=3, seed=8)
    assert torch.equal(a.poisoned, b.poisoned) and not torch.equal(a.poisoned, c.poisoned)
    assert len(a.poisoned) == 50 and torch.equal(a.poisoned, a.poisoned.sort().values)
    assert (labels[a.poisoned] != 3).all() and torch.equal(a.original_labels, labels[a.poisoned])
    assert (a.labels[a.poisoned] == 3).all()
    clean = torch.ones(1000, dtype=torch.bool)
    clean[a.poisoned] = False
    assert torch.equal(a.labels[clean], labels[clean]) and a.images[clean].sum() == 0
    assert (a.images[a.poisoned][:, 24:27, 24:27] == 255).all()
    assert images.sum() == 0 and torch.equal(labels, torch.arange(1000) % 10)  # inputs untouched
    assert len(B.poison_split(images, labels, B.TriggerConfig(), 0.0, 3, 0).poisoned) == 0
    with pytest.raises(DubokoError, match="poison_rate"):
        B.choose_poisoned(labels, 1.5, 3, 0)
    with pytest.raises(DubokoError, match="only"):
        B.choose_poisoned(torch.zeros(10, dtype=torch.long), 0.5, 0, 0)


def test_spectral_scores_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 12))
    labels = rng.integers(0, 3, size=300)
    ours = B.spectral_scores(torch.from_numpy(feats), torch.from_numpy(labels)).numpy()
    for c in range(3):
        r = feats[labels == c]
        m = r - r.mean(0)
        # the top right singular vector as the top eigenvector of the covariance Mᵀ M
        w, v = np.linalg.eigh(m.T @ m)
        np.testing.assert_allclose(ours[labels == c], (m @ v[:, -1]) ** 2, rtol=1e-8)


def synthetic(n_per_class=400, d=32, poison=60, target=0, shift=10.0, seed=0):
    """10 Gaussian classes; `poison` rows of other classes moved to the target's label with an
    extra feature direction (what a trigger adds to a learned representation)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=5.0, size=(10, d))
    labels = np.repeat(np.arange(10), n_per_class)
    feats = means[labels] + rng.normal(size=(len(labels), d))
    candidates = np.nonzero(labels != target)[0]
    poisoned = np.sort(rng.choice(candidates, poison, replace=False))
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    feats[poisoned] = means[target] + rng.normal(size=(poison, d)) + shift * direction
    labels[poisoned] = target
    return torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(poisoned)


def test_detect_finds_the_poisons_in_synthetic_features():
    feats, labels, poisoned = synthetic()
    result = B.detect(feats, labels, poisoned, factor=1.5)
    assert result.budget == 90 and len(result.flagged) == 90
    assert result.recall >= 0.95
    summary = result.summary()
    assert summary["found"] == result.found and 0 < summary["precision"] <= 1
    # without a poison direction, the flagged rows are chance
    clean_feats, clean_labels, fake = synthetic(shift=0.0)
    assert B.detect(clean_feats, clean_labels, fake).recall < 0.5


def test_two_means_separates_a_far_small_cluster():
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(20000, generator=gen, dtype=torch.float64)
    sep, small = B.two_means_1d(gauss)
    assert 2.5 < sep < 2.9  # a Gaussian split at its mean: (2·0.798) / 0.603 ≈ 2.65
    assert 0.45 < small.double().mean() <= 0.5
    mixed = torch.cat([torch.randn(900, generator=gen, dtype=torch.float64),
                       8.0 + torch.randn(100, generator=gen, dtype=torch.float64)])
    sep, small = B.two_means_1d(mixed)
    assert 7.0 < sep < 9.0 and small.nonzero().flatten().tolist() == list(range(900, 1000))


def test_rank_suspects_picks_the_split_class_not_the_loud_one():
    gen = torch.Generator().manual_seed(1)
    # class 1: unimodal with 100× the scale; class 0: a small far cluster (rows 0..19)
    feats = torch.cat([torch.randn(200, 4, generator=gen), 100 * torch.randn(200, 4, generator=gen)]).double()
    feats[:20, 0] += 10.0
    labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    sig = B.spectral_signatures(feats, labels)
    assert sig.separation[0] > sig.separation[200]
    assert B.rank_suspects(sig, labels, 20).tolist() == list(range(20))
    assert len(B.rank_suspects(sig, labels, 1000)) == 400


def test_representations_use_features_or_the_last_linear():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x = torch.randn(7, 6)
    got = B.representations(mlp, lambda a, b: x[a:b], 7, batch_size=3)
    assert torch.allclose(got, torch.relu(mlp[1](x)))

    class WithFeatures(torch.nn.Module):
        def features(self, x):
            return x * 2

    assert torch.equal(B.representations(WithFeatures(), lambda a, b: x[a:b], 7, batch_size=4), x * 2)
    with pytest.raises(DubokoError, match="no features"):
        B.representations(torch.nn.ReLU(), lambda a, b: x[a:b], 7)
