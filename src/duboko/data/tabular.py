"""Small tabular data sets that work offline: scikit-learn's bundled sets and CSV files.

scikit-learn ships three small sets inside its wheel (no download):
    digits         1,797 8×8 digit images as 64 features, 10 classes
    breast-cancer  569 tumours, 30 features, binary (malignant 0 / benign 1)
    diabetes       442 patients, 10 features, regression target (disease progression after a year)
A CSV file works too: `data.dataset=csv data.path=my.csv data.target=price` (a header row, numeric
feature columns; the target may be text labels for classification).

The split into train/val/test is a seeded permutation, and standardisation (x - mean) / std is
fitted on the train split only, so nothing about val/test leaks into training.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duboko.errors import DubokoError, unknown_name

BUILTIN_DATASETS = ("digits", "breast-cancer", "diabetes")
DATASETS = (*BUILTIN_DATASETS, "csv")
PROBLEMS = ("auto", "classification", "binary", "regression")


@dataclass
class TabularData:
    """A loaded table before splitting."""

    features: np.ndarray  # (N, F) float64
    target: np.ndarray  # (N,) class ids (int64) for classification/binary, float64 for regression
    feature_names: list[str]
    problem: str  # classification | binary | regression
    class_names: list[str] = field(default_factory=list)  # for classification/binary
    target_name: str = "target"


def _builtin(name: str) -> tuple[np.ndarray, np.ndarray, list[str], str, list[str]]:
    from sklearn import datasets

    if name == "digits":
        d = datasets.load_digits()
        return d.data, d.target, [f"pixel_{i}" for i in range(d.data.shape[1])], "classification", [str(c) for c in d.target_names]
    if name == "breast-cancer":
        d = datasets.load_breast_cancer()
        return d.data, d.target, list(d.feature_names), "binary", [str(c) for c in d.target_names]
    d = datasets.load_diabetes()  # name == "diabetes"
    return d.data, d.target, list(d.feature_names), "regression", []


def _label_text(value: Any) -> str:
    """Labels as text, with 1.0 written as "1" so that `positive_labels=[1]` matches it."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def read_csv(path: str | Path, target: str) -> tuple[np.ndarray, list[str], list[str], str]:
    """(features (N, F) float64, target column as text, feature names, target name)."""
    path = Path(path)
    if not str(path):
        raise DubokoError("data.dataset=csv needs data.path=FILE.csv")
    if not path.is_file():
        raise DubokoError(f"CSV file {str(path)!r} does not exist (data.path)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DubokoError(f"cannot read CSV file {str(path)!r}: {exc}") from exc
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise DubokoError(f"CSV file {str(path)!r} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if not target:
        raise DubokoError(f"data.target is empty; name the target column, one of: {', '.join(header)}")
    if target not in header:
        raise DubokoError(f"CSV file {str(path)!r} has no column {target!r} (data.target); columns: {', '.join(header)}")
    t = header.index(target)
    feature_names = [h for i, h in enumerate(header) if i != t]
    if not feature_names:
        raise DubokoError(f"CSV file {str(path)!r} has no feature columns besides the target {target!r}")
    features = np.empty((len(rows) - 1, len(feature_names)), dtype=np.float64)
    labels = []
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DubokoError(f"{path}: line {r} has {len(row)} fields, the header has {len(header)}")
        labels.append(row[t].strip())
        cells = [c for i, c in enumerate(row) if i != t]
        for j, cell in enumerate(cells):
            try:
                features[r - 2, j] = float(cell)
            except ValueError:
                raise DubokoError(
                    f"{path}: line {r}, column {feature_names[j]!r} is not a number: {cell!r} "
                    "(feature columns must be numeric)"
                ) from None
    if not np.isfinite(features).all():
        raise DubokoError(f"{path}: feature columns contain NaN or infinite values")
    return features, labels, feature_names, target


def _infer_problem(labels: list[str]) -> str:
    try:
        values = np.array([float(v) for v in labels])
    except ValueError:  # text labels: classes
        return "binary" if len(set(labels)) == 2 else "classification"
    distinct = np.unique(values)
    if len(distinct) == 2:
        return "binary"
    if np.all(values == np.round(values)) and len(distinct) <= 20:
        return "classification"
    return "regression"


def load_table(
    dataset: str,
    path: str = "",
    target: str = "",
    problem: str = "auto",
    positive_labels: list[str] | None = None,
) -> TabularData:
    """Load a bundled set or a CSV; `positive_labels` turns a class target into a binary one."""
    if dataset not in DATASETS:
        raise unknown_name("data.dataset", dataset, DATASETS)
    if problem not in PROBLEMS:
        raise unknown_name("data.problem", problem, PROBLEMS)
    if dataset == "csv":
        features, labels, names, target_name = read_csv(path, target)
        natural = _infer_problem(labels)
        class_names = []
    else:
        if path:
            raise DubokoError(f"data.path is only for data.dataset=csv, got dataset {dataset!r}")
        features, raw, names, natural, class_names = _builtin(dataset)
        labels = [_label_text(v) for v in raw]
        target_name = "target"
        if natural != "regression":  # labels are indices into class_names; show the indices
            class_names = class_names or sorted(set(labels))
    positive = [_label_text(p) for p in (positive_labels or [])]
    if positive:
        known = sorted(set(labels), key=_sort_key)
        missing = [p for p in positive if p not in known]
        if missing:
            raise DubokoError(
                f"data.positive_labels {missing} are not labels of {dataset!r}; its labels: {', '.join(known)}"
            )
        labels = ["1" if v in positive else "0" for v in labels]
        natural = "binary"
        class_names = ["other", "+".join(positive)]
    chosen = natural if problem == "auto" else problem
    if chosen == "regression":
        try:
            y = np.array([float(v) for v in labels], dtype=np.float64)
        except ValueError:
            raise DubokoError(f"data.problem=regression needs a numeric target; {target_name!r} has text values") from None
        return TabularData(features.astype(np.float64), y, names, "regression", [], target_name)
    classes = sorted(set(labels), key=_sort_key)
    if chosen == "binary" and len(classes) != 2:
        raise DubokoError(
            f"data.problem=binary needs exactly 2 classes, {dataset!r} has {len(classes)}; "
            "set data.positive_labels=[...] to make a binary target"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] for v in labels], dtype=np.int64)
    if positive:
        names_out = class_names
    elif dataset != "csv" and class_names and len(class_names) == len(classes):
        names_out = [class_names[int(c)] if c.isdigit() else c for c in classes]
    else:
        names_out = classes
    return TabularData(features.astype(np.float64), y, names, chosen, names_out, target_name)


