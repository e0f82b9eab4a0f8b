"""evaluate/next_token.py: the next-token table of a language model and its context cut."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.evaluate.next_token import context_ids, next_token_table

ALPHABET = "abcdefgh"


class CharTokenizer:
    kind = "char"

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text if c in ALPHABET]

    def token_text(self, i: int) -> str:
        return ALPHABET[i]


@dataclass
class Config:
    block_size: int | None = None


class FixedLogits(nn.Module):
    """Logits that depend on the last token only: after token i, token (i + 1) % V gets logit
    2, token (i + 2) % V logit 1, the rest 0. Records the input it was given."""

    def __init__(self, block_size: int | None = None):
        super().__init__()
        self.config = Config(block_size)
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, state=None):
        self.seen = x
        V = len(ALPHABET)
        logits = torch.zeros(*x.shape, V)  # (B, T, V)
        rows = torch.arange(x.shape[1])
        logits[0, rows, (x[0] + 1) % V] = 2.0
        logits[0, rows, (x[0] + 2) % V] = 1.0
        return logits * self.scale, None


def test_table_is_ranked_softmax_probabilities():
    rows = next_token_table(FixedLogits(), CharTokenizer(), "abc", top=3)
    assert [(t, i) for t, i, _ in rows][:2] == [("d", 3), ("e", 4)]  # after "c": d, then e
    z = math.exp(2) + math.exp(1) + 6  # the other six tokens have logit 0
    assert rows[0][2] == pytest.approx(math.exp(2) / z) and rows[1][2] == pytest.approx(math.exp(1) / z)
    assert rows[2][2] == pytest.approx(1 / z)
    assert len(next_token_table(FixedLogits(), CharTokenizer(), "a", top=100)) == len(ALPHABET)  # at most V


def test_temperature_sharpens_or_flattens():
    cold = next_token_table(FixedLogits(), CharTokenizer(), "a", top=1, temperature=0.1)[0][2]
    hot = next_token_table(FixedLogits(), CharTokenizer(), "a", top=1, temperature=10.0)[0][2]
    assert cold > 0.99 and hot < 0.2


def test_a_fixed_context_model_sees_the_last_block_only():
    model = FixedLogits(block_size=2)
    assert context_ids(model, CharTokenizer(), "abcde") == [3, 4]
    next_token_table(model, CharTokenizer(), "abcde", top=1)
    assert model.seen.tolist() == [[3, 4]]
    assert context_ids(FixedLogits(), CharTokenizer(), "abcde") == [0, 1, 2, 3, 4]  # no block_size: all


def test_bad_input_is_one_clear_error():
    with pytest.raises(DubokoError, match="encodes to no tokens"):
        next_token_table(FixedLogits(), CharTokenizer(), "xyz", top=3)
    with pytest.raises(DubokoError, match="top must be >= 1"):
        next_token_table(FixedLogits(), CharTokenizer(), "a", top=0)
    with pytest.raises(DubokoError, match="temperature must be > 0"):
        next_token_table(FixedLogits(), CharTokenizer(), "a", top=1, temperature=0)
