"""torch.distributed glue: read torchrun's environment, init the process group, reduce stats,
wrap the model for the strategy (DDP or FSDP2) and move whole state dicts in and out of it.

Nothing home-made: ranks, rendezvous, gradient all-reduce and sharding are PyTorch's (torchrun,
DDP, `torch.distributed.fsdp.fully_shard`, and `torch.distributed.checkpoint.state_dict`'s
helpers for full state dicts; DCP's own file format, which pickles metadata, is never used).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
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
    if not info.enabled or not values:
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


# -- strategies --------------------------------------------------------------------------------
def _repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The members of every `nn.ModuleList` (transformer blocks, U-Net stages, RNN layers), the
    outermost lists first: each becomes its own FSDP unit, so only one block's full parameters
    exist at a time during forward and backward."""
    blocks: list[torch.nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for child in module:
                # A list inside an already chosen block stays part of that block's unit.
                if id(child) not in seen and not any(_contains(b, child) for b in blocks):
                    blocks.append(child)
                    seen.add(id(child))
    return blocks


def _contains(parent: torch.nn.Module, child: torch.nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def fully_shard_model(model: torch.nn.Module, device: torch.device, precision: str, cpu_offload: bool) -> torch.nn.Module:
    """FSDP2: `fully_shard` each repeated block, then the whole model (which gathers what is left:
    embeddings, heads, final norms). Parameters become DTensors sharded on dim 0 over the ranks
    (each rank holds ~1/W of them); the optimizer must be built afterwards, on these parameters.
    bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32 (the fp32
    master weights stay sharded). CPU offload (cuda only) keeps shards and optimizer state in host
    memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload and device.type == "cuda":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # Blocks that return views (attention's (k, v) for the cache) make FSDP2 warn that an in-place
    # op on them would skip its hook; duboko's models use out-of-place residuals, and
    # tests/test_train_fsdp.py checks the sharded losses against a single process.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in _repeated_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameters this rank holds: its shards under FSDP (DTensor.to_local), everything else."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def all_gather_int(value: int, info: DistInfo, device: torch.device) -> list[int]:
    if not info.enabled:
        return [value]
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: on all but the last micro-batch the ranks keep their gradients to
    themselves (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`); the last backward
    reduces the accumulated sum once. Without a process group there is nothing to skip."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if sync:
        if is_sharded(inner):
            inner.set_requires_gradient_sync(True)
        yield
    elif hasattr(inner, "no_sync"):  # DistributedDataParallel
        with inner.no_sync():
            yield
    elif is_sharded(inner):
        inner.set_requires_gradient_sync(False)
        yield
    else:
        yield


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered (a collective under FSDP: every rank calls it);
    the values on rank 0 only, in CPU memory (other ranks get {}). A plain or DDP model: its own."""
    if not is_sharded(model):
        return getattr(model, "module", model).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict; under FSDP every rank passes the full dict and keeps
    its own shard of each tensor (`_shard_like`, no communication), so a state saved on any world
    size loads on any other."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    own = model.state_dict()
    model.load_state_dict({k: _shard_like(v, own[k]) if k in own else v for k, v in state.items()})


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut as `like` (a DTensor shard: same mesh and placements), from this rank's own
    copy of `full` (src_data_rank=None: no scatter from rank 0), or `full` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or full.shape != like.shape:
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's `state_dict()` with whole tensors, keyed by parameter index as torch's own
    (a collective under FSDP; values on rank 0 only). FSDP's helper keys it by parameter name:
    the names are turned back into the indices of the optimizer's parameter order, so the file is
    the same for DDP and FSDP and either resumes the other."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not named:
        return {}
    index = _name_to_index(model, optimizer)
    groups = []
    for group in named["param_groups"]:
        groups.append({**group, "params": [index[name] for name in group["params"]]})
    return {"state": {index[name]: value for name, value in named["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state`: every rank passes the whole index-keyed state and
    keeps, of each moment shaped like its parameter, the parameter's shard."""
    if is_sharded(model):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {**state, "state": {
            i: {k: _shard_like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in entry.items()}
            for i, entry in state["state"].items()}}
    optimizer.load_state_dict(state)


def _name_to_index(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter name -> its index in the optimizer's parameter order (torch's state_dict keys)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {by_id[id(p)]: i for i, p in enumerate(params)}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor read from a checkpoint) as this rank's piece of `like`: its FSDP
    shard when `like` is one, else `full` (public name of `_shard_like`, for streamed loads)."""
    return _shard_like(full, like)


@torch.no_grad()
def gather_into(plain: torch.nn.Module | None, model: torch.nn.Module) -> None:
    """Copy a sharded model's weights into `plain` (an unsharded copy, on the main rank; None
    elsewhere) one tensor at a time: each FSDP shard is all-gathered (a collective: every rank
    calls this) and copied, so the main rank holds `plain` plus one whole tensor, not a second
    whole state dict as `full_model_state` + `load_state_dict` would."""
    target = plain.state_dict() if plain is not None else None
    for name, tensor in model.state_dict().items():  # the same order on every rank
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if target is not None:
            if name not in target:
                raise KeyError(f"{name} is not in the unsharded model")
            target[name].copy_(whole)
        del whole
