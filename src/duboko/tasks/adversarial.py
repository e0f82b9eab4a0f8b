"""Adversarial training of an image classifier: "fast is better than free" (Wong, Rice & Kolter
2020), FGSM from a random start inside the loss.

Each training batch x (pixels in [0, 1]) gets, per image (Wong et al., Algorithm 3):
    δ ~ U(−ε, ε)^d;  δ ← clip_[−ε, ε](δ + α · sign(∇δ L(f(x + δ), y)));  loss = L(f(clip_[0,1](x + δ)), y)
with α = 1.25 ε (data.attack_alpha = 0). The engine back-propagates that loss as any other; the
learning-rate cycle is the engine's one-cycle schedule (Wong et al.'s cyclic rate: up, then down).

FGSM training can overfit catastrophically (its robustness to PGD collapses within an epoch while
FGSM accuracy rises; Wong et al., Section 5.2). After each epoch the task measures PGD accuracy on
a fixed slice of the training images (`pgd_monitor` in history.csv) and keeps the best epoch's
weights; when the last epoch is far below the best, the run ends with the best weights (early
stopping, as Wong et al.) and metrics.json says so (`early_stopped_epoch`). The best weights are held
in memory: a resumed run compares only the epochs since the resume.

End-of-run metrics: `test_accuracy` (clean, all test images), `robust_accuracy_pgd` under PGD with
data.final_pgd_steps × data.final_pgd_restarts at `robust_eps` on the first data.final_pgd_images
test images (`robust_images` says how many; `duboko attack` runs any other evaluation), and the
same for APGD-CE when data.final_apgd is on.

The attacks run in pixel space: the batches are un-normalised (x · std + mean) before the attack
and re-normalised by the model wrapper, so ε is in [0, 1] pixel units at data.image_size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duboko.errors import DubokoError
from duboko.io import atomic_write_text, save_tensors
from duboko.security.attacks import AttackConfig, PixelModel
from duboko.security.robustness import robust_correct
from duboko.seeding import generator
from duboko.tasks import Evaluation, StepOutput, register_task
from duboko.tasks.image_classification import ImageClassificationTask, ImageDataConfig

# Catastrophic overfitting (early stop): the last epoch's PGD monitor accuracy this far below the
# best epoch's (an absolute fraction) brings the best weights back.
COLLAPSE_DROP = 0.2


# -- the task ---------------------------------------------------------------------------------
@dataclass
class AdversarialDataConfig(ImageDataConfig):
    attack_eps: float = 0.3  # training and evaluation ε (L∞, pixel units in [0, 1])
    attack_alpha: float = 0.0  # FGSM step α; 0: 1.25 · ε (Wong et al.)
    # training ε rises linearly from 0 to attack_eps over this many optimizer steps (0: none), with α
    # scaled alike; a remedy tried against catastrophic overfitting (evaluation always uses attack_eps)
    attack_eps_warmup: int = 0
    monitor_images: int = 1000  # training images of the per-epoch PGD monitor (early stop); 0: none
    monitor_steps: int = 10  # PGD steps of the monitor
    final_pgd_steps: int = 50  # end-of-run PGD: steps
    final_pgd_restarts: int = 10  # end-of-run PGD: random restarts
    final_pgd_images: int = 1000  # end-of-run PGD on the first N test images (0: all 10,000)
    final_apgd: bool = True  # also APGD-CE and APGD-DLR at the end (same images, steps = final_pgd_steps, 1 restart)


@register_task
class AdversarialTask(ImageClassificationTask):
    name = "adversarial"
    data_config = AdversarialDataConfig

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        cfg = config.data
        if not (math.isfinite(cfg.attack_eps) and 0 < cfg.attack_eps <= 1):
            raise DubokoError(f"data.attack_eps must be in (0, 1] (L∞, pixel units), got {cfg.attack_eps!r}")
        if not (math.isfinite(cfg.attack_alpha) and 0 <= cfg.attack_alpha <= 1):
            raise DubokoError(f"data.attack_alpha must be in [0, 1] (0: 1.25 · attack_eps), got {cfg.attack_alpha!r}")
        for key, low, high in (("attack_eps_warmup", 0, 10**9), ("monitor_images", 0, 60_000), ("monitor_steps", 1, 1000), ("final_pgd_steps", 1, 10_000),
                               ("final_pgd_restarts", 1, 100), ("final_pgd_images", 0, 100_000)):
            value = getattr(cfg, key)
            if not (isinstance(value, int) and low <= value <= high):
                raise DubokoError(f"data.{key} must be an integer in [{low}, {high}], got {value!r}")

    def setup(self, run_dir: Path | None = None, splits: tuple[str, ...] = ("train", "test")) -> None:
        super().setup(run_dir, splits)
        self._best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (monitor accuracy, epoch, weights)
        self._last_monitor: float | None = None

    @property
    def alpha(self) -> float:
        cfg = self.config.data
        return cfg.attack_alpha if cfg.attack_alpha > 0 else 1.25 * cfg.attack_eps

    def _to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised batch (B, C, S, S) back to [0, 1] pixels (B, C, S, S)."""
        cfg = self.config.data
        return (x.float() * cfg.std + cfg.mean).clamp(0.0, 1.0)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.config.data
        return (pixels - cfg.mean) / cfg.std

    # -- loss: FGSM from a random start (Wong et al. 2020, Algorithm 3) ---------------------------
    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        # Each batch carries its own generator for δ, a pure function of (seed, epoch, batch):
        # a resumed run draws the same starts.
        # The global step index rides along for the ε warm-up (also a pure function of epoch and i).
        for i, (x, y) in enumerate(super().train_batches(epoch, start), start=start):
            step = epoch * self.num_train_batches() + i
            yield x, y, generator(self.config.train.seed, epoch, i, 7919, device=self.device), step

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y, gen, step = batch
        warmup = self.config.data.attack_eps_warmup
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        eps, alpha = self.config.data.attack_eps * ramp, self.alpha * ramp
        pixels = self._to_pixels(x)  # (b, C, S, S) in [0, 1]
        delta = (torch.rand(pixels.shape, generator=gen, device=pixels.device) * 2 - 1) * eps
        delta = ((pixels + delta).clamp(0, 1) - pixels).requires_grad_(True)
        inner = F.cross_entropy(model(self._normalise(pixels + delta)).float(), y)
        (grad,) = torch.autograd.grad(inner, delta)  # only δ's gradient; the parameters' stay untouched
        with torch.no_grad():
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            x_adv = (pixels + delta).clamp(0, 1)
        inputs = self._normalise(x_adv)
        if self.config.train.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = model(inputs)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.train.label_smoothing)
        with torch.no_grad():
            n = y.numel()
            # train_accuracy is the accuracy on the FGSM images the model trains on.
            stats = {"loss_sum": loss.detach() * n, "count": float(n), "accuracy": (logits.argmax(1) == y).sum()}
        return StepOutput(loss, stats)

    # -- the PGD monitor and early stop -------------------------------------------------------
    def _pgd_accuracy(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, restarts: int,
                      method: str = "pgd", seed: int = 0) -> float:
        # PGD's step: Madry et al.'s 2.5 · ε / steps; APGD sets its own (2ε, halved at checkpoints).
        cfg = AttackConfig(method=method, eps=self.config.data.attack_eps, norm="linf", steps=steps,
                           restarts=restarts, seed=seed)
        wrapped = PixelModel(model, self.preprocess)
        correct = robust_correct(wrapped, self.pixel_images(images), labels.to(self.device), cfg,
                                 batch_size=self.config.data.eval_batch_size)
        return correct.double().mean().item()

    def epoch_end(self, model: nn.Module, epoch: int, run_dir: Path | None) -> dict[str, float]:
        cfg = self.config.data
        if not cfg.monitor_images:
            return {}
        was_training = model.training
        model.eval()
        images, labels = self.splits["train"]
        acc = self._pgd_accuracy(model, images[: cfg.monitor_images], labels[: cfg.monitor_images], cfg.monitor_steps, 1)
        if was_training:
            model.train()
        self._last_monitor = acc
        if self._best is None or acc > self._best[0]:
            self._best = (acc, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"pgd_monitor": acc}

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        cfg = self.config.data
        extra: dict[str, Any] = {}
        best = self._best
        if best is not None and self._last_monitor is not None and best[0] - self._last_monitor > COLLAPSE_DROP:
            # Catastrophic overfitting: end with the best epoch's weights (and save them as the run's).
            model.load_state_dict(best[2])
            extra["early_stopped_epoch"] = best[1]
            if run_dir is not None:
                meta = {"model": self.config.model["name"], "model_config": json.dumps(self.config.model), "format": "duboko"}
                save_tensors(model.state_dict(), Path(run_dir) / "model.safetensors", metadata=meta)
        evaluation = super().final_metrics(model, run_dir, history)
        model.eval()
        images, labels = self.splits["test"]
        n = len(images) if cfg.final_pgd_images == 0 else min(cfg.final_pgd_images, len(images))
        steps, restarts = cfg.final_pgd_steps, cfg.final_pgd_restarts
        robust = self._pgd_accuracy(model, images[:n], labels[:n], steps, restarts)
        extra.update({"robust_accuracy_pgd": robust, "robust_eps": cfg.attack_eps, "robust_images": n,
                      "robust_pgd_steps": steps, "robust_pgd_restarts": restarts})
        lines = [f"PGD-{steps} × {restarts} restarts at eps {cfg.attack_eps:g} (L∞) on {n} test images: "
                 f"robust accuracy {robust:.2%}"]
        if cfg.final_apgd:
            for method in ("apgd-ce", "apgd-dlr"):
                value = self._pgd_accuracy(model, images[:n], labels[:n], steps, 1, method=method)
                extra[f"robust_accuracy_{method.replace('-', '_')}"] = value
                lines.append(f"{method.upper()}-{steps} at eps {cfg.attack_eps:g} on {n} test images: robust accuracy {value:.2%}")
        if "early_stopped_epoch" in extra:
            lines.append(f"early stop: the PGD monitor fell from {best[0]:.2%} (epoch {best[1]}) to {self._last_monitor:.2%}; "
                         f"the run ends with epoch {best[1]}'s weights")
        metrics = {**evaluation.metrics, **extra}
        report = evaluation.report + "\n" + "\n".join(lines) + "\n"
        if run_dir is not None:
            atomic_write_text(Path(run_dir) / "report.txt", report)
        return Evaluation(metrics, report)