def _sort_key(label: str) -> tuple:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation cut into train/val/test index arrays."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DubokoError(
            f"data.val_fraction and data.test_fraction must be in [0, 1) with a sum below 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    n_val = round(n * val_fraction)
    if n - n_test - n_val < 1:
        raise DubokoError(f"data set of {n} rows is too small for these val/test fractions")
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


@dataclass
class Standardizer:
    """(x - mean) / std per column, fitted on the train split only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std = np.where(std > 0, std, 1.0)  # a constant column stays 0 instead of dividing by 0
        return cls(mean, std)

    @classmethod
    def identity(cls, width: int) -> Standardizer:
        return cls(np.zeros(width), np.ones(width))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in np.atleast_1d(self.mean)], "std": [float(v) for v in np.atleast_1d(self.std)]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardizer:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


@dataclass
class TabularSplits:
    """Standardised float32 tensors per split, plus what is needed to undo/redo the scaling."""

    x: dict[str, torch.Tensor]  # split -> (N, F)
    y: dict[str, torch.Tensor]  # split -> (N,) long class ids, or (N,) float (standardised target)
    x_scaler: Standardizer
    y_scaler: Standardizer | None  # regression only: the target is standardised too
    table: TabularData


def make_splits(
    table: TabularData,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    standardize: bool = True,
    x_scaler: Standardizer | None = None,
    y_scaler: Standardizer | None = None,
) -> TabularSplits:
    """Split, then standardise with statistics of the train split (or the given saved ones)."""
    idx = split_indices(len(table.target), val_fraction, test_fraction, seed)
    train_x = table.features[idx["train"]]
    if x_scaler is None:
        x_scaler = Standardizer.fit(train_x) if standardize else Standardizer.identity(train_x.shape[1])
    regression = table.problem == "regression"
    if regression and y_scaler is None:
        y_scaler = Standardizer.fit(table.target[idx["train"]][:, None]) if standardize else Standardizer.identity(1)
    xs, ys = {}, {}
    for split, rows in idx.items():
        xs[split] = torch.from_numpy(x_scaler.transform(table.features[rows])).float()
        if regression:
            ys[split] = torch.from_numpy(y_scaler.transform(table.target[rows][:, None])[:, 0]).float()
        else:
            ys[split] = torch.from_numpy(table.target[rows]).long()
    return TabularSplits(xs, ys, x_scaler, y_scaler if regression else None, table)
