"""torch.distributed glue: read torchrun's environment, init the process group, reduce stats.

Nothing home-made: ranks, rendezvous and gradient all-reduce are PyTorch's (torchrun + DDP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0  # global rank
    local_rank: int = 0  # rank on this node (picks the GPU)
    world_size: int = 1  # processes in all

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def all_reduce_sum(values: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    if not info.enabled:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].double().reshape(()) for k in keys])
    dist.all_reduce(flat)
    return {k: flat[i] for i, k in enumerate(keys)}


def gather_rng(state: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's torch RNG state, on every rank (states have equal sizes)."""
    if not info.enabled:
        return [state]
    out = [torch.empty_like(state) for _ in range(info.world_size)]
    dist.all_gather(out, state)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def params_in_sync(model: torch.nn.Module, info: DistInfo, device: torch.device) -> bool:
    """Whether every rank holds bit-identical parameters and buffers: a SHA-256 of their bytes on
    each rank, all-gathered and compared (a collective: every rank must call it)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.tensor(list(digest.digest()), dtype=torch.int64, device=device)  # (32,)
    if not info.enabled:
        return True
    gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)
