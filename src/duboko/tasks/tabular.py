"""The "tabular" task: an MLP on a table of numbers, as a classifier, a binary classifier or a
regressor.

The problem comes from the data (`data.problem`, "auto" reads it from the data set) and the loss
from `train.loss` ("auto" picks the natural one):

    classification  cross_entropy  out_features = number of classes; softmax inside the loss
    binary          bce            out_features = 1 logit; sigmoid inside BCE-with-logits
                    cross_entropy  also allowed: two logits
    regression      mse            out_features = 1; the target is standardised for training,
                                   metrics (MSE, MAE, R²) are reported in the target's own units

`in_features` / `out_features` of the model are filled from the data in `setup` (derived model
fields: a recipe or `--set` cannot give them).

The problem, and so the losses that fit, is known from the config alone for the bundled data sets
(and whenever `data.problem` or `data.positive_labels` says it), so `check` refuses a mismatched
`train.loss` before any data is loaded; for a CSV with `data.problem = "auto"` only the data tells,
and `setup` refuses it then.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duboko import registry
from duboko.data.batching import batch_slice, epoch_permutation, num_batches, rank_slice
from duboko.data.tabular import DATASETS, PROBLEMS, Standardizer, TabularSplits, load_table, make_splits
from duboko.errors import DubokoError, unknown_name
from duboko.evaluate import metrics as M
from duboko.io import atomic_write_json, atomic_write_text, read_json
from duboko.tasks import Evaluation, StepOutput, Task, register_task

ASSETS_FILE = "tabular.json"
EVAL_BATCH = 1024
# The bundled data sets' problems and class counts (0: regression), known without loading them.
BUILTIN_PROBLEMS = {"digits": ("classification", 10), "breast-cancer": ("binary", 2), "diabetes": ("regression", 0)}
# The losses that fit each problem, the natural one first.
PROBLEM_LOSSES = {
    "classification": ("cross_entropy",),
    "binary": ("bce", "cross_entropy"),
    "regression": ("mse",),
}


@dataclass
class TabularDataConfig:
    dataset: str = "digits"  # digits | breast-cancer | diabetes (bundled with scikit-learn) | csv
    path: str = ""  # CSV file (dataset=csv): a header row, then numeric feature columns
    target: str = ""  # CSV column to predict (dataset=csv)
    problem: str = "auto"  # auto | classification | binary | regression
    positive_labels: list[str] = field(default_factory=list)  # labels that form class 1 of a binary target, e.g. [1, 3, 5, 7, 9]
    val_fraction: float = 0.15  # share of rows held out for validation
    test_fraction: float = 0.2  # share of rows held out for the final test
    split_seed: int = 0  # seed of the train/val/test permutation (fixed apart from train.seed)
    standardize: bool = True  # (x - mean) / std with train-split statistics (and the target, for regression)


def problem_losses(problem: str, num_classes: int | None) -> tuple[str, ...]:
    """The `train.loss` values that fit a problem, the natural one first; a two-class
    classification also trains with bce, and one of unknown class count (None) may."""
    if problem == "classification" and (num_classes is None or num_classes == 2):
        return ("cross_entropy", "bce")
    return PROBLEM_LOSSES[problem]


def resolve_loss(problem: str, loss: str, num_classes: int) -> str:
    """The loss to train with, given the data's problem and `train.loss`; refuses mismatches."""
    allowed = problem_losses(problem, num_classes)
    if loss == "auto":
        return allowed[0]
    if loss not in allowed:
        raise DubokoError(
            f"train.loss={loss!r} does not fit a {problem} target"
            + (f" with {num_classes} classes" if problem != "regression" else "")
            + f"; expected one of: auto, {', '.join(allowed)}"
        )
    return loss


