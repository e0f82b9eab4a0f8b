"""Tasks: each model family's contract with the shared engine.

The engine (`duboko.train.engine`) owns loops, precision, optimizers, schedules, checkpoints,
logging and distribution. A task only says how to get batches, how to compute the loss and its
statistics for one batch, and how to evaluate: like a LightningModule's hooks, but with the model
kept a plain `nn.Module` that the task receives. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from duboko import registry
from duboko.errors import unknown_name

# Task name -> module that defines it (imported lazily, so one family's heavy imports don't slow
# the others). A module defines exactly one `Task` subclass whose `name` matches.
TASK_MODULES: dict[str, str] = {
    "image-classification": "duboko.tasks.image_classification",
    "tabular": "duboko.tasks.tabular",
    "language-model": "duboko.tasks.language_model",
    "seq2seq": "duboko.tasks.seq2seq",
    "diffusion": "duboko.tasks.diffusion",
}


@dataclass
class StepOutput:
    """What `Task.training_step` returns."""

    loss: torch.Tensor  # scalar to back-propagate (mean over the batch)
    # Sums over the batch, all-reduced across ranks and accumulated over an epoch by the engine:
    # "loss_sum" and "count" are required (running loss = loss_sum / count); "correct" is optional
    # (running accuracy = correct / count). Detached tensors or floats.
    stats: dict[str, torch.Tensor | float]


class Task:
    """Base class for a family's training task. Subclasses set `name` and `data_config`."""

    name: ClassVar[str] = ""
    data_config: ClassVar[type]  # the @dataclass of this task's [data] section
    # The metric the per-epoch summary line and progress bar show beside the loss
    # ("accuracy" for classifiers; "" for none).
    shown_metric: ClassVar[str] = ""

    def __init__(self, config: Any, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config = config  # duboko.config.RunConfig
        self.device = device
        self.rank = rank
        self.world_size = world_size

    # -- data ----------------------------------------------------------------------------------
    def setup(self, run_dir: Path | None = None) -> None:
        """Load data (and, in a run folder being resumed or evaluated, saved assets such as a
        tokenizer). May fill data-dependent model fields, e.g. `config.model["vocab_size"]`."""

    def save_assets(self, run_dir: Path) -> None:
        """Write what inference needs beside the weights (tokenizer, class names), atomically."""

    def num_train_batches(self) -> int:
        """Batches per epoch for this rank."""
        raise NotImplementedError

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """This rank's batches of `epoch`, on `self.device`, from batch index `start` on.

        Must be a pure function of (seed, epoch, rank, world_size): resume relies on it to skip
        the batches already seen without replaying them."""
        raise NotImplementedError

    # -- model ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = dict(self.config.model)
        return registry.build_model(model.pop("name"), model)

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics on "val" or "test", unprefixed ({"loss": ..., "accuracy": ...})."""
        raise NotImplementedError

    # -- artifacts -----------------------------------------------------------------------------
    def epoch_end(self, model: nn.Module, epoch: int, run_dir: Path) -> dict[str, float]:
        """Per-epoch artifacts (samples, pictures); may return extra history columns."""
        return {}

    def final_metrics(self, model: nn.Module, run_dir: Path, history: list[dict]) -> dict[str, Any]:
        """Final metrics for `metrics.json` (and reports written into the run folder)."""
        return {}


def get_task_cls(name: str) -> type[Task]:
    if not isinstance(name, str) or name not in TASK_MODULES:
        raise unknown_name("task", name, TASK_MODULES)
    module = importlib.import_module(TASK_MODULES[name])
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Task) and value.name == name:
            return value
    raise RuntimeError(f"module {TASK_MODULES[name]} defines no Task named {name!r}")
