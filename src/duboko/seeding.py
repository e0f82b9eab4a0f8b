"""One seeding scheme for every random draw the engine and the tasks make.

Resume and distributed training need each draw to be a pure function of the recipe's seed and of
where it happens (epoch, batch index, ...), never of how many draws came before: a resumed run
then skips the batches it has seen without replaying them, and every rank draws the same global
permutation. `derive_seed(seed, epoch, index)` folds those coordinates into one integer; the
tasks build their generators from it instead of each writing its own formula.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# A prime multiplier keeps (seed, epoch, index) triples apart: derive_seed(s, e) = s·P + e.
PRIME = 1_000_003


def derive_seed(seed: int, *keys: int) -> int:
    """`seed` followed by `keys`, folded as ((seed·P + k1)·P + k2)·P + ... (P = 1,000,003)."""
    value = int(seed)
    for key in keys:
        value = value * PRIME + int(key)
    # torch.Generator.manual_seed takes values in [-2^63, 2^64); keep any fold inside it.
    return value % 2**63


def generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with `derive_seed(seed, *keys)` on `device`."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (model initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
