"""Check what comes from outside before duboko uses it: run folders and imported weights.

duboko itself never unpickles: run folders hold safetensors and JSON only, and every loader
refuses a pickle. A state dict saved with `torch.save` (for example by the primer's own code) is
converted once, by `import_weights`, with `torch.load(..., weights_only=True)`, PyTorch's
restricted unpickler that builds tensors and plain containers and refuses any other global (no
code runs). The output is a safetensors file that the rest of duboko can load.

- `verify_run(run_dir)`: every file in manifest.json matches its SHA-256, and the weight and
  state files are safetensors (never pickles); a sharded folder's index and state head name only
  listed shards of the folder, each holding exactly the tensors mapped to it.
- `load_run_of(run_dir, tasks)`: `load_run`, refusing a run of another task in one line.
- `read_torch_file` / `extract_state_dict` / `import_weights`: a .pt file in, safetensors out.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from duboko import registry
from duboko.errors import DubokoError
from duboko.io import looks_like_pickle, read_json, save_tensors, sha256_file
from duboko.train.lock import RunLock
from duboko.train.run import CONFIG, MANIFEST, LoadedRun, load_run, overwrite_leftovers, verify_manifest

# Keys under which training scripts commonly nest a state dict inside a checkpoint dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes added by DDP (`module.`) and torch.compile (`_orig_mod.`) to parameter names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Run folders.


def verify_run(run_dir: str | Path) -> dict[str, Any]:
    """Manifest check plus: the listed safetensors files parse as safetensors (no pickle).
    Returns {"run", "ok": True, "files": sorted listed names}; any problem is a DubokoError."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DubokoError(f"run folder {str(run_dir)!r} does not exist")
    if overwrite_leftovers(run_dir):
        # A killed `--overwrite` set the old run aside: taking the lock settles it (puts the old
        # run back, or deletes it once the new run has a checkpoint). A live one holds the lock:
        # its set-aside copy is its own, and the check below reports the folder as it is.
        try:
            RunLock.acquire(run_dir, command="duboko verify (settling an interrupted --overwrite)").release()
        except DubokoError:
            pass
    from duboko.train import checkpoint as ckpt

    # A sharded folder's load reads the weights' index (and the shards it names) instead.
    verify_manifest(run_dir, required=(CONFIG, ckpt.weights_entry(run_dir)))
    listed = read_json(run_dir / MANIFEST).get("sha256", {})
    if not isinstance(listed, dict) or not listed:
        raise DubokoError(f"{run_dir / MANIFEST} lists no files")
    for name in listed:
        if name.endswith(".safetensors"):
            path = run_dir / name
            with open(path, "rb") as f:
                head = f.read(9)
            if looks_like_pickle(head):
                raise DubokoError(f"{path} is a pickle or a torch.save zip, which duboko never loads")
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as exc:  # safetensors raises several types for bad data
                raise DubokoError(f"{path} is not a valid safetensors file ({_one_line(exc)})") from exc
    check_sharded_layout(run_dir, listed)
    return {"run": str(run_dir), "ok": True, "files": sorted(listed)}


def check_sharded_layout(run_dir: Path, listed: dict[str, str]) -> None:
    """The sharded layout (see duboko.train.checkpoint), after the manifest check: the weights'
    index and the state's head name only shard files of this folder that the manifest lists,
    and every shard holds exactly the tensors they map to it (the state's also its digests)."""
    from duboko.train import checkpoint as ckpt

    listed_names = set(listed)
    if ckpt.WEIGHTS_INDEX in listed_names:
        if ckpt.WEIGHTS_FILE in listed_names:
            raise DubokoError(f"{run_dir} lists both {ckpt.WEIGHTS_FILE} and {ckpt.WEIGHTS_INDEX}; one of them is stale")
        weight_map, _ = ckpt.read_weights_index(run_dir)
        _check_listed(run_dir, ckpt.WEIGHTS_INDEX, set(weight_map.values()), listed_names)
        ckpt.ShardReader(run_dir, weight_map, run_dir / ckpt.WEIGHTS_INDEX).close()
    if ckpt.STATE_FILE in listed_names:
        with ckpt.SavedState(run_dir) as saved:
            if saved.meta.get("layout") == "sharded":
                _check_listed(run_dir, ckpt.STATE_FILE, set(saved.meta["shards"]["files"]), listed_names)


