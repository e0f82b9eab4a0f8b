"""Task "vae": train a variational autoencoder (`duboko.models.vae`) on MNIST.

The loss is the negative ELBO with a weighted KL term, recon + kl_weight · KL (Kingma & Welling
2014; a plain autoencoder for kl_weight = 0), divided by the pixel count so that the learning
rate does not depend on the image size. Metrics are per image, in nats: `elbo` (always the true
bound, KL weight 1), `recon_nll` (-log p(x|z), Bernoulli per pixel), `kl`, and `recon_mse` (mean
squared error of the reconstruction in [-1, 1]).

The final metrics are on the MNIST test set (all 10,000 images; `test_elbo`, `test_recon_nll`,
`test_kl`, `test_recon_mse`), and four pictures go into the run folder:
reconstructions.png (originals above their reconstructions), prior_samples.png (decoded
z ~ N(0, I)), interpolation.png (decoded straight lines between the latent means of test
images) and latent_map.png (the latent means of test images projected on their first two
principal components, coloured by digit).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko.data import mnist
from duboko.data.batching import batch_slice, epoch_permutation, num_batches, rank_slice
from duboko.config import require_at_least
from duboko.seeding import generator
from duboko.tasks import Evaluation, StepOutput, Task, register_task

METRICS = ("loss", "elbo", "recon_nll", "kl", "recon_mse")


@dataclass
class VAEDataConfig:
    dataset: str = "mnist"  # the data set (mnist)
    data_dir: str = ""  # folder with the MNIST IDX files ("" searches $DUBOKO_DATA, the bundled copy, the cache)
    limit_train: int = 0  # use only the first N training images (0: all), for quick runs and tests
    val_size: int = 1000  # training images held out (fixed split) for the validation ELBO
    limit_test: int = 0  # score only the first N test images at the end (0: all 10,000)
    eval_batch_size: int = 500  # batch size for validation and test
    eval_seed: int = 1234  # seed of the validation noise ε (fixed: epochs are comparable)
    grid_rows: int = 2  # rows of prior samples saved per epoch in samples/epoch_NNN.png (0: none)
    pictures: bool = True  # write the four pictures at the end


def images_of(x: torch.Tensor) -> torch.Tensor:
    """uint8 MNIST (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]."""
    return x.float().unsqueeze(1) / 127.5 - 1


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int, seed: int) -> dict[str, float]:
    """Mean per-image metrics (METRICS) of uint8 images x (N, 28, 28), with fixed noise."""
    g = generator(seed)
    sums = dict.fromkeys(METRICS, 0.0)
    pixels = x[0].numel()
    for i in range(0, len(x), batch_size):
        terms = model.loss_terms(images_of(x[i : i + batch_size]).to(device), generator=g)
        sums["loss"] += float(terms["loss"].sum()) / pixels
        sums["elbo"] += float(terms["elbo"].sum())
        sums["recon_nll"] += float(terms["nll"].sum())
        sums["kl"] += float(terms["kl"].sum())
        sums["recon_mse"] += float(terms["recon_mse"].sum())
    return {k: v / max(1, len(x)) for k, v in sums.items()}


@register_task
class VAETask(Task):
    name = "vae"
    data_config = VAEDataConfig
    shown_metric = ""
    datasets = ("mnist",)
    losses = ("bce",)  # the Bernoulli reconstruction term (plus the weighted KL)

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        require_at_least("data", config.data, 0, "limit_train", "val_size", "limit_test", "grid_rows")
        require_at_least("data", config.data, 1, "eval_batch_size")

    def setup(self, run_dir: Path | None = None) -> None:
        self._data: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._data is None:
            cfg = self.config.data
            x, y = mnist.load_split("train", cfg.data_dir or None, limit=cfg.limit_train)
            (train_x, train_y), (val_x, val_y) = mnist.hold_out_validation(x, y, min(cfg.val_size, len(x) // 5))
            self._data = {"train_x": train_x.to(self.device), "train_y": train_y, "val_x": val_x, "val_y": val_y}
        return self._data

    # -- training ------------------------------------------------------------------------------
    def num_train_batches(self) -> int:
        return num_batches(len(self._load()["train_x"]), self.config.train.batch_size, self.world_size)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        data, tcfg = self._load(), self.config.train
        perm = epoch_permutation(len(data["train_x"]), tcfg.seed, epoch).to(self.device)
        for i in range(start, self.num_train_batches()):
            idx = batch_slice(perm, i, tcfg.batch_size)
            g = generator(tcfg.seed, epoch, i)  # the reparameterisation noise: a pure function of (seed, epoch, i)
            x = images_of(data["train_x"][idx])  # (B, 1, 28, 28)
            eps = torch.randn((len(idx), *self._latent_shape(x)), generator=g).to(self.device)
            yield {"x": rank_slice(x, self.rank, self.world_size), "eps": rank_slice(eps, self.rank, self.world_size)}

    def _latent_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        m = self.config.model
        levels = len(m.get("channel_mults", [1, 2, 4]))
        side = x.shape[-1] // 2 ** (levels - 1)
        return (int(m.get("latent_channels", 4)), side, side)

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x = batch["x"]
        if self.config.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mean, logvar = model.encode(x)
        # z = μ + σ ε with the batch's own ε (resume-exact); the mean alone for an autoencoder.
        z = mean if model.config.kl_weight == 0 else mean + (0.5 * logvar).exp() * batch["eps"].to(mean.dtype)
        from duboko.models.vae import bernoulli_nll, gaussian_kl

        nll = bernoulli_nll(model.decode_logits(z), x)  # (B,)
        kl = gaussian_kl(mean.float(), logvar.float())  # (B,)
        per_image = nll + model.config.kl_weight * kl
        pixels = x[0].numel()
        loss = per_image.mean() / pixels
        n = x.shape[0]
        return StepOutput(loss, {"loss_sum": loss.detach() * n, "count": float(n),
                                 "elbo": -(nll + kl).detach().sum(), "kl": kl.detach().sum()})

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        model.eval()
        cfg = self.config.data
        if split == "test":
            x, _ = mnist.load_split("test", cfg.data_dir or None)
            x = x[: cfg.limit_test] if cfg.limit_test else x
        else:
            x = self._load()["val_x"]
        return score(model, x, self.device, cfg.eval_batch_size, cfg.eval_seed)

    # -- pictures ------------------------------------------------------------------------------
    def epoch_end(self, model: nn.Module, epoch: int, run_dir: Path | None) -> dict[str, float]:
        from duboko.evaluate.plots import save_grid

        if self.config.data.grid_rows <= 0 or run_dir is None:
            return {}
        model.eval()
        with torch.no_grad():
            z = torch.randn((10 * self.config.data.grid_rows, *model.latent_shape), generator=generator(self.config.data.eval_seed))
            save_grid(model.decode(z.to(self.device)).cpu(), Path(run_dir) / "samples" / f"epoch_{epoch:03d}.png", nrow=10)
        return {}

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        model.eval()
        cfg = self.config.data
        x, y = mnist.load_split("test", cfg.data_dir or None)
        if cfg.limit_test:
            x, y = x[: cfg.limit_test], y[: cfg.limit_test]
        metrics = {f"test_{k}": v for k, v in score(model, x, self.device, cfg.eval_batch_size, cfg.eval_seed).items()}
        metrics["test_count"] = len(x)
        metrics["kl_weight"] = float(model.config.kl_weight)
        metrics["latent_shape"] = list(model.latent_shape)
        if run_dir is not None and cfg.pictures:
            metrics["pictures"] = write_pictures(model, x, y, Path(run_dir), self.device, cfg.eval_seed)
        lines = [f"{k} = {v:.4f}" if isinstance(v, float) else f"{k} = {v}" for k, v in metrics.items()]
        report = ("VAE on the MNIST test set (" + self.config.recipe + "; per image, nats; ELBO = -(recon_nll + kl))\n"
                  + "\n".join(lines) + "\n")
        return Evaluation(metrics, report)


@torch.no_grad()
def write_pictures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, run_dir: Path, device: torch.device,
                   seed: int) -> list[str]:
    """The four pictures of a trained VAE from uint8 test images x (N, 28, 28), labels y (N,)."""
    from duboko.evaluate.plots import figure, save_grid

    names = []
    # Reconstructions: 10 originals (one per digit) above their reconstructions from the mean.
    first = [int((y == d).nonzero()[0]) for d in range(10) if (y == d).any()]
    idx = torch.tensor(first + list(range(20, 40)))[:30]
    orig = images_of(x[idx]).to(device)
    mean, _ = model.encode(orig)
    recon = model.decode(mean).cpu()
    rows = torch.cat([orig.cpu()[:10], recon[:10], orig.cpu()[10:20], recon[10:20]])
    save_grid(rows, run_dir / "reconstructions.png", nrow=10)
    names.append("reconstructions.png")
    # Prior samples: decoded z ~ N(0, I).
    z = torch.randn((64, *model.latent_shape), generator=generator(seed))
    save_grid(model.decode(z.to(device)).cpu(), run_dir / "prior_samples.png", nrow=8)
    names.append("prior_samples.png")
    # Interpolation: 5 pairs of test digits, 10 steps along the line between their latent means.
    pairs = [(first[a], first[b]) for a, b in ((0, 1), (3, 8), (4, 9), (1, 7), (2, 5)) if max(a, b) < len(first)]
    strips = []
    for a, b in pairs:
        ma, _ = model.encode(images_of(x[a : a + 1]).to(device))
        mb, _ = model.encode(images_of(x[b : b + 1]).to(device))
        w = torch.linspace(0, 1, 10, device=device).view(-1, 1, 1, 1)
        strips.append(model.decode((1 - w) * ma + w * mb).cpu())
    save_grid(torch.cat(strips), run_dir / "interpolation.png", nrow=10)
    names.append("interpolation.png")
    # Latent map: the means of up to 2000 test images on their first two principal components.
    n = min(2000, len(x))
    means = torch.cat([model.encode(images_of(x[i : i + 500]).to(device))[0].flatten(1).float().cpu()
                       for i in range(0, n, 500)])
    centred = means - means.mean(0)
    if means.shape[1] > 2:
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        coords = centred @ v[:2].T  # (n, 2)
    else:
        coords = centred
    with figure(run_dir / "latent_map.png", size=(6.0, 5.2), title="VAE latent means (first 2 principal components)") as (fig, axes):
        ax = axes[0][0]
        points = ax.scatter(coords[:, 0].numpy(), coords[:, 1].numpy(), c=y[:n].numpy(), cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
        fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    names.append("latent_map.png")
    return names
