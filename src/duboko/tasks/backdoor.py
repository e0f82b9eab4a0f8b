"""Backdoored image classification: the image-classification task on a training split poisoned
by BadNets (Gu et al. 2017; `duboko.security.backdoor`), with the backdoor's metrics beside the
clean ones.

A seeded `data.poison_rate` share of the training images (of classes other than
`data.target_class`) gets the trigger patch and the target label; the test split stays clean.
Metrics: `test_accuracy` (clean test images) and `attack_success_rate` (triggered test images of
the other classes classified as the target). `duboko detect-backdoor RUN` scores the training
rows by spectral signatures (Tran et al. 2018) and can write the flagged rows to a JSON file;
`data.exclude = FILE` trains again without them (the rows are numbered as in the full, poisoned
training split, so the same file fits any run of the same data and seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.io import atomic_write_json, atomic_write_text, read_json
from duboko.security import backdoor as B
from duboko.tasks import Evaluation, register_task
from duboko.tasks.image_classification import ImageClassificationTask, ImageDataConfig

POISON_FILE = "poison.json"  # the run's poisoned and excluded rows (ground truth for detect-backdoor)
MAX_EXCLUDE_BYTES = 16 << 20  # an exclusion file larger than this is refused


@dataclass
class BackdoorDataConfig(ImageDataConfig):
    poison_rate: float = 0.01  # share of the training images poisoned (trigger + target label), in [0, 1)
    target_class: int = 0  # the label every triggered image is pushed to
    trigger_size: int = 3  # side of the square trigger patch, in pixels of the raw 28×28 image
    trigger_value: int = 255  # the patch's uint8 pixel value (255: white)
    trigger_location: str = "bottom-right"  # bottom-right | bottom-left | top-right | top-left
    trigger_margin: int = 1  # pixels between the patch and the image border
    poison_seed: int = 0  # seed of the choice of poisoned rows (apart from train.seed)
    # JSON file of training rows to drop before training ({"exclude": [i, ...]} or a list), as written
    # by `duboko detect-backdoor RUN --write-clean FILE`; "" keeps every row
    exclude: str = ""


def trigger_of(cfg: BackdoorDataConfig) -> B.TriggerConfig:
    return B.TriggerConfig(size=cfg.trigger_size, value=cfg.trigger_value, location=cfg.trigger_location,
                           margin=cfg.trigger_margin)


def read_exclude(path: str | Path, n_rows: int) -> torch.Tensor:
    """The sorted, unique row indices of an exclusion file, each in [0, n_rows)."""
    raw = read_json(path, max_bytes=MAX_EXCLUDE_BYTES)
    rows = raw.get("exclude") if isinstance(raw, dict) else raw
    if not isinstance(rows, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
        raise DubokoError(f"data.exclude {str(path)!r} holds no list of row indices (expected {{\"exclude\": [0, 5, ...]}})")
    bad = [i for i in rows if not 0 <= i < n_rows]
    if bad:
        raise DubokoError(f"data.exclude {str(path)!r} names row {bad[0]}, outside the {n_rows} training rows")
    return torch.tensor(sorted(set(rows)), dtype=torch.int64)


@register_task
class BackdoorTask(ImageClassificationTask):
    name = "backdoor"
    data_config = BackdoorDataConfig
    # The trigger is stamped on the raw (N, 28, 28) images of a built-in set; a folder's images
    # may be read batch by batch from a memory map and are not poisoned in place.
    datasets = ("mnist", "fashion-mnist")
    percent_metrics = ("accuracy", "attack_success_rate")

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        cfg = config.data
        if not 0.0 <= cfg.poison_rate < 1.0:
            raise DubokoError(f"data.poison_rate must be in [0, 1), got {cfg.poison_rate!r}")
        n_classes = len(cls.class_names_of(cfg))
        if not 0 <= cfg.target_class < n_classes:
            raise DubokoError(f"data.target_class must be in [0, {n_classes}), got {cfg.target_class}")
        B.check_trigger(trigger_of(cfg), 28, 28)  # the built-in sets' raw side

    @staticmethod
    def class_names_of(cfg: Any) -> list[str]:
        from duboko.tasks.image_classification import DATASET_CLASSES

        return list(DATASET_CLASSES[cfg.dataset])

    # -- data ----------------------------------------------------------------------------------
    def setup(self, run_dir: Path | None = None, splits: tuple[str, ...] = ("train", "test")) -> None:
        super().setup(run_dir, splits)
        cfg = self.config.data
        self.trigger = trigger_of(cfg)
        self.poison: B.PoisonedSplit | None = None
        self.excluded = torch.zeros(0, dtype=torch.int64)
        if "train" not in self.splits or "train" not in splits:
            return
        images, labels = self.splits["train"]
        self.poison = B.poison_split(images, labels, self.trigger, cfg.poison_rate, cfg.target_class, cfg.poison_seed)
        n = len(labels)
        keep = torch.ones(n, dtype=torch.bool)
        if cfg.exclude:
            self.excluded = read_exclude(cfg.exclude, n)
            keep[self.excluded] = False
        # rows[i]: the row of the full poisoned split that training row i is (exclusion files use these)
        self.rows = torch.nonzero(keep).flatten()
        dev_rows = self.rows.to(images.device)
        self.splits["train"] = (self.poison.images[dev_rows], self.poison.labels[dev_rows])

    def poisoned_rows(self) -> torch.Tensor:
        """The rows of the *current* training split (after exclusion) that are poisoned."""
        if self.poison is None:
            return torch.zeros(0, dtype=torch.int64)
        position = torch.full((int(self.rows.max()) + 1 if len(self.rows) else 0,), -1, dtype=torch.int64)
        position[self.rows] = torch.arange(len(self.rows))
        kept = self.poison.poisoned[torch.isin(self.poison.poisoned, self.rows)]
        return position[kept]

    def save_assets(self, run_dir: Path) -> list[str]:
        names = super().save_assets(run_dir)
        if self.poison is not None:
            atomic_write_json(Path(run_dir) / POISON_FILE, {
                "poisoned": self.poison.poisoned.tolist(), "original_labels": self.poison.original_labels.tolist(),
                "excluded": self.excluded.tolist(), "target_class": self.config.data.target_class,
            })
            names.append(POISON_FILE)
        return names

    # -- the backdoor's metric -----------------------------------------------------------------
    @torch.no_grad()
    def attack_success_rate(self, model: nn.Module, split: str = "test") -> tuple[float, int]:
        """Share of the triggered images of `split` whose true class is not the target that the
        model classifies as the target (Gu et al. 2017), and how many were tried."""
        images, labels = self.splits[split]
        target = self.config.data.target_class
        others = torch.nonzero(labels.cpu() != target).flatten()
        bs = self.config.data.eval_batch_size
        hits = 0
        for i in range(0, len(others), bs):
            batch = B.apply_trigger(images[others[i : i + bs].to(images.device)], self.trigger)
            hits += int((model(self.eval_inputs(batch)).argmax(1) == target).sum())
        return hits / max(1, len(others)), len(others)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        metrics = super().evaluate(model, split)
        metrics["attack_success_rate"] = self.attack_success_rate(model, split)[0]
        return metrics

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        evaluation = super().final_metrics(model, run_dir, history)
        model.eval()
        asr, tried = self.attack_success_rate(model, "test")
        cfg = self.config.data
        poisoned = len(self.poison.poisoned) if self.poison is not None else 0
        remaining = len(self.poisoned_rows())
        evaluation.metrics.update({
            "attack_success_rate": asr, "poisoned_samples": poisoned, "excluded_samples": len(self.excluded),
            "poisoned_in_training": remaining, "target_class": cfg.target_class,
        })
        evaluation.report = (
            f"backdoor (BadNets): {poisoned} training images poisoned ({cfg.poison_rate:.2%}, "
            f"{cfg.trigger_size}×{cfg.trigger_size} patch at {cfg.trigger_location}, target class "
            f"{self.class_names[cfg.target_class]}); {len(self.excluded)} rows excluded, {remaining} poisoned rows trained on\n"
            f"attack success rate = {asr * 100:.2f}% of {tried} triggered test images of the other classes\n\n"
        ) + evaluation.report
        if run_dir is not None:
            atomic_write_text(Path(run_dir) / "report.txt", evaluation.report)
        return evaluation

    # -- detection -----------------------------------------------------------------------------
    def detect(self, model: nn.Module, factor: float = 1.5, budget: int | None = None) -> B.DetectionResult:
        """Spectral signatures over the current training split (clean eval transform, no
        augmentation), by the training labels; rows are those of the current split."""
        if self.poison is None:
            raise DubokoError("the task was set up without its training split")
        images, labels = self.splits["train"]
        feats = B.representations(model, lambda a, b: self.eval_inputs(images[a:b]), len(images),
                                  self.config.data.eval_batch_size)
        return B.detect(feats, labels.cpu(), self.poisoned_rows(), factor=factor, budget=budget)
