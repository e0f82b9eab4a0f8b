"""Tasks: each model family's contract with the shared engine.

The engine (`duboko.train.Trainer`) owns loops, precision, optimizers, schedules, checkpoints,
logging and distribution. A task only says how to get batches, how to compute the loss and its
statistics for one batch, and how to evaluate: like a LightningModule's hooks, but with the model
kept a plain `nn.Module` that the task receives. See docs/architecture.md.

A new task is one module in this package (or anywhere, imported before use) with one class:

    @register_task
    class MyTask(Task):
        name = "my-task"                 # what a recipe's `task` says
        data_config = MyDataConfig       # the @dataclass of the recipe's [data] section
        ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from duboko import registry
from duboko.errors import DubokoError, unknown_name
from duboko.registry import register_task  # noqa: F401 (re-exported for task modules)


@dataclass
class StepOutput:
    """What `Task.training_step` returns."""

    loss: torch.Tensor  # scalar to back-propagate (mean over the batch)
    # Sums over the batch, all-reduced across ranks and accumulated over an epoch by the engine.
    # "loss_sum" and "count" are required (running loss = loss_sum / count); every other key is a
    # per-item sum whose running value is sum / count, logged as train_<key> (e.g. "accuracy":
    # the number of correct items). Detached tensors or floats.
    stats: dict[str, torch.Tensor | float]


@dataclass
class Evaluation:
    """What `Task.final_metrics` returns: the metrics and, apart, the text report for people."""

    metrics: dict[str, Any]  # entries of metrics.json (test_accuracy, prompt_accuracy, ...)
    report: str = ""  # printed at the end of training and by `duboko eval`


class Task:
    """Base class for a family's training task. Subclasses set `name` and `data_config`."""

    name: ClassVar[str] = ""
    data_config: ClassVar[type]  # the @dataclass of this task's [data] section
    # The metric the progress bar and the per-epoch summary line show beside the loss (its train
    # value from the step statistics, its val value from `evaluate`); "" for none.
    shown_metric: ClassVar[str] = ""
    # Metrics shown as percentages in the summary line (fractions in [0, 1] everywhere else).
    percent_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    # The values of `data.dataset` this task knows (checked when the [data] section has one).
    datasets: ClassVar[tuple[str, ...]] = ()
    # The values of `train.loss` this task trains with; "auto" means the first one.
    losses: ClassVar[tuple[str, ...]] = ("cross_entropy",)
    # Model fields the task fills from its data, and what sets them (shown when a user tries to
    # override one): {"vocab_size": "data.vocab_size"}. Only these may be written by the task.
    derived_model_fields: ClassVar[dict[str, str]] = {}
    # Fields that the [data] and [model] sections both have and that must agree (image_size): a
    # bare `--set image_size=64` sets both.
    shared_fields: ClassVar[tuple[str, ...]] = ()
    # [data] fields a fine-tune (train.init_from) takes from its source run, because the weights
    # depend on them (a language model's tokenizer and vocabulary size).
    init_from_data_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config = config  # duboko.config.RunConfig
        self.device = device
        self.rank = rank
        self.world_size = world_size

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def derived_fields(cls, data: dict[str, Any]) -> dict[str, str]:
        """The derived model fields for a raw [data] section (override when the data decides:
        a folder of images derives the class count, MNIST does not)."""
        return dict(cls.derived_model_fields)

    @classmethod
    def allowed_losses(cls, config: Any) -> tuple[str, ...]:
        """The `train.loss` values that fit this config (override when the data decides)."""
        return cls.losses

    @classmethod
    def check(cls, config: Any) -> None:
        """Refuse a config that cannot train, before anything is created (no data loaded, no run
        folder). Subclasses call `super().check(config)` and add their [data] checks. Messages
        name config keys (`train.loss`, `data.image_size`)."""
        dataset = getattr(config.data, "dataset", None)
        if cls.datasets and dataset not in cls.datasets:
            raise unknown_name("data.dataset", dataset, cls.datasets)
        allowed = cls.allowed_losses(config)
        loss = config.train.loss
        if loss != "auto" and loss not in allowed:
            raise DubokoError(
                f"train.loss {loss!r} does not fit task {cls.name!r}; expected auto or {' | '.join(allowed)}"
            )
        resolved = allowed[0] if loss == "auto" else loss
        if config.train.label_smoothing > 0 and resolved != "cross_entropy":
            raise DubokoError(
                f"train.label_smoothing {config.train.label_smoothing!r} needs a cross-entropy loss; "
                f"task {cls.name!r} trains with {resolved} here"
            )

    def loss_name(self) -> str:
        """The resolved `train.loss` ("auto" -> the task's natural loss)."""
        loss = self.config.train.loss
        return self.allowed_losses(self.config)[0] if loss == "auto" else loss

    def set_model_field(self, key: str, value: Any) -> None:
        """Fill a data-dependent model field (declared in `derived_model_fields`)."""
        if key not in self.derived_fields(dataclasses.asdict(self.config.data)):
            raise RuntimeError(f"task {self.name!r} writes model.{key} but does not declare it in derived_model_fields")
        self.config.model[key] = value

    # -- data ----------------------------------------------------------------------------------
    def setup(self, run_dir: Path | None = None) -> None:
        """Load data (and, in a run folder being resumed or evaluated, saved assets such as a
        tokenizer; for a new run with `train.init_from`, `run_dir` is that source run, whose
        assets the fine-tune reuses). May fill derived model fields with `set_model_field`."""

    def save_assets(self, run_dir: Path) -> list[str]:
        """Write what inference needs beside the weights (tokenizer, class names), atomically;
        returns the file names written (they go into the run's manifest)."""
        return []

    def num_train_batches(self) -> int:
        """Batches per epoch for this rank."""
        raise NotImplementedError

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """This rank's batches of `epoch`, on `self.device`, from batch index `start` on.

        Must be a pure function of (seed, epoch, rank, world_size): resume relies on it to skip
        the batches already seen without replaying them (see `duboko.seeding`)."""
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
    def epoch_end(self, model: nn.Module, epoch: int, run_dir: Path | None) -> dict[str, float]:
        """Per-epoch artifacts (samples, pictures; none when `run_dir` is None); may return extra
        history columns."""
        return {}

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        """Final metrics for `metrics.json` and the text report (files go into `run_dir` unless
        it is None)."""
        return Evaluation({})

