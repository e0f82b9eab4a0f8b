"""Training state for exact resume, in ONE safetensors file written atomically.

`state.safetensors` holds the tensors (raw model weights, optimizer moments, EMA weights, each
rank's torch RNG state) and, in its JSON metadata header, everything else (step, epoch, position
inside the epoch in global samples and batches, running epoch sums, history, optimizer hyper-parameters, Python/NumPy RNG
states). One file means one atomic rename: a crash during a save leaves the previous state whole.
Nothing is ever unpickled. Under FSDP the sharded weights and optimizer state are gathered to
rank 0 for the save (whole tensors, the same file as DDP's), and every rank loads the whole file
and keeps its own shard: a state saved on N ranks resumes on any M.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.io import load_tensors, save_tensors

STATE_FILE = "state.safetensors"


def cuda_rng_state() -> torch.Tensor | None:
    """This process's CUDA generator state (the CPU states come per rank, in `rank_rng`)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state()
    return None


def py_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_py_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_to_flat(optimizer: torch.optim.Optimizer | dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer (or its whole, index-keyed `state_dict()`) as tensors `optim/IDX/KEY` and
    JSON metadata (param groups, scalar entries)."""
    sd = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                              meta: dict[str, Any]) -> dict[str, Any]:
    """The whole `state_dict()` that `optimizer_to_flat` flattened (index-keyed, unsharded)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            param = params[int(idx)] if int(idx) < len(params) else None
            plain = param is not None and not hasattr(param, "to_local")  # not an FSDP shard (DTensor)
            if plain and value.shape == param.shape and value.dim() > 1:
                # Moments in the parameter's memory format (channels-last conv weights): torch's
                # fused Adam walks parameter and state as flat memory, so a state saved contiguous
                # would pair the wrong elements and silently corrupt the resumed run.
                value = torch.empty_like(param, dtype=value.dtype).copy_(value)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    # In parameter order, keys sorted: a file's tensors come back in no fixed order, and under
    # FSDP every rank must walk the state in the same order (gathering it is one collective per
    # tensor).
    state = {i: dict(sorted(state[i].items())) for i in sorted(state)}
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    optimizer.load_state_dict(optimizer_state_from_flat(optimizer, tensors, meta))


def save_state(
    run_dir: Path,
    *,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    ema: nn.Module | None,
    meta: dict[str, Any],
    rank_rng: list[torch.Tensor],
) -> None:
    """Write the state file. `model` and `optimizer` may be whole state dicts already gathered
    from an FSDP run (`duboko.train.distributed.full_model_state`): the file is the same for any
    strategy and world size, and loading reshards it."""
    model_state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    tensors.update(opt_tensors)
    if ema is not None:
        tensors.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
    for rank, state in enumerate(rank_rng):
        tensors[f"rng/{rank}"] = state
    cuda_state = cuda_rng_state()
    if cuda_state is not None:
        tensors["rng_cuda/0"] = cuda_state
    full_meta = {**meta, "optimizer": opt_meta, "py_rng": py_rng_state(), "world_size": len(rank_rng)}
    save_tensors(tensors, run_dir / STATE_FILE, metadata={"duboko_state": json.dumps(full_meta)})


def load_state(run_dir: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = run_dir / STATE_FILE
    tensors = load_tensors(path, device="cpu")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("duboko_state")
    if raw is None:
        raise DubokoError(f"{path} holds no duboko training state")
    return tensors, json.loads(raw)


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
