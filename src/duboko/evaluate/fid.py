"""Fréchet distance between feature distributions (Heusel et al. 2017, "GANs trained by a two
time-scale update rule", eq. 6), on the features of a project-trained MNIST classifier.

    FD = ||μ_1 - μ_2||² + Tr(Σ_1 + Σ_2 - 2 (Σ_1 Σ_2)^{1/2})

FID proper uses Inception-v3 features of natural images; `fd_mnist` uses the 64-wide penultimate
layer of `mnist-scorer` (`duboko.models.scorer`), whose weights ship in
`duboko/data/bundled/scorer/`. Like FID it is biased upwards for few samples, so compare values
only at the same sample count: the task reports the value for real held-out MNIST images (the
floor) and for pure noise beside the value for generated samples.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from duboko.errors import DubokoError
from duboko.io import load_tensors, read_json

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the scorer's input normalisation (the classifier task's)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), in float64."""
    f = features.double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise DubokoError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """FD between N(μ1, Σ1) and N(μ2, Σ2). Tr((Σ1 Σ2)^{1/2}) is computed as Σ √λ_i of the
    symmetric PSD matrix Σ1^{1/2} Σ2 Σ1^{1/2} (same eigenvalues as Σ1 Σ2), which avoids the
    complex parts a general matrix square root produces for near-singular covariances."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    s1 = _sqrt_psd(sigma1)
    inner = s1 @ sigma2 @ s1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ---------------------------------------------------------------------------------------------
# The scorer classifier.


def scorer_dir() -> Path:
    """Where the scorer's weights are: $DUBOKO_SCORER_DIR, else the bundled copy."""
    env = os.environ.get("DUBOKO_SCORER_DIR")
    return Path(env) if env else Path(str(resources.files("duboko") / "data" / "bundled" / "scorer"))


def load_scorer(device: torch.device | str = "cpu", folder: str | os.PathLike | None = None) -> torch.nn.Module:
    """The MNIST scorer (eval mode) from a folder with model.safetensors and config.json (a run
    folder of `duboko train mnist-scorer` works too)."""
    from duboko import registry

    folder = Path(folder) if folder else scorer_dir()
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config.is_file():
        raise DubokoError(
            f"the MNIST scorer is missing in {folder} (needs model.safetensors and config.json); train it with "
            "`duboko train mnist-scorer --out DIR` and copy those two files there, or set $DUBOKO_SCORER_DIR=DIR"
        )
    cfg = dict(read_json(config)["model"])
    model = registry.build_model(cfg.pop("name"), cfg)
    try:
        model.load_state_dict(load_tensors(weights))
    except RuntimeError as exc:
        raise DubokoError(f"{weights} does not fit the scorer model: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval()


def scorer_inputs(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 1, 28, 28) (diffusion's range) -> the scorer's normalised input."""
    x01 = ((images.float() + 1) / 2).clamp(0, 1)
    return (x01 - MNIST_MEAN) / MNIST_STD


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 MNIST (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1]."""
    return images.float().unsqueeze(1) / 127.5 - 1


@torch.no_grad()
def score_images(scorer: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (N, 1, 28, 28) -> (features (N, D), predicted digits (N,)), on CPU."""
    device = next(scorer.parameters()).device
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        x = scorer_inputs(images[i : i + batch_size].to(device))
        f = scorer.features(x)
        feats.append(f.cpu())
        preds.append(scorer.fc2(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)
