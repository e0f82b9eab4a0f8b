"""Training state for exact resume, in ONE safetensors file written atomically.

`state.safetensors` holds the tensors (raw model weights, optimizer moments, EMA weights, each
rank's torch RNG state) and, in its JSON metadata header, everything else (step, epoch, position
inside the epoch in global samples and batches, running epoch sums, history, optimizer hyper-parameters, Python/NumPy RNG
states). One file means one atomic rename: a crash during a save leaves the previous state whole.
Nothing is ever unpickled. Under FSDP the sharded weights and optimizer state are gathered to
rank 0 for the save (whole tensors, the same file as DDP's), and every rank loads the whole file
and keeps its own shard: a state saved on N ranks resumes on any M.

`train.checkpoint_layout = sharded` (auto: FSDP runs above SHARD_THRESHOLD_BYTES) writes the
Hugging Face sharded-safetensors layout instead (see the second half of this file): each rank
writes the whole tensors it owns, nothing is gathered to rank 0, and loading still reshards to
any world size.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.io import atomic_write_json, load_tensors, save_tensors

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


def _load_head(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`state.safetensors`: its tensors (all of them, or the RNG states of a sharded state) and
    its JSON state."""
    from safetensors import safe_open

    path = Path(run_dir) / STATE_FILE
    tensors = load_tensors(path, device="cpu")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("duboko_state")
    if raw is None:
        raise DubokoError(f"{path} holds no duboko training state")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise DubokoError(f"{path} holds no duboko training state (its metadata is not an object)")
    return tensors, meta


