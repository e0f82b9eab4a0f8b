"""The batching rules every task shares: epoch order, batch count, rank slices, fixed splits.

One rule for distributed training, used by every task: **the global batch is the same for any
world size, and rank r of W takes every W-th item of it** (items r, r + W, r + 2W, ...). So one
process and N ranks see the same samples in the same global batches, and a run's data does not
depend on how many processes train it; only which rank holds which item does.

Every random draw here is a pure function of the recipe's seed and of where it happens (epoch,
batch index), through `duboko.seeding`: a resumed run skips the batches it has seen without
replaying them, and every rank draws the same permutation.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

from duboko.seeding import generator

T = TypeVar("T")


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches in an epoch of `n` items: ceil(n / batch_size).

    Under W > 1 ranks a last batch with fewer than W items is dropped: it would leave some ranks
    an empty batch (a NaN mean loss, or a rank that skips a step and hangs the others). With one
    process nothing is ever dropped."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = math.ceil(n / batch_size)
    if world_size > 1 and 0 < n % batch_size < world_size:
        count -= 1
    return count


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The order (n,) int64 of the training items in `epoch`, drawn on `device` from
    `generator(seed, epoch)` (the same on every rank; CPU and CUDA draws differ, so a task keeps
    drawing on the device it always drew on)."""
    return torch.randperm(n, generator=generator(seed, epoch, device=device), device=device)


def batch_slice(order: T, index: int, batch_size: int) -> T:
    """Global batch `index` of an epoch's `order` (a tensor or a list): items
    [index·batch_size, (index + 1)·batch_size); the last batch may be shorter."""
    return order[index * batch_size : (index + 1) * batch_size]


def rank_slice(x: T, rank: int, world_size: int, dim: int = 0) -> T:
    """This rank's share of a global batch: every `world_size`-th item along `dim`, starting at
    `rank` (a tensor along any dim, or a list along its only one). Concatenating the ranks'
    slices gives back every item once; with world_size 1 it is `x` itself."""
    if world_size == 1:
        return x
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if dim == 0:
        return x[rank::world_size]
    index = (slice(None),) * dim + (slice(rank, None, world_size),)
    return x[index]


def fixed_split(n: int, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random train/validation split of `n` items: (train (n - n_val,), val (n_val,))
    int64 indices from one permutation drawn with `generator(seed)`, so it depends on nothing but
    `n`, `n_val` and `seed` (the same for every run, rank and train.seed). Train keeps the
    permutation's order."""
    if not 0 <= n_val <= n:
        raise ValueError(f"n_val must be in [0, {n}], got {n_val}")
    perm = torch.randperm(n, generator=generator(seed))
    return perm[n_val:], perm[:n_val]