def _check_listed(run_dir: Path, by: str, files: set[str], listed: set[str]) -> None:
    unlisted = sorted(files - listed)
    if unlisted:
        raise DubokoError(f"{run_dir / by} names {', '.join(unlisted[:3])}, not listed in {MANIFEST} "
                          "(the folder was changed after the run wrote it)")


def load_run_of(run_dir: str | Path, tasks: tuple[str, ...], device: str = "auto") -> LoadedRun:
    """`load_run`, for commands that work with runs of some tasks only (e.g. ("seq2seq",)):
    a run of another task is refused with one line naming what was expected."""
    loaded = load_run(run_dir, device=device)
    if loaded.config.task not in tasks:
        raise DubokoError(f"{run_dir} is a {loaded.config.task!r} run; expected a {' or '.join(tasks)} run")
    return loaded


# ---------------------------------------------------------------------------------------------
# Importing a torch.save file.


def read_torch_file(src: str | Path) -> Any:
    """`torch.load(src, weights_only=True)` with every failure turned into one DubokoError line."""
    src = Path(src)
    if not src.is_file():
        raise DubokoError(f"{src} does not exist (expected a .pt file written by torch.save)")
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # PyTorch's message is many lines; its first names the refused global.
        detail = _one_line(exc).removeprefix("Weights only load failed.").strip() or "a forbidden object"
        raise DubokoError(
            f"refused {src}: it holds more than tensors and plain containers, and loading it could run code "
            f"({detail[:200]}); only state dicts of tensors are imported"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, KeyError) as exc:
        raise DubokoError(f"{src} is not a readable torch.save file ({_one_line(exc)[:200]})") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, src: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in what `read_torch_file` returned: `obj[key]` when a key is given, else
    `obj` itself or the first of NESTED_KEYS that holds one; DDP / torch.compile prefixes are
    stripped from the names. `src` only names the file in errors."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else []
            raise DubokoError(f"{src} has no key {key!r}; its top-level keys: {', '.join(keys) or '(not a dict)'}")
        obj = obj[key]
    elif not _is_state_dict(obj) and isinstance(obj, dict):
        for k in NESTED_KEYS:
            if _is_state_dict(obj.get(k)):
                obj = obj[k]
                break
    if not _is_state_dict(obj):
        what = f"a dict with keys {', '.join(sorted(map(str, obj))[:10])}" if isinstance(obj, dict) else type(obj).__name__
        raise DubokoError(f"{src} holds {what}, not a state dict of named tensors; choose the entry that holds one with key=NAME")
    out = {}
    for name, tensor in obj.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = tensor
    return out


def check_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], src: str | Path, model_name: str) -> None:
    """`state` has exactly the names of `expected` (the model's state dict), the same shapes,
    and floating-point tensors where the model has them; else one line naming the first misfit."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else [])
        raise DubokoError(f"{src} does not fit model {model_name!r}: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise DubokoError(
                f"{src} does not fit model {model_name!r}: {k} has shape {tuple(state[k].shape)}, "
                f"the model expects {tuple(v.shape)} (set the model's config fields to match, e.g. image_size)"
            )
        if v.is_floating_point() and not state[k].is_floating_point():
            raise DubokoError(f"{src}: {k} is {state[k].dtype}, expected a floating-point tensor")


@dataclasses.dataclass
class ImportedWeights:
    tensors: int  # state-dict entries taken from the file
    values: int  # numbers in the model's state dict


def import_weights(
    src: str | Path, out: str | Path, model_name: str, overrides: dict[str, Any] | None = None, key: str | None = None
) -> ImportedWeights:
    """Read the state dict in `src` (a torch.save file; `key` picks it from a checkpoint dict),
    check that it fits the registered model `model_name` built with `overrides`, and write the
    model's weights to `out` as safetensors, with the model config and the source's SHA-256 in
    the metadata."""
    src = Path(src)
    model = registry.create_model(model_name, **(overrides or {}))
    state = extract_state_dict(read_torch_file(src), src, key)
    check_fits(state, model.state_dict(), src, model_name)
    model.load_state_dict(state, strict=True)
    config = {"name": model_name, **dataclasses.asdict(model.config)}
    meta = {"model": model_name, "model_config": json.dumps(config), "format": "duboko",
            "imported_from": src.name, "source_sha256": sha256_file(src)}
    weights = model.state_dict()
    save_tensors(weights, out, metadata=meta)
    return ImportedWeights(len(state), sum(v.numel() for v in weights.values()))
