"""The run folder: what every `duboko train` writes, and how commands load it back safely."""

from __future__ import annotations

import csv
import io
import json
import stat
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
    """SHA-256 of the run's core files and of the task's assets (tokenizers, scalers), and the
    core files this run has (`required`): a finished run's metrics.json stays required, so that
    deleting it together with its hash is caught as well."""
    from duboko.train import checkpoint as ckpt

    # The sharded layout's shards and index (duboko.train.checkpoint) are covered like the core files.
    names = list(CHECKED) + ckpt.layout_files(run_dir) + [a for a in assets if a not in CHECKED]
    files = {name: sha256_file(run_dir / name) for name in names if (run_dir / name).exists()}
    required = [name for name in CHECKED if name in files]
    atomic_write_json(run_dir / MANIFEST, {"sha256": files, "required": required})


# Every load reads these two; a manifest that does not list them verifies nothing.
REQUIRED = (CONFIG, WEIGHTS)
# Files of these kinds in a run folder are read by loads (config, metrics, history, weights,
# state, the tasks' assets: tokenizers, scalers); each one present must be in the manifest.
LOADED_SUFFIXES = (".json", ".safetensors", ".csv")
# What the engine rewrites at each checkpoint, before the manifest: a run killed between the two
# leaves them newer than manifest.json (see `verify_manifest(..., killed_run_ok=True)`).
REWRITTEN = (CONFIG, METRICS, HISTORY, WEIGHTS, "state.safetensors")
MAX_MANIFEST_BYTES = 1 * 2**20