@register_task
class TabularTask(Task):
    name = "tabular"
    data_config = TabularDataConfig
    shown_metric = "accuracy"  # "" for a regression (set per instance)
    datasets = DATASETS
    losses = ("cross_entropy", "bce", "mse")  # all the task knows; `allowed_losses` narrows them
    derived_model_fields = {
        "in_features": "the feature columns of data.dataset (data.path for a CSV)",
        "out_features": "the classes of data.dataset's target and train.loss (1 for bce and mse)",
    }

    def __init__(self, config: Any, device: torch.device, rank: int = 0, world_size: int = 1):
        super().__init__(config, device, rank, world_size)
        problem, _ = self.config_problem(config)
        if problem == "regression":
            self.shown_metric = ""
        self.resolved_loss: str | None = None  # resolved in `setup`, once the data set is known

    # -- config --------------------------------------------------------------------------------
    @staticmethod
    def config_problem(config: Any) -> tuple[str | None, int | None]:
        """(problem, number of classes) as far as the config tells without loading the data:
        None for what only the data knows (a CSV's problem with data.problem=auto, its classes)."""
        d = config.data
        if d.dataset not in DATASETS or d.problem not in PROBLEMS:
            return None, None
        builtin = BUILTIN_PROBLEMS.get(d.dataset)
        if d.problem == "auto":
            # `load_table`: positive labels make a binary target; else the data set's own problem.
            if d.positive_labels:
                return "binary", 2
            return builtin if builtin else (None, None)
        if d.problem == "binary":
            return "binary", 2
        if d.problem == "regression":
            return "regression", 0
        # Classification asked for: two classes from positive labels, else the bundled set's own
        # count when it is a class target (a CSV's classes, or a regression target's distinct
        # values, only the data knows).
        if d.positive_labels:
            return "classification", 2
        return "classification", builtin[1] if builtin and builtin[0] != "regression" else None

    @classmethod
    def allowed_losses(cls, config: Any) -> tuple[str, ...]:
        problem, num_classes = cls.config_problem(config)
        if problem is None:
            return cls.losses  # a CSV with data.problem=auto: `setup` decides from the data
        return problem_losses(problem, num_classes)

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)  # data.dataset, then train.loss (allowed_losses copes with a bad problem)
        d = config.data
        if d.problem not in PROBLEMS:
            raise unknown_name("data.problem", d.problem, PROBLEMS)
        if d.dataset == "csv":
            # (An empty data.target is refused when the file is read, with its columns listed.)
            if not d.path:
                raise DubokoError("data.dataset=csv needs data.path=FILE.csv")
        elif d.path:
            raise DubokoError(f"data.path is only for data.dataset=csv, got data.dataset {d.dataset!r}")
        if not (0 <= d.val_fraction < 1 and 0 < d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
            raise DubokoError(
                f"data.val_fraction and data.test_fraction must be in [0, 1) with a sum below 1, "
                f"got {d.val_fraction} and {d.test_fraction}"
            )

    def loss_name(self) -> str:
        """The resolved `train.loss`: from the data once `setup` has run."""
        return self.resolved_loss if self.resolved_loss is not None else super().loss_name()

    # -- data ----------------------------------------------------------------------------------
    def setup(self, run_dir: Path | None = None) -> None:
        d = self.config.data
        table = load_table(d.dataset, d.path, d.target, d.problem, d.positive_labels)
        x_scaler = y_scaler = None
        assets = Path(run_dir) / ASSETS_FILE if run_dir is not None else None
        if assets is not None and assets.is_file():  # evaluating/resuming: the scaling trained with
            saved = read_json(assets)
            try:  # a file of the run folder: any shape of JSON may be in it
                x_scaler = Standardizer.from_dict(saved["x_scaler"])
                y_scaler = Standardizer.from_dict(saved["y_scaler"]) if saved.get("y_scaler") else None
                if x_scaler.mean.ndim != 1 or x_scaler.mean.shape != x_scaler.std.shape:
                    raise ValueError("mean and std must be lists of one length")
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise DubokoError(f"{assets} is not a tabular scaling file ({{'x_scaler': {{'mean': [...], 'std': [...]}}, "
                                  f"'y_scaler': ...}}): {type(e).__name__}: {e}") from None
            if len(x_scaler.mean) != table.features.shape[1]:
                raise DubokoError(
                    f"{assets} was saved for {len(x_scaler.mean)} features, the data has {table.features.shape[1]}"
                )
        self.splits: TabularSplits = make_splits(
            table, d.val_fraction, d.test_fraction, d.split_seed, d.standardize, x_scaler, y_scaler
        )
        self.problem = table.problem
        self.num_classes = len(table.class_names) if table.problem != "regression" else 0
        # What `check` could not know (a CSV's problem, its class count) is checked here.
        self.resolved_loss = resolve_loss(self.problem, self.config.train.loss, self.num_classes)
        if self.config.train.label_smoothing > 0 and self.resolved_loss != "cross_entropy":
            raise DubokoError(
                f"train.label_smoothing {self.config.train.label_smoothing!r} needs a cross-entropy loss; "
                f"this {self.problem} target trains with {self.resolved_loss}"
            )
        self.shown_metric = "" if self.problem == "regression" else "accuracy"
        out = 1 if self.resolved_loss in ("bce", "mse") else self.num_classes
        self._fill_model_fields(in_features=table.features.shape[1], out_features=out)
        for split in self.splits.x:
            self.splits.x[split] = self.splits.x[split].to(self.device)
            self.splits.y[split] = self.splits.y[split].to(self.device)

    def _fill_model_fields(self, **values: int) -> None:
        # Only the fields this model has (a model without out_features is left as it is).
        fields = registry.config_fields(registry.get_spec(self.config.model["name"]))
        for key, value in values.items():
            if key in fields:
                self.set_model_field(key, value)

    def save_assets(self, run_dir: Path) -> list[str]:
        t = self.splits.table
        atomic_write_json(
            Path(run_dir) / ASSETS_FILE,
            {
                "problem": self.problem,
                "loss": self.loss_name(),
                "feature_names": t.feature_names,
                "target_name": t.target_name,
                "class_names": t.class_names,
                "x_scaler": self.splits.x_scaler.to_dict(),
                "y_scaler": self.splits.y_scaler.to_dict() if self.splits.y_scaler else None,
            },
        )
        return [ASSETS_FILE]

    # -- batches -------------------------------------------------------------------------------
    def num_train_batches(self) -> int:
        return num_batches(len(self.splits.y["train"]), self.config.train.batch_size, self.world_size)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_permutation(len(self.splits.y["train"]), self.config.train.seed, epoch).to(self.device)
        for b in range(start, self.num_train_batches()):
            rows = rank_slice(batch_slice(order, b, self.config.train.batch_size), self.rank, self.world_size)
            yield self.splits.x["train"][rows], self.splits.y["train"][rows]  # (b, F), (b,)

    # -- loss ----------------------------------------------------------------------------------
    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.resolved_loss == "cross_entropy":
            return F.cross_entropy(out, y, label_smoothing=self.config.train.label_smoothing)
        if self.resolved_loss == "bce":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())
        return F.mse_loss(out.squeeze(-1), y)

    def _predicted_class(self, out: torch.Tensor) -> torch.Tensor:
        if self.resolved_loss == "bce":
            return (out.squeeze(-1) > 0).long()  # sigmoid(z) > 0.5  ⇔  z > 0
        return out.argmax(dim=-1)

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        out = model(x)
        loss = self._loss(out.float(), y)
        count = float(len(y))
        stats: dict[str, Any] = {"loss_sum": loss.detach() * count, "count": count}
        if self.problem != "regression":
            stats["accuracy"] = (self._predicted_class(out.detach()) == y).sum().float()
        return StepOutput(loss, stats)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _outputs(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return torch.cat([model(x[i : i + EVAL_BATCH]).float() for i in range(0, len(x), EVAL_BATCH)])
        finally:
            model.train(was_training)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if split not in self.splits.x:
            raise DubokoError(f"unknown split {split!r}; expected one of: {', '.join(self.splits.x)}")
        x, y = self.splits.x[split], self.splits.y[split]
        if len(y) == 0:
            return {}
        out = self._outputs(model, x)
        metrics = {"loss": float(self._loss(out, y))}
        if self.problem == "regression":
            scaler = self.splits.y_scaler
            pred = scaler.inverse(out.squeeze(-1).double().cpu().numpy()[:, None])[:, 0]
            true = scaler.inverse(y.double().cpu().numpy()[:, None])[:, 0]
            metrics.update(M.regression_metrics(torch.from_numpy(pred), torch.from_numpy(true)))
        else:
            metrics["accuracy"] = float((self._predicted_class(out) == y).float().mean())
        return metrics

    def predict_proba(self, model: nn.Module, features: np.ndarray) -> np.ndarray:
        """Raw (unscaled) feature rows (N, F) -> class probabilities (N, classes), or predictions
        in the target's units (N,) for regression. Softmax/sigmoid are applied here, not in the model."""
        x = torch.from_numpy(self.splits.x_scaler.transform(np.asarray(features, dtype=np.float64))).float()
        out = self._outputs(model, x.to(self.device)).cpu()
        if self.problem == "regression":
            return self.splits.y_scaler.inverse(out.double().numpy())[:, 0]
        if self.resolved_loss == "bce":
            p1 = torch.sigmoid(out.squeeze(-1))
            return torch.stack([1 - p1, p1], dim=-1).numpy()
        return torch.softmax(out, dim=-1).numpy()

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        test = self.evaluate(model, "test")
        result: dict[str, Any] = {f"test_{k}": v for k, v in test.items()}
        result["problem"] = self.problem
        result["loss_function"] = self.loss_name()
        n_test = len(self.splits.y["test"])
        if self.problem == "regression":
            # The bar to beat: always predicting the train split's mean target.
            scaler = self.splits.y_scaler
            true = scaler.inverse(self.splits.y["test"].double().cpu().numpy()[:, None])[:, 0]
            result["test_baseline_mse"] = float(np.mean((true - float(scaler.mean[0])) ** 2))
            text = (
                f"test ({n_test} rows): MSE {result['test_mse']:.4g}, MAE {result['test_mae']:.4g}, "
                f"R² {result['test_r2']:.4f}  (always predicting the train mean: MSE {result['test_baseline_mse']:.4g})"
            )
        else:
            preds = self._predicted_class(self._outputs(model, self.splits.x["test"])).cpu()
            cm = M.confusion_matrix(self.splits.y["test"].cpu(), preds, self.num_classes)
            names = self.splits.table.class_names
            report = M.classification_report(cm, names)
            result["classification_report"] = report
            result["confusion_matrix"] = cm.tolist()
            text = (
                f"test ({n_test} rows): accuracy {result['test_accuracy'] * 100:.2f}%, loss {result['test_loss']:.4f} "
                f"({self.loss_name()})\n\nClassification report\n{M.format_report(report)}\n\n"
                f"Confusion matrix (rows = true, columns = predicted)\n{M.format_confusion(cm, names)}\n"
            )
        if run_dir is not None:  # `duboko eval --json` passes None: write nothing
            from duboko.evaluate.plots import plot_confusion, plot_curves

            atomic_write_text(Path(run_dir) / "report.txt", text + "\n")
            if history:
                plot_curves(history, Path(run_dir) / "curves.png", title=self.config.recipe)
            if self.problem == "regression":
                self._plot_regression(model, Path(run_dir) / "predictions.png", result)
            else:
                plot_confusion(cm, names, Path(run_dir) / "confusion_matrix.png")
        return Evaluation(result, text)

    def _plot_regression(self, model: nn.Module, path: Path, metrics: dict[str, Any]) -> None:
        """Predicted vs true target on the test split, with the perfect line and the train mean."""
        from duboko.evaluate.plots import figure

        scaler = self.splits.y_scaler
        out = self._outputs(model, self.splits.x["test"]).squeeze(-1).double().cpu().numpy()
        pred = scaler.inverse(out[:, None])[:, 0]
        true = scaler.inverse(self.splits.y["test"].double().cpu().numpy()[:, None])[:, 0]
        with figure(path, size=(5, 5)) as (_, axes):
            ax = axes[0][0]
            ax.scatter(true, pred, s=12, alpha=0.7)
            lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect")
            ax.axhline(float(scaler.mean[0]), color="gray", lw=1, ls=":", label="train mean")
            ax.set_xlabel(f"true {self.splits.table.target_name}")
            ax.set_ylabel("predicted")
            ax.set_title(f"test: R² {metrics['test_r2']:.3f}, MAE {metrics['test_mae']:.2f}")
            ax.legend()
