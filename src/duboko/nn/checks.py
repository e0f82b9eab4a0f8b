"""Checks of a model's hyper-parameters, shared by the model families.

A model checks its config in `__init__` and raises `ValueError` with the field names and the bad
values; the registry turns that into a one-line user error (`DubokoError`) that names the model.
One check, one message, wherever a family needs it.
"""

from __future__ import annotations

from collections.abc import Collection


def _names(names: list[str]) -> str:
    """["a"] -> "a", ["a", "b", "c"] -> "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_one_of(name: str, value: str, choices: Collection[str]) -> None:
    """A field that names one of a fixed set of choices (a cell type, a positional encoding)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_dropout(p: float, name: str = "dropout") -> None:
    """A dropout probability must be in [0, 1): p = 1 would zero every activation."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


def check_at_least_one(**sizes: int) -> None:
    """Every size (a width, a depth, a vocabulary) must be >= 1; the message names them all:
    `check_at_least_one(vocab_size=0, num_layers=2)` -> "vocab_size and num_layers must be >= 1,
    got 0 and 2"."""
    if any(value < 1 for value in sizes.values()):
        raise ValueError(f"{_names(list(sizes))} must be >= 1, got {_names([str(v) for v in sizes.values()])}")


def check_divisible(name: str, value: int, by: int, reason: str) -> None:
    """`value` (the field `name`) must be a multiple of `by`; `reason` says where `by` comes from:
    `check_divisible("n_embd", 100, 6, "n_head")` -> "n_embd must be divisible by 6 (n_head), got 100"."""
    if value % by:
        raise ValueError(f"{name} must be divisible by {by} ({reason}), got {value}")
