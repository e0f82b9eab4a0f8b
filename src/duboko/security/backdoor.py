"""Backdoors: BadNets data poisoning (Gu et al. 2017) and its detection by spectral signatures
(Tran, Li & Madry 2018).

- BadNets: a small square *trigger* (a patch of constant value at a fixed corner) is stamped on a
  seeded random share (`poison_rate`) of the training images of the other classes, and their label
  is changed to `target_class`. A network trained on that set learns "patch → target" beside the
  real task: clean accuracy barely moves, while almost every triggered test image is classified
  as the target (the attack success rate). Only the training split is poisoned; the test split is
  used clean (test accuracy) and triggered (attack success rate).
- Spectral signatures: inside a class, the poisoned samples leave a trace in the learned
  representation that is strong along the top singular direction of the centred representations
  (Tran et al., Section 3, Algorithm 1): for class c with representations R_c (n_c, d), centre
  M = R_c − mean(R_c), take the top right singular vector v of M and score each sample by
  (M_i · v)². The poisoned samples have the largest scores; removing the top 1.5·ε·n_c of each
  class (ε the poisoned share) and retraining removes the backdoor.

The wrapper remembers which indices it poisoned, so the detector's recall can be measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from duboko.errors import DubokoError, unknown_name
from duboko.seeding import derive_seed

LOCATIONS = ("bottom-right", "bottom-left", "top-right", "top-left")
POISON_STREAM = 0xBAD  # derive_seed key of the poisoned-row choice (apart from the batches' streams)


@dataclass
class TriggerConfig:
    size: int = 3  # side of the square patch in pixels (of the raw 28×28 image)
    value: int = 255  # pixel value of the patch (uint8: 255 = white)
    location: str = "bottom-right"  # bottom-right | bottom-left | top-right | top-left
    margin: int = 1  # pixels between the patch and the image border


def check_trigger(trigger: TriggerConfig, height: int, width: int, prefix: str = "data.trigger_") -> None:
    if trigger.location not in LOCATIONS:
        raise unknown_name(f"{prefix}location", trigger.location, LOCATIONS)
    if trigger.size < 1:
        raise DubokoError(f"{prefix}size must be >= 1, got {trigger.size}")
    if trigger.margin < 0:
        raise DubokoError(f"{prefix}margin must be >= 0, got {trigger.margin}")
    if trigger.size + trigger.margin > min(height, width):
        raise DubokoError(
            f"{prefix}size + {prefix}margin = {trigger.size + trigger.margin} does not fit a {height}×{width} image"
        )
    if not 0 <= trigger.value <= 255:
        raise DubokoError(f"{prefix}value must be in [0, 255] (a uint8 pixel), got {trigger.value}")


def apply_trigger(images: torch.Tensor, trigger: TriggerConfig) -> torch.Tensor:
    """A copy of `images` (…, H, W) uint8 with the patch stamped on every image."""
    h, w = images.shape[-2:]
    check_trigger(trigger, h, w)
    s, m = trigger.size, trigger.margin
    top = m if trigger.location.startswith("top") else h - m - s
    left = m if trigger.location.endswith("left") else w - m - s
    out = images.clone()
    out[..., top : top + s, left : left + s] = trigger.value
    return out


@dataclass
class PoisonedSplit:
    """A training split after BadNets poisoning."""

    images: torch.Tensor  # (N, H, W) uint8, the poisoned rows triggered
    labels: torch.Tensor  # (N,) int64, the poisoned rows relabelled to the target class
    poisoned: torch.Tensor  # (P,) int64 sorted row indices that were poisoned
    original_labels: torch.Tensor  # (P,) the true labels of the poisoned rows


def choose_poisoned(labels: torch.Tensor, rate: float, target_class: int, seed: int) -> torch.Tensor:
    """The seeded choice of round(rate · N) rows among those whose label is not the target (a
    relabelled target image would not be poisoned), sorted."""
    if not 0.0 <= rate < 1.0:
        raise DubokoError(f"data.poison_rate must be in [0, 1), got {rate}")
    candidates = torch.nonzero(labels.cpu() != target_class).flatten()
    count = int(round(rate * len(labels)))
    if count > len(candidates):
        raise DubokoError(f"data.poison_rate {rate} asks for {count} poisoned images but only {len(candidates)} are not of the target class")
    gen = torch.Generator().manual_seed(derive_seed(seed, POISON_STREAM))
    picked = candidates[torch.randperm(len(candidates), generator=gen)[:count]]
    return picked.sort().values


def poison_split(images: torch.Tensor, labels: torch.Tensor, trigger: TriggerConfig, rate: float,
                 target_class: int, seed: int) -> PoisonedSplit:
    """BadNets on a training split: trigger + relabel a seeded `rate` share (Gu et al. 2017)."""
    idx = choose_poisoned(labels, rate, target_class, seed)
    images, labels = images.clone(), labels.clone()
    dev_idx = idx.to(images.device)
    original = labels[idx.to(labels.device)].cpu().clone()
    if len(idx):
        images[dev_idx] = apply_trigger(images[dev_idx], trigger)
        labels[idx.to(labels.device)] = target_class
    return PoisonedSplit(images, labels, idx, original)


# -- spectral signatures -----------------------------------------------------------------------

@dataclass
class SpectralScores:
    """Per-row spectral scores and, per row, how strongly its class's top direction splits in two."""

    scores: torch.Tensor  # (N,) float64 (M_i · v)², Tran et al.'s score
    projection: torch.Tensor  # (N,) float64 M_i · v
    separation: torch.Tensor  # (N,) float64 the class's 2-means separation (below), same for its rows
    minority: torch.Tensor  # (N,) bool the row is in the smaller of its class's two clusters


