"""The run folder: what every `duboko train` writes, and how commands load it back safely."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko import config as C
from duboko.errors import DubokoError
from duboko.io import (
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_csv_rows,
    read_json,
    save_tensors,
    sha256_file,
)

CONFIG, METRICS, HISTORY, WEIGHTS, MANIFEST = "config.json", "metrics.json", "history.csv", "model.safetensors", "manifest.json"
CHECKED = (CONFIG, METRICS, HISTORY, WEIGHTS, "state.safetensors")


def write_history(run_dir: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(run_dir / HISTORY, buffer.getvalue())


def read_history(run_dir: Path) -> list[dict]:
    """The rows of a run folder's history.csv (numbers parsed); [] when there is none."""
    return read_csv_rows(Path(run_dir) / HISTORY)


def save_weights(run_dir: Path, model: nn.Module, cfg: C.RunConfig) -> None:
    meta = {"model": cfg.model["name"], "model_config": json.dumps(cfg.model), "format": "duboko"}
    save_tensors(model.state_dict(), run_dir / WEIGHTS, metadata=meta)


def write_manifest(run_dir: Path, assets: list[str] | tuple[str, ...] = ()) -> None:
    """SHA-256 of the run's core files and of the task's assets (tokenizers, scalers)."""
    names = list(CHECKED) + [a for a in assets if a not in CHECKED]
    files = {name: sha256_file(run_dir / name) for name in names if (run_dir / name).exists()}
    atomic_write_json(run_dir / MANIFEST, {"sha256": files})


def verify_manifest(run_dir: Path) -> None:
    """Detect tampered or truncated files: each file the manifest lists must match its hash."""
    path = run_dir / MANIFEST
    if not path.exists():
        raise DubokoError(f"{run_dir} has no {MANIFEST}; it is not a complete duboko run folder")
    manifest = read_json(path)
    listed = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not all(
        isinstance(n, str) and isinstance(d, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
        for n, d in listed.items()
    ):
        raise DubokoError(f"{path} is not a duboko manifest (expected {{\"sha256\": {{file name: hex digest}}}})")
    for name, digest in listed.items():
        file = run_dir / name
        if not file.exists():
            raise DubokoError(f"{file} is missing (listed in {MANIFEST})")
        if sha256_file(file) != digest:
            # A run killed between a checkpoint and the manifest's rewrite also lands here.
            hint = " (or the run was killed mid-checkpoint: `duboko train --resume` finishes it)" if name == "state.safetensors" else ""
            raise DubokoError(f"{file} does not match its SHA-256 in {MANIFEST}: the file was changed or truncated{hint}")


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda > mps > cpu for "auto"; an explicit device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DubokoError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DubokoError(f"device {name!r} asked for but no CUDA GPU is available; set train.device to cpu or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DubokoError(f"device {name!r} asked for but MPS is not available; set train.device to cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


@dataclass
class LoadedRun:
    config: C.RunConfig
    task: Any  # duboko.tasks.Task, set up from the run folder
    model: nn.Module  # weights loaded, eval mode, on `device`
    device: torch.device
    run_dir: Path


def load_config(run_dir: str | Path, overrides: list[str] | None = None, data_dir: str | None = None) -> C.RunConfig:
    """A run folder's config, through the one `config.resolve` (renamed keys upgraded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DubokoError(f"run folder {str(run_dir)!r} does not exist")
    if not (run_dir / CONFIG).is_file():
        raise DubokoError(f"{str(run_dir)!r} is not a run folder: it has no {CONFIG}")
    return C.resolve(Path(run_dir), overrides, data_dir=data_dir)


def load_run(run_dir: str | Path, device: str = "auto", setup_task: bool = True, verify: bool = True,
             data_dir: str | None = None) -> LoadedRun:
    """Load a run folder for evaluation or inference: verified, safetensors only, never pickle.
    `data_dir` points the task at a moved data folder."""
    from duboko import registry

    run_dir = Path(run_dir)
    cfg = load_config(run_dir, data_dir=data_dir)
    if verify:
        verify_manifest(run_dir)
    dev = pick_device(device)
    task = registry.get_task(cfg.task)(cfg, dev)
    if setup_task:
        task.setup(run_dir)
    model_cfg = dict(cfg.model)
    model = registry.build_model(model_cfg.pop("name"), model_cfg)
    state = load_tensors(run_dir / WEIGHTS)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DubokoError(f"{run_dir / WEIGHTS} does not fit model {cfg.model['name']!r}: {str(exc).splitlines()[0]}") from exc
    model.to(dev).eval()
    return LoadedRun(cfg, task, model, dev, run_dir)


def evaluate_run(loaded: LoadedRun, write_files: bool = True) -> tuple[dict[str, Any], str]:
    """`duboko eval`: the validation metrics (val_*) and the task's final metrics of a loaded
    run, and its text report; the task's pictures go into the run folder when `write_files`."""
    val = {f"val_{k}": v for k, v in loaded.task.evaluate(loaded.model, "val").items()}
    history = read_history(loaded.run_dir)
    evaluation = loaded.task.final_metrics(loaded.model, loaded.run_dir if write_files else None, history)
    metrics = {"run": str(loaded.run_dir), "recipe": loaded.config.recipe, **val, **evaluation.metrics}
    return metrics, evaluation.report
