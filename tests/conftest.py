"""Shared fixtures. Tests use tiny data and one thread so the suite stays fast on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")
# The CLI's top-level guard re-raises unexpected exceptions (see duboko.cli.main): a bug fails
# its test with a traceback instead of passing as a one-line error with exit 2.
os.environ.setdefault("DUBOKO_DEBUG", "1")

# A MY_NET small enough to train in seconds: 16×16 inputs make fc1 128·4·4 → 512.
TINY_CNN = [
    "data.image_size=16", "model.image_size=16", "data.limit_train=512", "data.limit_test=500",
    "train.num_threads=1", "data.eval_batch_size=500",
]


@pytest.fixture
def tiny_cnn_overrides() -> list[str]:
    return list(TINY_CNN)