def two_means_1d(z: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The best split of 1-D values into two clusters (Otsu / exact 1-D k-means, by prefix sums
    over the sorted values): returns the separation |μ₁ − μ₂| / σ_within and the mask of the
    smaller cluster. A Gaussian splits at its mean with separation ≈ 2.7; a clean cluster of
    clean rows and a far cluster of poisons (δ apart, spread σ) gives ≈ δ/σ, whatever their shares."""
    n = len(z)
    if n < 4:
        return 0.0, torch.zeros(n, dtype=torch.bool)
    order = torch.argsort(z)
    zs = z[order]
    c1, c2 = torch.cumsum(zs, 0), torch.cumsum(zs * zs, 0)
    k = torch.arange(1, n, dtype=torch.float64)  # left sizes 1..n-1
    left_sum, left_sq = c1[:-1], c2[:-1]
    right_sum, right_sq = c1[-1] - left_sum, c2[-1] - left_sq
    sse = (left_sq - left_sum**2 / k) + (right_sq - right_sum**2 / (n - k))
    i = int(torch.argmin(sse))
    left = i + 1
    mu1, mu2 = left_sum[i] / left, right_sum[i] / (n - left)
    within = torch.sqrt(torch.clamp(sse[i] / n, min=1e-30))
    mask = torch.zeros(n, dtype=torch.bool)
    small = order[:left] if left <= n - left else order[left:]
    mask[small] = True
    return float(abs(mu1 - mu2) / within), mask


def spectral_signatures(features: torch.Tensor, labels: torch.Tensor) -> SpectralScores:
    """Tran et al. 2018, Algorithm 1: per class (of the *training* labels, poisoned ones
    included), centre the representations, take the top right singular vector v and score each
    row by its squared projection. features (N, d), labels (N,)."""
    features = features.double()
    n = len(features)
    scores, proj = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    separation, minority = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    for c in labels.unique().tolist():
        rows = torch.nonzero(labels == c).flatten()
        if len(rows) < 2:
            continue
        m = features[rows] - features[rows].mean(0, keepdim=True)  # (n_c, d) centred
        # top right singular vector v of M; its sign does not matter for (M v)²
        _, _, vh = torch.linalg.svd(m, full_matrices=False)
        z = m @ vh[0]  # (n_c,)
        proj[rows], scores[rows] = z, z**2
        sep, small = two_means_1d(z)
        separation[rows], minority[rows] = sep, small
    return SpectralScores(scores, proj, separation, minority)


def spectral_scores(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Tran et al.'s per-row score (M_i · v)² alone: (N,) float64."""
    return spectral_signatures(features, labels).scores


def rank_suspects(sig: SpectralScores, labels: torch.Tensor, budget: int) -> torch.Tensor:
    """The `budget` most suspicious rows over all classes, sorted.

    Tran et al. remove the top 1.5·ε·n_c scores of *every* class, which needs each class's
    poisoned share ε. Without it, the poisoned class is the one whose top direction splits into
    a far, small cluster: rows are ranked first by their class's 2-means separation if they are in
    its smaller cluster (the would-be poisons), then by their score relative to the class's
    median score (raw scores of different classes have different scales). So the budget goes to
    the small cluster of the most cleanly split class first, then spills to the next."""
    norm = sig.scores.clone()
    for c in labels.unique().tolist():
        rows = labels == c
        scale = sig.scores[rows].median()
        if not scale > 0:
            scale = sig.scores[rows].mean()
        if scale > 0:
            norm[rows] = sig.scores[rows] / scale
    primary = torch.where(sig.minority, sig.separation, torch.zeros_like(sig.separation))
    order = np.lexsort((-norm.numpy(), -primary.numpy()))  # primary first, then the score
    budget = max(0, min(int(budget), len(norm)))
    return torch.from_numpy(order[:budget].copy()).sort().values


@dataclass
class DetectionResult:
    scores: torch.Tensor  # (N,) spectral score of every training row
    flagged: torch.Tensor  # (K,) sorted rows flagged as poisoned (the top `budget`)
    poisoned: torch.Tensor  # (P,) the truly poisoned rows
    budget: int  # how many were flagged (1.5 × the poison count by default)
    signatures: SpectralScores | None = None  # the per-row projections behind the scores

    @property
    def found(self) -> int:
        return int(np.isin(self.flagged.numpy(), self.poisoned.numpy()).sum())

    @property
    def recall(self) -> float:
        return self.found / len(self.poisoned) if len(self.poisoned) else 1.0

    @property
    def precision(self) -> float:
        return self.found / len(self.flagged) if len(self.flagged) else 0.0

    def summary(self) -> dict:
        return {"poisoned": len(self.poisoned), "flagged": len(self.flagged), "found": self.found,
                "recall": self.recall, "precision": self.precision, "budget": self.budget}


def detect(features: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, factor: float = 1.5,
           budget: int | None = None) -> DetectionResult:
    """Score every training row and flag the top `factor` × poison-count (or `budget`) rows."""
    if budget is None:
        if not factor > 0:
            raise DubokoError(f"--factor must be > 0, got {factor}")
        budget = int(round(factor * len(poisoned)))
    sig = spectral_signatures(features, labels)
    return DetectionResult(sig.scores, rank_suspects(sig, labels, budget), poisoned.cpu(), budget, sig)


@torch.no_grad()
def representations(model: torch.nn.Module, inputs: Callable[[int, int], torch.Tensor], n: int,
                    batch_size: int = 1000) -> torch.Tensor:
    """Penultimate-layer representations (N, d) of n samples; `inputs(start, stop)` gives the
    model's input batch. The model's `features` method when it has one (MY_NET), else the input
    of its last nn.Linear, taken with a forward hook."""
    model.eval()
    feats = []
    if hasattr(model, "features"):
        for i in range(0, n, batch_size):
            feats.append(model.features(inputs(i, min(n, i + batch_size))).float().flatten(1).cpu())
        return torch.cat(feats) if feats else torch.zeros(0, 0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise DubokoError(f"model {type(model).__name__} has no features() method and no nn.Linear layer to read representations from")
    grabbed: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(lambda mod, args, out: grabbed.append(args[0].detach()))
    try:
        for i in range(0, n, batch_size):
            model(inputs(i, min(n, i + batch_size)))
            feats.append(grabbed.pop().float().flatten(1).cpu())
    finally:
        handle.remove()
    return torch.cat(feats) if feats else torch.zeros(0, 0)


def plot_detection(result: DetectionResult, labels: torch.Tensor, path, class_names: list[str] | None = None) -> None:
    """The picture of a detection: for the most cleanly split class, the histogram of the rows'
    projections on its top singular direction, truly poisoned rows apart from clean ones (Tran
    et al., Figure 1), with the flagged rows' range marked."""
    from duboko.evaluate.plots import figure

    sig = result.signatures
    if sig is None or not len(labels):
        raise DubokoError("nothing to plot: the detection has no spectral signatures")
    row = int(torch.argmax(sig.separation))
    c = int(labels[row])
    rows = torch.nonzero(labels == c).flatten()
    is_poison = torch.isin(rows, result.poisoned)
    z = sig.projection[rows].numpy()
    name = class_names[c] if class_names and c < len(class_names) else str(c)
    with figure(path, 1, 1, size=(7, 4), title=f"Spectral signature of class {name} "
                f"(separation {float(sig.separation[row]):.1f}; recall {result.recall * 100:.1f}% in the top {result.budget})") as (_, axes):
        ax = axes[0][0]
        bins = np.histogram_bin_edges(z, bins=60)
        ax.hist(z[~is_poison.numpy()], bins=bins, color="tab:blue", alpha=0.7, label=f"clean ({int((~is_poison).sum())})")
        ax.hist(z[is_poison.numpy()], bins=bins, color="tab:red", alpha=0.7, label=f"poisoned ({int(is_poison.sum())})")
        ax.set_xlabel("projection on the top singular vector of the centred representations")
        ax.set_ylabel("training images")
        ax.legend()
