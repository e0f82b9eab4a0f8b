"""The "tabular" task: an MLP on a table of numbers, as a classifier, a binary classifier or a
regressor.

The problem comes from the data (`data.problem`, "auto" reads it from the data set) and the loss
from `train.loss` ("auto" picks the natural one):

    classification  cross_entropy  out_features = number of classes; softmax inside the loss
    binary          bce            out_features = 1 logit; sigmoid inside BCE-with-logits
                    cross_entropy  also allowed: two logits
    regression      mse            out_features = 1; the target is standardised for training,
                                   metrics (MSE, MAE, R²) are reported in the target's own units

`in_features` / `out_features` of the model are filled from the data in `setup`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duboko import registry
from duboko.data.tabular import Standardizer, TabularSplits, load_table, make_splits
from duboko.errors import DubokoError
from duboko.evaluate import metrics as M
from duboko.io import atomic_write_json, atomic_write_text, read_json
from duboko.tasks import StepOutput, Task

ASSETS_FILE = "tabular.json"
EVAL_BATCH = 1024


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


def resolve_loss(problem: str, loss: str, num_classes: int) -> str:
    """The loss to train with, given the data's problem and `train.loss`; refuses mismatches."""
    natural = {"classification": "cross_entropy", "binary": "bce", "regression": "mse"}[problem]
    if loss == "auto":
        return natural
    allowed = {
        "classification": ("cross_entropy", "bce") if num_classes == 2 else ("cross_entropy",),
        "binary": ("bce", "cross_entropy"),
        "regression": ("mse",),
    }[problem]
    if loss not in allowed:
        raise DubokoError(
            f"train.loss={loss!r} does not fit a {problem} target"
            + (f" with {num_classes} classes" if problem != "regression" else "")
            + f"; expected one of: auto, {', '.join(allowed)}"
        )
    return loss


class TabularTask(Task):
    name = "tabular"
    data_config = TabularDataConfig
    shown_metric = "accuracy"

    def setup(self, run_dir: Path | None = None) -> None:
        d = self.config.data
        table = load_table(d.dataset, d.path, d.target, d.problem, d.positive_labels)
        x_scaler = y_scaler = None
        assets = Path(run_dir) / ASSETS_FILE if run_dir is not None else None
        if assets is not None and assets.is_file():  # evaluating/resuming: the scaling trained with
            saved = read_json(assets)
            x_scaler = Standardizer.from_dict(saved["x_scaler"])
            y_scaler = Standardizer.from_dict(saved["y_scaler"]) if saved.get("y_scaler") else None
            if len(x_scaler.mean) != table.features.shape[1]:
                raise DubokoError(
                    f"{assets} was saved for {len(x_scaler.mean)} features, the data has {table.features.shape[1]}"
                )
        self.splits: TabularSplits = make_splits(
            table, d.val_fraction, d.test_fraction, d.split_seed, d.standardize, x_scaler, y_scaler
        )
        self.problem = table.problem
        self.num_classes = len(table.class_names) if table.problem != "regression" else 0
        self.loss_name = resolve_loss(self.problem, self.config.train.loss, self.num_classes)
        self.shown_metric = "" if self.problem == "regression" else "accuracy"
        out = 1 if self.loss_name in ("bce", "mse") else self.num_classes
        self._fill_model_fields(in_features=table.features.shape[1], out_features=out)
        for split in self.splits.x:
            self.splits.x[split] = self.splits.x[split].to(self.device)
            self.splits.y[split] = self.splits.y[split].to(self.device)

    def _fill_model_fields(self, **values: int) -> None:
        fields = registry.config_fields(registry.get_spec(self.config.model["name"]))
        for key, value in values.items():
            if key in fields:
                self.config.model[key] = value

    def save_assets(self, run_dir: Path) -> None:
        t = self.splits.table
        atomic_write_json(
            Path(run_dir) / ASSETS_FILE,
            {
                "problem": self.problem,
                "loss": self.loss_name,
                "feature_names": t.feature_names,
                "target_name": t.target_name,
                "class_names": t.class_names,
                "x_scaler": self.splits.x_scaler.to_dict(),
                "y_scaler": self.splits.y_scaler.to_dict() if self.splits.y_scaler else None,
            },
        )

    # -- batches -------------------------------------------------------------------------------
    def _per_rank_batch(self) -> int:
        return max(1, self.config.train.batch_size // self.world_size)

    def _rank_rows(self) -> int:
        n = len(self.splits.y["train"])
        # Every rank gets the same number of rows (the remainder is dropped) so DDP ranks stay in step.
        return n if self.world_size == 1 else n // self.world_size

    def num_train_batches(self) -> int:
        return math.ceil(self._rank_rows() / self._per_rank_batch())

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.splits.y["train"])
        gen = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        mine = order[self.rank :: self.world_size][: self._rank_rows()].to(self.device)
        bs = self._per_rank_batch()
        for b in range(start, self.num_train_batches()):
            rows = mine[b * bs : (b + 1) * bs]
            yield self.splits.x["train"][rows], self.splits.y["train"][rows]

    # -- loss ----------------------------------------------------------------------------------
    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(out, y, label_smoothing=self.config.train.label_smoothing)
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())
        return F.mse_loss(out.squeeze(-1), y)

    def _predicted_class(self, out: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "bce":
            return (out.squeeze(-1) > 0).long()  # sigmoid(z) > 0.5  ⇔  z > 0
        return out.argmax(dim=-1)

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        out = model(x)
        loss = self._loss(out.float(), y)
        count = float(len(y))
        stats: dict[str, Any] = {"loss_sum": loss.detach() * count, "count": count}
        if self.problem != "regression":
            stats["correct"] = (self._predicted_class(out.detach()) == y).sum().float()
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
        if self.loss_name == "bce":
            p1 = torch.sigmoid(out.squeeze(-1))
            return torch.stack([1 - p1, p1], dim=-1).numpy()
        return torch.softmax(out, dim=-1).numpy()

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> dict[str, Any]:
        test = self.evaluate(model, "test")
        result: dict[str, Any] = {f"test_{k}": v for k, v in test.items()}
        result["problem"] = self.problem
        result["loss_function"] = self.loss_name
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
                f"({self.loss_name})\n\nClassification report\n{M.format_report(report)}\n\n"
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
        result["report_text"] = text
        return result

    def _plot_regression(self, model: nn.Module, path: Path, metrics: dict[str, Any]) -> None:
        """Predicted vs true target on the test split, with the perfect line and the train mean."""
        from duboko.evaluate.plots import _plt, save_figure

        plt = _plt()
        scaler = self.splits.y_scaler
        out = self._outputs(model, self.splits.x["test"]).squeeze(-1).double().cpu().numpy()
        pred = scaler.inverse(out[:, None])[:, 0]
        true = scaler.inverse(self.splits.y["test"].double().cpu().numpy()[:, None])[:, 0]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(true, pred, s=12, alpha=0.7)
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect")
        ax.axhline(float(scaler.mean[0]), color="gray", lw=1, ls=":", label="train mean")
        ax.set_xlabel(f"true {self.splits.table.target_name}")
        ax.set_ylabel("predicted")
        ax.set_title(f"test: R² {metrics['test_r2']:.3f}, MAE {metrics['test_mae']:.2f}")
        ax.legend()
        save_figure(fig, path)
