"""Classification and regression metrics, computed from tensors (cross-checked with sklearn)."""

from __future__ import annotations

import torch


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; rows = true class, columns = predicted class."""
    index = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(cm: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Per-class precision, recall, F1 and support, with macro and weighted averages
    (the same definitions as sklearn.metrics.classification_report; 0 where undefined)."""
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    names = class_names or [str(i) for i in range(cm.shape[0])]
    total = support.sum().clamp(min=1)
    report = {
        name: {"precision": p, "recall": r, "f1": f, "support": int(s)}
        for name, p, r, f, s in zip(names, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())
    }
    report["macro avg"] = {
        "precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item(),
        "support": int(support.sum()),
    }
    report["weighted avg"] = {
        "precision": (precision * support).sum().item() / total.item(),
        "recall": (recall * support).sum().item() / total.item(),
        "f1": (f1 * support).sum().item() / total.item(),
        "support": int(support.sum()),
    }
    report["accuracy"] = tp.sum().item() / total.item()
    return report


def format_report(report: dict) -> str:
    """A text table like sklearn's classification_report."""
    names = [k for k in report if k not in ("accuracy", "macro avg", "weighted avg")]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for n in names:
        r = report[n]
        lines.append(f"{n:>{width}}  {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} {r['support']:9d}")
    total = report["macro avg"]["support"]
    lines += ["", f"{'accuracy':>{width}}  {'':9} {'':9} {report['accuracy']:9.4f} {total:9d}"]
    for n in ("macro avg", "weighted avg"):
        r = report[n]
        lines.append(f"{n:>{width}}  {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} {r['support']:9d}")
    return "\n".join(lines)


def format_confusion(cm: torch.Tensor, class_names: list[str] | None = None) -> str:
    """The confusion matrix as text: rows = true class, columns = predicted class."""
    names = class_names or [str(i) for i in range(cm.shape[0])]
    cell = max(5, len(str(int(cm.max()))) + 1, *(len(n) + 1 for n in names))
    head = "true \\ pred".ljust(12) + "".join(n.rjust(cell) for n in names)
    rows = [n.ljust(12) + "".join(str(int(v)).rjust(cell) for v in row) for n, row in zip(names, cm.tolist())]
    return "\n".join([head, *rows])


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MSE, MAE and R² (1 - SS_res/SS_tot; sklearn's r2_score for one output)."""
    pred, target = pred.double().flatten(), target.double().flatten()
    err = pred - target
    ss_res = (err**2).sum().item()
    ss_tot = ((target - target.mean()) ** 2).sum().item()
    return {
        "mse": (err**2).mean().item(),
        "mae": err.abs().mean().item(),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
    }
