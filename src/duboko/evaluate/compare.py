"""Curves of several run folders side by side, read from their `history.csv` files.

    duboko compare runs/sgd runs/adam runs/adamw runs/rmsprop --out optimizers.png

One panel per metric (loss first, then accuracy / R² / MAE / bpc ... when the runs have them), one
colour per run; solid lines are the training split, dashed the validation split. Each run is
labelled by its folder name and what sets it apart (optimizer, lr, model) from its config.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duboko.errors import DubokoError

# Metrics plotted when present, in this order (each as train_<m> and/or val_<m> columns).
PREFERRED = ("loss", "accuracy", "r2", "mae", "mse", "bpc", "perplexity")
# Where smaller is better (for the "best" column of the table).
LOWER_IS_BETTER = {"loss", "mae", "mse", "bpc", "perplexity"}


@dataclass
class RunCurves:
    path: Path
    label: str
    history: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def load_run_curves(path: str | Path) -> RunCurves:
    from duboko.io import read_csv_rows, read_json

    folder = Path(path)
    if not folder.is_dir():
        raise DubokoError(f"run folder {str(folder)!r} does not exist")
    if not (folder / "history.csv").is_file():
        raise DubokoError(f"{str(folder)!r} has no history.csv; is it a `duboko train` run folder?")
    history = read_csv_rows(folder / "history.csv")
    if not history:
        raise DubokoError(f"{folder / 'history.csv'} has no epochs yet")
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    return RunCurves(folder, folder.name or str(folder), history, config, metrics)


def _differences(runs: list[RunCurves]) -> list[str]:
    """Short descriptions of the settings that differ between the runs (optimizer, lr, ...)."""
    keys = [("train", "optimizer"), ("train", "lr"), ("model", "name"), ("model", "activation"),
            ("model", "hidden_sizes"), ("train", "batch_size"), ("train", "schedule"), ("train", "loss"),
            ("train", "momentum"), ("train", "nesterov"), ("train", "weight_decay")]
    varying = []
    for section, key in keys:
        values = {repr(r.config.get(section, {}).get(key)) for r in runs}
        if len(values) > 1:
            varying.append((section, key))
    out = []
    for r in runs:
        parts = []
        for section, key in varying:
            value = r.config.get(section, {}).get(key)
            parts.append(str(value) if key in ("optimizer", "name", "activation") else f"{key}={value}")
        out.append(", ".join(parts))
    return out


def metrics_to_plot(runs: list[RunCurves], wanted: list[str] | None = None) -> list[str]:
    columns = {k for r in runs for row in r.history for k in row}
    present = []
    for split_col in sorted(columns):
        for prefix in ("train_", "val_"):
            if split_col.startswith(prefix):
                base = split_col[len(prefix) :]
                if base not in present:
                    present.append(base)
    if wanted:
        missing = [m for m in wanted if m not in present]
        if missing:
            raise DubokoError(
                f"no run has metric(s) {', '.join(missing)}; available: {', '.join(sorted(present)) or 'none'}"
            )
        return wanted
    ordered = [m for m in PREFERRED if m in present]
    return ordered[:4] or sorted(present)[:4]


def plot_compare(runs: list[RunCurves], out: str | Path, metrics: list[str] | None = None, title: str = "") -> list[str]:
    """Write the side-by-side curves to `out` (PNG); returns the metrics plotted."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    from duboko.evaluate.plots import figure

    if not runs:
        raise DubokoError("compare needs at least one run folder")
    chosen = metrics_to_plot(runs, metrics)
    n = len(chosen)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    extra = _differences(runs)
    with figure(out, rows, cols, size=(6 * cols, 3.8 * rows), title=title or "solid: train, dashed: validation") as (fig, axes):
        for i, metric in enumerate(chosen):
            ax = axes[i // cols][i % cols]
            for j, run in enumerate(runs):
                colour = colours[j % len(colours)]
                label = run.label + (f" ({extra[j]})" if extra[j] else "")
                for prefix, style in (("train_", "-"), ("val_", "--")):
                    points = [(row["epoch"], row[prefix + metric]) for row in run.history
                              if isinstance(row.get(prefix + metric), (int, float)) and row.get(prefix + metric) == row.get(prefix + metric)]
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, style, color=colour, marker="o" if len(xs) < 15 else None, ms=3,
                                label=f"{label} {prefix[:-1]}")
            ax.set_title(metric)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if metric in ("loss", "perplexity") and _spread(ax) > 50:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for k in range(n, rows * cols):
            axes[k // cols][k % cols].axis("off")
    return chosen


def _spread(ax) -> float:
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    return max(ys) / min(ys) if ys else 1.0


def summary_table(runs: list[RunCurves]) -> str:
    """Final values per run: last val metrics, test metrics from metrics.json, train time."""
    keys = []
    for r in runs:
        for k in r.metrics:
            if (k.startswith("test_") or k.startswith("val_")) and isinstance(r.metrics[k], (int, float)) and k not in keys:
                keys.append(k)
    keys = [k for k in keys if not k.startswith("val_") or f"test_{k[4:]}" not in keys][:6]
    head = ["run", "epochs", *keys, "train s"]
    lines = [head]
    for r in runs:
        last = r.history[-1]
        vals = [r.label, str(last.get("epoch", ""))]
        for k in keys:
            v = r.metrics.get(k, last.get(k))
            if isinstance(v, (int, float)):
                vals.append(f"{v * 100:.2f}%" if "accuracy" in k else f"{v:.4g}")
            else:
                vals.append("--")
        secs = r.metrics.get("train_seconds")
        vals.append(f"{secs:.1f}" if isinstance(secs, (int, float)) else "--")
        lines.append(vals)
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines)