def _manifest_listing(run_dir: Path) -> tuple[dict[str, str], list[str]]:
    """The manifest's {file name: digest} and its `required` names (older manifests: none)."""
    path = run_dir / MANIFEST
    if not path.exists():
        raise DubokoError(f"{run_dir} has no {MANIFEST}; it is not a complete duboko run folder")
    manifest = read_json(path, max_bytes=MAX_MANIFEST_BYTES)
    listed = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not all(
        isinstance(n, str) and isinstance(d, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
        for n, d in listed.items()
    ):
        raise DubokoError(f"{path} is not a duboko manifest (expected {{\"sha256\": {{file name: hex digest}}}})")
    required = manifest.get("required", [])
    if not isinstance(required, list) or not all(isinstance(n, str) and n in CHECKED for n in required):
        raise DubokoError(f"{path}: \"required\" must be a list of core file names ({', '.join(CHECKED)})")
    return listed, required


def verify_manifest(run_dir: Path, *, required: tuple[str, ...] = REQUIRED, killed_run_ok: bool = False) -> None:
    """Detect tampered, truncated, swapped-in or unlisted files, before any of them is parsed:
    the manifest must list the `required` files (a load reads config.json and model.safetensors;
    a resume config.json and state.safetensors) and every JSON, CSV and safetensors
    file in the folder (assets included), and each listed file must be a regular file matching
    its hash.

    `killed_run_ok` (resume only): a file of REWRITTEN that is newer than manifest.json may
    differ from (or be missing in) the manifest: the run was killed after rewriting it and
    before rewriting the manifest, and the resume rewrites both. Assets are always checked."""
    run_dir = Path(run_dir)
    listed, recorded = _manifest_listing(run_dir)
    # What the run itself recorded as its core files (a finished run: metrics.json too) is as
    # required as what this load reads.
    required = tuple(required) + tuple(n for n in recorded if n not in required)
    missing = [name for name in required if name not in listed]
    manifest_time = (run_dir / MANIFEST).stat().st_mtime_ns

    def newer_checkpoint_file(name: str) -> bool:
        try:
            from duboko.train.checkpoint import is_layout_file

            return (name in REWRITTEN or is_layout_file(name)) and (run_dir / name).stat().st_mtime_ns > manifest_time
        except OSError:
            return False

    def written_by_killed_run(name: str) -> bool:
        return killed_run_ok and newer_checkpoint_file(name)

    # What a run killed between rewriting its checkpoint files and its manifest looks like to a
    # load: the message says so, and that a resume finishes it.
    killed_hint = " (or the run was killed mid-checkpoint: `duboko train --resume` finishes it)"

    if missing and not all(written_by_killed_run(n) for n in missing):
        raise DubokoError(
            f"{run_dir / MANIFEST} does not list {', '.join(missing)}; every file a load reads must be listed "
            "(the run folder is incomplete or its manifest was edited)"
        )
    unlisted = sorted(
        p.name for p in run_dir.iterdir()
        if p.suffix in LOADED_SUFFIXES and p.name != MANIFEST and not p.name.startswith(".")
        and p.name not in listed and not written_by_killed_run(p.name)
    )
    if unlisted:
        killed = all(newer_checkpoint_file(n) for n in unlisted)
        raise DubokoError(
            f"{run_dir} holds {', '.join(unlisted[:5])}, not listed in {MANIFEST}; a load could read it "
            "unchecked (" + ("or the run was killed before its manifest was rewritten: `duboko train --resume`, with "
                             "more train.max_steps or train.epochs if its training was done, rewrites it"
                             if killed else "remove it, or retrain the run") + ")"
        )
    for name, digest in listed.items():
        file = run_dir / name
        try:
            info = file.lstat()
        except FileNotFoundError:
            if written_by_killed_run(name):
                continue
            raise DubokoError(f"{file} is missing (listed in {MANIFEST})") from None
        if not stat.S_ISREG(info.st_mode):
            # A FIFO would hang the hash, a device never end, a symlink point anywhere.
            raise DubokoError(f"{file} is not a regular file (a link, folder, device or FIFO); expected a file")
        if sha256_file(file) != digest and not written_by_killed_run(name):
            # A run killed between a checkpoint and the manifest's rewrite also lands here.
            hint = killed_hint if name == "state.safetensors" or newer_checkpoint_file(name) else ""
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
    from duboko.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    if verify:  # before config.json (or anything else) is parsed
        if not run_dir.is_dir():
            raise DubokoError(f"run folder {str(run_dir)!r} does not exist")
        verify_manifest(run_dir, required=(CONFIG, ckpt.weights_entry(run_dir)))
    cfg = load_config(run_dir, data_dir=data_dir)
    dev = pick_device(device)
    task = registry.get_task(cfg.task)(cfg, dev)
    if setup_task:
        task.setup(run_dir)
    model_cfg = dict(cfg.model)
    model = registry.build_model(model_cfg.pop("name"), model_cfg)
    state = ckpt.load_weights(run_dir)  # model.safetensors, or the sharded layout's index + shards
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DubokoError(f"{run_dir / ckpt.weights_entry(run_dir)} does not fit model {cfg.model['name']!r}: {str(exc).splitlines()[0]}") from exc
    model.to(dev).eval()
    return LoadedRun(cfg, task, model, dev, run_dir)


def evaluate_run(loaded: LoadedRun, write_files: bool = True) -> tuple[dict[str, Any], str]:
    """`duboko eval`: the validation metrics (val_*) and the task's final metrics of a loaded
    run, and its text report; the task's pictures go into the run folder when `write_files`."""
    from duboko.train.lock import RunLock

    val = {f"val_{k}": v for k, v in loaded.task.evaluate(loaded.model, "val").items()}
    history = read_history(loaded.run_dir)
    if write_files:  # the pictures go into the run folder: one writer at a time
        with RunLock.acquire(loaded.run_dir):
            evaluation = loaded.task.final_metrics(loaded.model, loaded.run_dir, history)
    else:
        evaluation = loaded.task.final_metrics(loaded.model, None, history)
    metrics = {"run": str(loaded.run_dir), "recipe": loaded.config.recipe, **val, **evaluation.metrics}
    return metrics, evaluation.report


def verify_resumable(run_dir: str | Path) -> None:
    """The check a resume makes before it parses anything: the manifest lists config.json and
    the training state, and they match (a run killed between a checkpoint and the manifest's
    rewrite is accepted: the resume finishes it)."""
    from duboko.train.checkpoint import STATE_FILE

    run_dir = Path(run_dir)
    if not (run_dir / STATE_FILE).exists():
        raise DubokoError(f"cannot resume: {run_dir / STATE_FILE} does not exist")
    verify_manifest(run_dir, required=(CONFIG, STATE_FILE), killed_run_ok=True)


def verify_init_source(source: str | Path, cfg: C.RunConfig | None = None) -> str:
    """The checks before a run reads anything of its `train.init_from` run folder: the folder
    exists and its manifest verifies (every file against its SHA-256, config.json and the
    weights listed); with the run's `cfg`, also that it is a run of the same task and, when the
    config recorded the manifest's hash, still that run. Returns the manifest's SHA-256."""
    source = Path(source)
    if not source.is_dir():
        raise DubokoError(f"train.init_from: run folder {str(source)!r} does not exist")
    try:
        from duboko.train.checkpoint import weights_entry

        verify_manifest(source, required=(CONFIG, weights_entry(source)))
    except DubokoError as exc:
        raise DubokoError(f"train.init_from: {exc}") from exc
    digest = sha256_file(source / MANIFEST)
    if cfg is None:
        return digest
    recorded = cfg.train.init_from_sha256
    if recorded and recorded != digest:
        raise DubokoError(
            f"train.init_from: the manifest of {str(source)!r} hashes to {digest[:16]}…, not the {recorded[:16]}… "
            "this config recorded: the source run changed since (resolve the recipe again to start from it as it is)"
        )
    raw = read_json(source / CONFIG)
    task = raw.get("task") if isinstance(raw, dict) else None
    if not C.same_task_family(task, cfg.task):
        raise DubokoError(f"train.init_from {str(source)!r} is a {task!r} run; this run trains task {cfg.task!r}: "
                          "a run starts only from the weights of a run of its own task family")
    return digest


def load_init_weights(source: str | Path, model: nn.Module) -> None:
    """Copy the weights of the (verified) run folder `source` into `model`: safetensors only;
    every tensor of the model must be there with its shape (the error names the tensor, the
    expected and the received shape), and no other tensor may be."""
    from duboko.train import checkpoint as ckpt

    path = Path(source) / ckpt.weights_entry(source)
    state = ckpt.load_weights(source)  # either layout
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DubokoError(f"train.init_from: {path} has no tensor {missing[0]!r}{more}, which the model needs")
    extra = [k for k in state if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DubokoError(f"train.init_from: {path} holds tensor {extra[0]!r}{more}, which the model does not have")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise DubokoError(f"train.init_from: tensor {key!r} of {path} has shape {tuple(got.shape)}, "
                              f"the model expects {tuple(want.shape)}")
        if got.dtype.is_floating_point != want.dtype.is_floating_point:
            raise DubokoError(f"train.init_from: tensor {key!r} of {path} is {got.dtype}, the model expects {want.dtype}")
    model.load_state_dict(state)


# `--overwrite` sets the old run aside in `.NAME.overwritten-PID` (the set-aside is complete: the
# run folder holds the new run's files only) and moves it there through `.NAME.overwriting-PID`
# (the old run is on its way out, or back in: the run folder holds old-run files only, since the
# new run writes nothing before the set-aside is complete and nothing after its put-back began).
# The name says which files in the run folder are whose, so a SIGKILL at any point is settled
# without guessing (`recover_interrupted_overwrite`).
OVERWRITTEN_INFIX = ".overwritten-"
MOVING_INFIX = ".overwriting-"


def overwrite_leftovers(run_dir: str | Path) -> list[Path]:
    """The `.NAME.overwritten-PID` and `.NAME.overwriting-PID` folders beside `run_dir` (newest
    first): an `--overwrite` run killed with SIGKILL (no `finally`) leaves its old run set aside there."""
    import glob

    run_dir = Path(run_dir)
    found = []
    for infix in (OVERWRITTEN_INFIX, MOVING_INFIX):
        prefix = f".{run_dir.name}{infix}"
        found += [Path(p) for p in glob.glob(str(run_dir.parent / glob.escape(prefix)) + "*")
                  if Path(p).name.removeprefix(prefix).isdigit()]
    found = [p for p in found if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def moving_name(backup: Path) -> Path:
    """The `.NAME.overwriting-PID` name of the set-aside folder `.NAME.overwritten-PID`."""
    head, _, pid = backup.name.rpartition(OVERWRITTEN_INFIX)
    if not head or not pid.isdigit():
        raise DubokoError(f"{backup} is not a set-aside folder (expected .NAME{OVERWRITTEN_INFIX}PID)")
    return backup.with_name(f"{head}{MOVING_INFIX}{pid}")


def move_back(moving: Path, run_dir: Path) -> None:
    """Move every entry of the `.NAME.overwriting-PID` folder `moving` into `run_dir`, then
    remove it. The run folder holds old-run files only then, so no name is in both; one that is
    (a folder changed by hand) is refused rather than replaced: nothing of either is lost."""
    for entry in moving.iterdir():
        target = run_dir / entry.name
        if target.exists() or target.is_symlink():
            raise DubokoError(f"cannot put back {entry}: {target} exists as well (expected only one of them); "
                              f"keep the one you want and move it into {run_dir} by hand")
        entry.rename(target)
    moving.rmdir()


def put_back_set_aside(run_dir: Path, backup: Path, *, all_new: bool) -> None:
    """Replace the new run in `run_dir` with the old run set aside (complete) in `backup`:
    remove the new run's files, rename `backup` to its `.overwriting-` name, move its files back.

    `all_new`: every entry of `run_dir` but the lock is the new run's (the live run settling its
    own set-aside). Else (a leftover) only the names the old run also had and entries written
    since the set-aside ended (at or after its folder's last change) are removed: a leftover of
    an older duboko, which named a half-done set-aside `.overwritten-` too, still has old files
    in `run_dir`, and they stay."""
    import shutil

    from duboko.train.lock import LOCK_FILE

    set_aside_until = backup.stat().st_mtime_ns
    old_names = {entry.name for entry in backup.iterdir()}
    entries = [e for e in run_dir.iterdir() if e.name != LOCK_FILE
               and (all_new or e.name in old_names or e.lstat().st_mtime_ns >= set_aside_until)]
    # The manifest first: a kill during the removal leaves no run in `run_dir` that looks like
    # a checkpoint of its own, so the next settle puts the old run back as well.
    entries.sort(key=lambda e: e.name != MANIFEST)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    moving = moving_name(backup)
    if moving.exists() or moving.is_symlink():
        raise DubokoError(f"cannot put back the previous run from {backup}: {moving} exists as well")
    backup.rename(moving)
    move_back(moving, run_dir)


def _has_own_checkpoint(run_dir: Path) -> bool:
    from duboko.train.checkpoint import STATE_FILE

    if not ((run_dir / STATE_FILE).is_file() and (run_dir / MANIFEST).is_file()):
        return False
    try:
        verify_manifest(run_dir, required=(CONFIG, STATE_FILE), killed_run_ok=True)
    except DubokoError:
        return False
    return True


def recover_interrupted_overwrite(run_dir: str | Path) -> list[str]:
    """Settle what a killed `--overwrite` left beside `run_dir`; the caller holds the run
    folder's lock, so no live writer owns those leftovers (a live `--overwrite` holds the lock
    from before it sets the old run aside until it has settled). Returns one line per leftover.

    - `.NAME.overwriting-PID` (killed while the old run was set aside, or put back): the run
      folder holds old files only; the rest of the old run is moved back beside them;
    - `.NAME.overwritten-PID` and the new run in `run_dir` has a checkpoint of its own (state +
      manifest that verify, as a resume checks them): it replaced the old run, whose set-aside
      copy is deleted (the engine does so itself right after that first checkpoint: a kill
      between the two lands here);
    - else the old run is put back whole (`put_back_set_aside`): the new run's partial files go."""
    import shutil

    run_dir = Path(run_dir)
    notes = []
    for backup in overwrite_leftovers(run_dir):
        try:
            if MOVING_INFIX in backup.name:
                move_back(backup, run_dir)
                notes.append(f"put back the previous run in {run_dir} from {backup.name}: an --overwrite was "
                             "interrupted while it moved the previous run aside (or back)")
                continue
            if _has_own_checkpoint(run_dir):
                shutil.rmtree(backup, ignore_errors=True)
                notes.append(f"removed {backup.name}, the previous run set aside by an interrupted --overwrite "
                             f"(the new run in {run_dir} has its own checkpoint)")
                continue
            put_back_set_aside(run_dir, backup, all_new=False)
        except OSError as exc:
            raise DubokoError(f"cannot put back the previous run from {backup} after an interrupted --overwrite: "
                              f"{exc.strerror or exc}; move its files into {run_dir} by hand") from exc
        notes.append(f"put back the previous run in {run_dir} from {backup.name}: an --overwrite was interrupted "
                     "before the new run's first checkpoint")
    return notes
