"""The shared batching rules (duboko.data.batching): batch counts, epoch order, rank slices and the
fixed split, and that they reproduce the formulas the tasks used before (resume stays bit-exact)."""

import pytest
import torch

from duboko.data.batching import batch_slice, epoch_permutation, fixed_split, num_batches, rank_slice
from duboko.seeding import derive_seed


def test_num_batches_keeps_the_last_partial_batch_and_gives_no_rank_an_empty_one():
    assert num_batches(200, 64) == 4  # 64 + 64 + 64 + 8
    assert num_batches(192, 64) == 3
    assert num_batches(0, 64) == 0
    assert num_batches(200, 64, world_size=2) == 4  # 8 left: 4 items for each rank
    # 129 = 2 · 64 + 1: under 2 ranks the last 1-item batch would leave rank 1 nothing.
    assert num_batches(129, 64) == 3 and num_batches(129, 64, world_size=2) == 2
    assert num_batches(130, 64, world_size=2) == 3
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, 0)


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    a = epoch_permutation(50, seed=3, epoch=1)
    assert torch.equal(a, epoch_permutation(50, seed=3, epoch=1))
    assert torch.equal(a.sort().values, torch.arange(50))
    assert not torch.equal(a, epoch_permutation(50, seed=3, epoch=2))
    assert not torch.equal(a, epoch_permutation(50, seed=4, epoch=1))
    # The formula it replaces: seed·1,000,003 + epoch (and, for the seed 0 of every bundled
    # recipe, the image tasks' former seed·7919 + epoch too).
    for seed, epoch in ((3, 1), (0, 4)):
        old = torch.randperm(50, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        assert torch.equal(epoch_permutation(50, seed, epoch), old)
    old = torch.randperm(50, generator=torch.Generator().manual_seed(0 * 7919 + 4))
    assert torch.equal(epoch_permutation(50, 0, 4), old)
    # The per-batch generators' former formula (seed·P + epoch)·P + index, P = 1,000,003.
    assert derive_seed(5, 2, 7) == (5 * 1_000_003 + 2) * 1_000_003 + 7


def test_rank_slices_partition_every_global_batch():
    order = epoch_permutation(23, seed=0, epoch=0)
    for index in range(num_batches(23, 8)):
        batch = batch_slice(order, index, 8)
        assert len(batch) == (8 if index < 2 else 7)
        parts = [rank_slice(batch, r, 3) for r in range(3)]
        # Rank r holds items r, r + 3, ...: together every item of the batch once.
        assert torch.equal(torch.stack([p[0] for p in parts]), batch[:3])
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
    items = list("abcdefg")
    assert rank_slice(items, 1, 2) == ["b", "d", "f"] and rank_slice(items, 0, 1) is items
    x = torch.arange(12).view(2, 6)
    assert torch.equal(rank_slice(x, 1, 3, dim=1), x[:, 1::3])
    with pytest.raises(ValueError, match="rank"):
        rank_slice(items, 2, 2)


def test_fixed_split_depends_only_on_its_arguments():
    train, val = fixed_split(100, 10, seed=1234)
    assert len(train) == 90 and len(val) == 10
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again_train, again_val = fixed_split(100, 10, seed=1234)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    # The MNIST tasks' former split: one permutation from Generator().manual_seed(1234), val first.
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(val, perm[:10]) and torch.equal(train, perm[10:])
    none_train, none_val = fixed_split(100, 0, seed=1234)
    assert len(none_val) == 0 and torch.equal(none_train, perm)  # still the permuted order
    with pytest.raises(ValueError, match="n_val"):
        fixed_split(5, 6, seed=0)