def load_state(run_dir: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole saved state of either layout, every tensor in memory (tests, small runs; a
    resume reads a sharded state lazily through `SavedState`)."""
    with SavedState(run_dir) as saved:
        tensors = {name: saved.get(name) for name in saved.names()}
        tensors.update(saved.rng)
        return tensors, saved.meta


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


# ---------------------------------------------------------------------------------------------
# The sharded layout (Hugging Face's sharded safetensors): per-rank shards written by the ranks
# that own them, an index, and loading that reshards to any world size.
#
#   model-00001-of-0000N.safetensors ...   the weights, whole tensors, each file written by one rank
#   model.safetensors.index.json           {"metadata": {"total_size": bytes, ...}, "weight_map": {name: file}}
#   state-00001-of-0000N.safetensors ...   the training state's tensors (model/, optim/, ema/), likewise
#   state.safetensors                      the head: RNG states, the JSON state (step, position, ...) and
#                                          the state shards' map and SHA-256 digests, written LAST
#
# The weights follow Hugging Face exactly (transformers' `load_sharded_checkpoint` reads them).
# The state's index lives in the head rather than in a `state.safetensors.index.json`: the head's
# one atomic rename is then the commit point of the whole state (a crash before it leaves the
# previous head, which names the previous shards), and every existing check of `state.safetensors`
# (resume, --overwrite, the manifest) keeps working for both layouts.
#
# No rank ever holds the whole model: tensors are assigned to ranks in contiguous runs of equal
# bytes, and each one is all-gathered (DTensor.full_tensor, one collective) and streamed straight
# into its owner's file, so a rank's peak is its own FSDP shards plus ONE whole tensor.

WEIGHTS_FILE = "model.safetensors"  # = duboko.train.run.WEIGHTS (run imports this module lazily)
WEIGHTS_INDEX = "model.safetensors.index.json"
# auto: sharded under FSDP once the parameters plus the optimizer state reach this many bytes
# (gathering them to rank 0 would then cost rank 0 that much memory, on top of its shard).
SHARD_THRESHOLD_BYTES = 256 * 2**20
LAYOUTS = ("auto", "full", "sharded")
MAX_INDEX_BYTES = 32 * 2**20  # a weight map of ~100k names is ~10 MB
MAX_SHARDS = 99_999  # five digits, as Hugging Face numbers them
SHARD_PATTERN = re.compile(r"^(model|state)-(\d{5})-of-(\d{5})\.safetensors$")

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


def shard_name(kind: str, k: int, n: int) -> str:
    """`model-00001-of-00004.safetensors` (k counts from 1)."""
    return f"{kind}-{k:05d}-of-{n:05d}.safetensors"


def is_layout_file(name: str) -> bool:
    """A file of the sharded layout: a shard or the weights' index."""
    return name == WEIGHTS_INDEX or SHARD_PATTERN.match(name) is not None


def layout_files(run_dir: Path) -> list[str]:
    """The sharded layout's files present in `run_dir` (sorted): what the manifest must list."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if is_layout_file(p.name))


def _global_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is the whole tensor's


def state_nbytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the whole parameters and optimizer state (all ranks' shards together)."""
    total = sum(_global_nbytes(p) for p in model.parameters())
    for entry in optimizer.state.values():
        total += sum(_global_nbytes(v) for v in entry.values() if isinstance(v, torch.Tensor))
    return total


def choose_layout(setting: str, strategy: str, world_size: int, nbytes: int) -> str:
    """`train.checkpoint_layout` resolved: "full" (one file, gathered to rank 0) or "sharded".
    auto: sharded when the model is FSDP-sharded over several ranks and its parameters plus
    optimizer state reach SHARD_THRESHOLD_BYTES, else full."""
    if setting not in LAYOUTS:
        raise DubokoError(f"unknown train.checkpoint_layout {setting!r}; expected one of {', '.join(LAYOUTS)}")
    if setting != "auto":
        return setting
    return "sharded" if strategy == "fsdp" and world_size > 1 and nbytes >= SHARD_THRESHOLD_BYTES else "full"


def trainer_layout(trainer: Any) -> str:
    """A Trainer's layout, decided once (auto: from the size of its parameters and optimizer
    state, which exists from the first step on) and kept as `trainer.checkpoint_layout`."""
    layout = getattr(trainer, "checkpoint_layout", None)
    if layout is None:
        tcfg = trainer.cfg.train
        layout = choose_layout(getattr(tcfg, "checkpoint_layout", "auto"), tcfg.strategy, trainer.dist.world_size,
                               state_nbytes(trainer.model, trainer.optimizer))
        trainer.checkpoint_layout = layout
    return layout


def assign_owners(sizes: list[tuple[str, int]], world_size: int) -> dict[str, int]:
    """name -> owning rank: consecutive tensors in runs of about total/world_size bytes each
    (a tensor goes to the rank its middle byte falls in), the same on every rank."""
    total = sum(n for _, n in sizes) or 1
    owners, before = {}, 0
    for name, n in sizes:
        owners[name] = min(world_size - 1, (before + n // 2) * world_size // total)
        before += n
    return owners


def _header(tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """A safetensors header for (name, tensor) in file order (DTensors: their whole shape), and
    the data size. Format: 8-byte little-endian header length, the JSON header (padded with
    spaces to 8 bytes), then each tensor's bytes, C order, at its data_offsets."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, t in tensors:
        if t.dtype not in _DTYPES:
            raise DubokoError(f"cannot save tensor {name!r}: dtype {t.dtype} has no safetensors name")
        n = _global_nbytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank calls it, in the same
    order), or the tensor itself."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def write_shards(run_dir: Path, kind: str, tensors: dict[str, torch.Tensor], rank: int, world_size: int,
                 metadata: dict[str, str] | None = None) -> tuple[dict[str, str], dict[int, str], str | None, str | None]:
    """Every rank calls this with the same names (FSDP shards as DTensors, anything else whole):
    each tensor is gathered, one at a time, and streamed by its owner into the owner's file under
    a hidden temporary name (`.NAME.PID.tmp`, fsynced). Returns (weight_map name -> file name,
    rank -> file name, this rank's temporary path, its SHA-256), the last two None for a rank
    that owns nothing (it writes no file)."""
    import hashlib

    names = sorted(tensors)
    owners = assign_owners([(k, _global_nbytes(tensors[k])) for k in names], world_size)
    used = sorted(set(owners.values()))  # ranks that own at least one tensor, numbered in order
    files = {r: shard_name(kind, i + 1, len(used)) for i, r in enumerate(used)}
    weight_map = {k: files[owners[k]] for k in names}
    mine = [(k, tensors[k]) for k in names if owners[k] == rank]
    tmp, f, digest = None, None, hashlib.sha256()
    if mine:
        tmp = Path(run_dir) / f".{files[rank]}.{os.getpid()}.tmp"
        head, _ = _header(mine, metadata)
        f = open(tmp, "wb")
        f.write(head)
        digest.update(head)
    try:
        for name in names:  # the same order on every rank: each gather is one collective
            whole = _whole(tensors[name].detach())
            if owners[name] == rank:
                data = whole.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
                f.write(memoryview(data))
                digest.update(memoryview(data))
                del data
            del whole
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if f is not None:
            f.close()
            f = None
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if f is not None:
            f.close()
    return weight_map, files, (str(tmp) if mine else None), (digest.hexdigest() if mine else None)


def save_shards(run_dir: Path, kind: str, tensors: dict[str, torch.Tensor], info: Any,
                metadata: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """All ranks: `write_shards`, then, once every rank has written (a barrier), each renames its
    own file into place; returns (weight_map, file name -> SHA-256) on every rank. The caller
    then writes the index (rank 0) and removes stale shards."""
    import torch.distributed as dist

    weight_map, files, tmp, digest = write_shards(run_dir, kind, tensors, info.rank, info.world_size, metadata)
    mine = torch.zeros(33, dtype=torch.int64)  # has-a-file flag, then the 32 digest bytes
    if digest is not None:
        mine[0] = 1
        mine[1:] = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64)
    gathered = [mine]
    if info.enabled:
        gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
        dist.all_gather(gathered, mine)  # also the barrier: every rank's file is written
    digests = {files[r]: bytes(g[1:].tolist()).hex() for r, g in enumerate(gathered) if g[0] == 1}
    if set(digests) != set(files.values()):
        raise DubokoError(f"the sharded save of {kind} lost a shard: written {sorted(digests)}, expected {sorted(files.values())}")
    if tmp is not None:
        os.replace(tmp, Path(run_dir) / files[info.rank])
    if info.enabled:
        dist.barrier()  # every shard renamed before the index or head names them
    return weight_map, digests


def remove_stale(run_dir: Path, kind: str, keep: set[str]) -> None:
    """Delete `kind` shards not in `keep` (a previous save on another world size); with an empty
    `keep` the kind's sharded files go entirely (the index too, for the weights)."""
    for name in layout_files(run_dir):
        match = SHARD_PATTERN.match(name)
        stale = (match is not None and match.group(1) == kind and name not in keep) or (
            kind == "model" and name == WEIGHTS_INDEX and not keep)
        if stale:
            (Path(run_dir) / name).unlink(missing_ok=True)


def write_weights_index(run_dir: Path, weight_map: dict[str, str], total_size: int, metadata: dict[str, Any]) -> None:
    """Hugging Face's `model.safetensors.index.json`, written atomically, after every shard."""
    atomic_write_json(Path(run_dir) / WEIGHTS_INDEX, {"metadata": {"total_size": total_size, **metadata},
                                                      "weight_map": weight_map})


# -- reading ------------------------------------------------------------------------------------
def _check_shard_names(where: Path, weight_map: Any, kind: str) -> dict[str, str]:
    if not isinstance(weight_map, dict) or not weight_map:
        raise DubokoError(f"{where}: \"weight_map\" must be a non-empty {{tensor name: file name}} object")
    files = set()
    for name, file in weight_map.items():
        if not isinstance(name, str) or not isinstance(file, str):
            raise DubokoError(f"{where}: weight_map entries must be strings, got {name!r}: {file!r}")
        match = SHARD_PATTERN.match(file)
        if match is None or match.group(1) != kind:
            raise DubokoError(f"{where} names {file[:200]!r} for {name[:200]!r}; expected a file of this folder named "
                              f"{kind}-NNNNN-of-NNNNN.safetensors (no paths)")
        files.add(file)
    counts = {SHARD_PATTERN.match(f).group(3) for f in files}
    if len(counts) != 1 or int(next(iter(counts))) != len(files) or len(files) > MAX_SHARDS:
        raise DubokoError(f"{where} names {len(files)} shard files that do not form one set of "
                          f"{kind}-0000k-of-0000N ({', '.join(sorted(files)[:4])})")
    return weight_map


def read_weights_index(run_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The weights' index, validated: a bounded JSON file whose weight_map names only shard files
    of this folder (no paths), one complete set, and a total_size that fits duboko's bounds."""
    from duboko.io import MAX_TENSOR_BYTES, read_json

    path = Path(run_dir) / WEIGHTS_INDEX
    index = read_json(path, max_bytes=MAX_INDEX_BYTES)
    if not isinstance(index, dict):
        raise DubokoError(f"{path} is not a safetensors index (expected {{\"metadata\", \"weight_map\"}})")
    weight_map = _check_shard_names(path, index.get("weight_map"), "model")
    metadata = index.get("metadata", {})
    size = metadata.get("total_size") if isinstance(metadata, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_TENSOR_BYTES:
        raise DubokoError(f"{path}: metadata.total_size must be a number of bytes in [0, {MAX_TENSOR_BYTES}], got {size!r}")
    return weight_map, metadata


class ShardReader:
    """Lazy reads of tensors from a set of shard files (safetensors' `safe_open`: a tensor is
    read when asked for). Opening checks each file: a regular file of the folder (no link), not a
    pickle, valid safetensors, holding exactly the tensors the map assigns to it, and, when the
    map came with digests, matching its SHA-256 (a set mixed from two saves is refused)."""

    def __init__(self, run_dir: Path, weight_map: dict[str, str], where: Path, digests: dict[str, str] | None = None):
        import stat as stat_mod

        from safetensors import safe_open

        from duboko.io import MAX_TENSOR_BYTES, looks_like_pickle, sha256_file

        self.weight_map, self.handles = weight_map, {}
        expected: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            expected.setdefault(file, set()).add(name)
        total = 0
        try:
            for file in sorted(expected):
                path = Path(run_dir) / file
                try:
                    info = path.lstat()
                except FileNotFoundError:
                    raise DubokoError(f"{where} names {file}, which is missing in {run_dir}") from None
                if not stat_mod.S_ISREG(info.st_mode):
                    raise DubokoError(f"{path} is not a regular file (a link, folder, device or FIFO); expected a shard")
                total += info.st_size
                if total > MAX_TENSOR_BYTES:
                    raise DubokoError(f"the shards named by {where} exceed {MAX_TENSOR_BYTES} bytes")
                with open(path, "rb") as f:
                    if looks_like_pickle(f.read(9)):
                        raise DubokoError(f"{path} is a pickle or a torch.save zip, which duboko never loads")
                if digests is not None and sha256_file(path) != digests.get(file):
                    raise DubokoError(f"{path} does not match the digest {where} recorded for it: the shards come "
                                      "from different saves (a save was interrupted); resume from an earlier copy")
                try:
                    handle = safe_open(str(path), framework="pt")
                    keys = set(handle.keys())
                except Exception as exc:  # safetensors raises several types for bad data
                    raise DubokoError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0][:200]})") from exc
                self.handles[file] = handle
                if keys != expected[file]:
                    missing, extra = sorted(expected[file] - keys), sorted(keys - expected[file])
                    detail = (f"lacks {', '.join(missing[:3])}" if missing else "") + (
                        ("; " if missing else "") + f"holds {', '.join(extra[:3])} not in the index" if extra else "")
                    raise DubokoError(f"{path} {detail} ({where} maps tensors to it that it does not match)")
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.weight_map[name]].get_tensor(name)

    def close(self) -> None:
        for handle in self.handles.values():
            if hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)
        self.handles = {}


def load_weights(run_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """THE loader of a run folder's weights, both layouts: `model.safetensors`, or the
    Hugging Face sharded layout (`model.safetensors.index.json` + its shards, read lazily, one
    shard file at a time). A folder with both is refused (one of them is stale). Call it after
    the manifest check (`verify_manifest`), which covers every shard and the index."""
    from duboko.io import load_tensors

    run_dir = Path(run_dir)
    index = run_dir / WEIGHTS_INDEX
    if not index.exists():
        return load_tensors(run_dir / WEIGHTS_FILE, device=device)
    if (run_dir / WEIGHTS_FILE).exists():
        raise DubokoError(f"{run_dir} holds both {WEIGHTS_FILE} and {WEIGHTS_INDEX}; one of them is stale "
                          "(remove the one that the run did not write last)")
    weight_map, _ = read_weights_index(run_dir)
    reader = ShardReader(run_dir, weight_map, index)
    try:
        return {name: reader.get(name).to(device) for name in reader.names()}
    finally:
        reader.close()


def weights_entry(run_dir: str | Path) -> str:
    """The file a load must find listed in the manifest: the index for a sharded folder."""
    return WEIGHTS_INDEX if (Path(run_dir) / WEIGHTS_INDEX).exists() else WEIGHTS_FILE


def weights_digest(run_dir: str | Path) -> str:
    """One SHA-256 for the weights of either layout (model.safetensors's own, or a digest of the
    index's and every shard's digests, in name order): what provenance records (ONNX export)."""
    import hashlib

    from duboko.io import sha256_file

    run_dir = Path(run_dir)
    if weights_entry(run_dir) == WEIGHTS_FILE:
        return sha256_file(run_dir / WEIGHTS_FILE)
    weight_map, _ = read_weights_index(run_dir)
    digest = hashlib.sha256()
    for name in [WEIGHTS_INDEX, *sorted(set(weight_map.values()))]:
        digest.update(f"{name}:{sha256_file(run_dir / name)}\n".encode())
    return digest.hexdigest()


class SavedState:
    """A saved training state of either layout, opened for a resume: `meta` (the JSON state),
    `rng` (rank -> torch RNG state, "cuda" -> CUDA's), `names()` and `get(name)` for the tensors
    (model/…, optim/…, ema/…). The full layout holds the whole file in memory, as before; the
    sharded one reads each tensor lazily from its shard."""

    def __init__(self, run_dir: Path):
        run_dir = Path(run_dir)
        tensors, meta = _load_head(run_dir)
        self.meta = meta
        self.rng = {k: v for k, v in tensors.items() if k.startswith("rng")}
        self._tensors = {k: v for k, v in tensors.items() if not k.startswith("rng")}
        self._reader: ShardReader | None = None
        shards = meta.get("shards")
        if meta.get("layout") == "sharded":
            if not isinstance(shards, dict) or not isinstance(shards.get("files"), dict):
                raise DubokoError(f"{run_dir / STATE_FILE} is a sharded state without its shard map")
            weight_map = _check_shard_names(run_dir / STATE_FILE, shards.get("weight_map"), "state")
            if set(shards["files"]) != set(weight_map.values()):
                raise DubokoError(f"{run_dir / STATE_FILE}: its shard digests and its weight map name different files")
            self._reader = ShardReader(run_dir, weight_map, run_dir / STATE_FILE, digests=shards["files"])

    def names(self) -> list[str]:
        return self._reader.names() if self._reader is not None else sorted(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._reader.get(name) if self._reader is not None else self._tensors[name]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> "SavedState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_state_head(run_dir: Path, *, meta: dict[str, Any], opt_meta: dict[str, Any], rank_rng: list[torch.Tensor],
                    weight_map: dict[str, str], digests: dict[str, str]) -> None:
    """The sharded state's head, `state.safetensors` (rank 0, after every shard is in place):
    the RNG states as tensors, and in the JSON metadata the state plus the shards' map and digests."""
    tensors = {f"rng/{rank}": state for rank, state in enumerate(rank_rng)}
    cuda_state = cuda_rng_state()
    if cuda_state is not None:
        tensors["rng_cuda/0"] = cuda_state
    full_meta = {**meta, "optimizer": opt_meta, "py_rng": py_rng_state(), "world_size": len(rank_rng),
                 "layout": "sharded", "shards": {"weight_map": weight_map, "files": digests}}
    save_tensors(tensors, run_dir / STATE_FILE, metadata={"duboko_state": json.dumps(full_meta)})


def save_sharded(run_dir: Path, info: Any, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: nn.Module | None, meta: dict[str, Any], rank_rng: list[torch.Tensor],
                 weights: nn.Module | None, model_config: dict[str, Any]) -> None:
    """The sharded layout's save (every rank calls it; `info` is the DistInfo): the state's
    tensors (model/, optim/, ema/), then, when `weights` is given (epoch ends), its state dict as
    the weights' shards, each file written by the rank that owns its tensors (`save_shards`:
    temporary names, renamed after a barrier). Then rank 0 writes the weights' index, the head
    (state.safetensors: the commit point of the state) and removes what earlier saves left (the
    full layout's model.safetensors, shards of another world size). The manifest is the caller's."""
    run_dir = Path(run_dir)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)  # FSDP: DTensor moments, index-keyed as torch's
    tensors.update(opt_tensors)
    if ema is not None:
        tensors.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
    state_map, state_digests = save_shards(run_dir, "state", tensors, info)
    del tensors, opt_tensors
    if weights is not None:
        plain = weights.state_dict()
        weight_map, _ = save_shards(run_dir, "model", plain, info, metadata={"format": "pt"})
        total = sum(_global_nbytes(v) for v in plain.values())
    if not info.is_main:
        return
    if weights is not None:
        write_weights_index(run_dir, weight_map, total, {
            "format": "duboko", "model": model_config["name"], "model_config": json.dumps(model_config)})
        (run_dir / WEIGHTS_FILE).unlink(missing_ok=True)  # the full layout's copy, now stale
        remove_stale(run_dir, "model", keep=set(weight_map.values()))
    save_state_head(run_dir, meta=meta, opt_meta=opt_meta, rank_rng=rank_rng, weight_map=state_map,
                    digests=state_digests)
    remove_stale(run_dir, "state", keep=set(state_digests))


def remove_sharded_leftovers(run_dir: Path) -> None:
    """After a full-layout save (rank 0): the state shards of an earlier sharded save, and its
    weight shards once model.safetensors replaces them, are stale copies; they go."""
    remove_stale(run_dir, "state", keep=set())
    if (Path(run_dir) / WEIGHTS_FILE).exists():
        remove_stale(run_dir, "model", keep=set())
