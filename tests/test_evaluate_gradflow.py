"""evaluate/gradflow.py: the windows, the gradient of the last step's loss per input step, and
its picture. A plain tanh RNN's gradient vanishes with the distance from the loss."""

from __future__ import annotations

import pytest
import torch

from duboko import registry
from duboko.errors import DubokoError
from duboko.evaluate.gradflow import gradient_by_distance, gradient_flow, plot_gradient_flow, random_windows


def test_windows_are_consecutive_tokens_and_their_next_tokens():
    ids = torch.arange(100)
    x, y = random_windows(ids, steps=7, batch=5, seed=3)
    assert x.shape == y.shape == (5, 7)
    assert torch.equal(y, x + 1)  # targets: the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # consecutive
    assert int(y.max()) <= 99
    again, _ = random_windows(ids, steps=7, batch=5, seed=3)
    assert torch.equal(x, again)  # a pure function of the seed


def test_too_little_text_or_bad_sizes_are_one_clear_error():
    with pytest.raises(DubokoError, match="too few for windows of steps=10"):
        random_windows(torch.arange(11), steps=10, batch=1, seed=0)
    with pytest.raises(DubokoError, match="steps must be >= 2"):
        random_windows(torch.arange(50), steps=1, batch=1, seed=0)


def _rnn(cell: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return registry.create_model(f"{cell}-char", vocab_size=12, hidden_size=16)


def test_a_plain_rnn_gradient_vanishes_with_distance():
    model = _rnn("rnn").train()
    ids = torch.randint(0, 12, (400,), generator=torch.Generator().manual_seed(0))
    curve = gradient_by_distance(model, ids, steps=40, batch=4, seed=0)
    assert len(curve) == 40 and all(v >= 0 for v in curve)
    assert curve[0] > 10 * curve[-1] > 0  # k = 0 (the loss's own input) to k = 39 steps back
    assert model.training  # the mode is restored


def test_gradient_flow_is_indexed_by_input_position():
    model = _rnn("lstm")
    x = torch.randint(0, 12, (2, 9))
    by_position = gradient_flow(model, x, x)
    assert len(by_position) == 9 and by_position[-1] > 0  # t = T-1 is the loss step's own input
    ids = torch.randint(0, 12, (50,))
    assert gradient_by_distance(model, ids, 9, 2, seed=1)[::-1] == gradient_flow(model, *random_windows(ids, 9, 2, 1))


def test_a_model_without_recurrence_is_refused():
    gpt = registry.create_model("gpt-tiny", vocab_size=12)
    with pytest.raises(DubokoError, match="recurrent language model"):
        gradient_flow(gpt, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "gf.png"
    plot_gradient_flow({"rnn": [1.0, 0.1, 0.0], "lstm": [1.0, 0.9, 0.8]}, out)  # a 0 is drawn at 1e-30
    assert out.read_bytes()[:4] == b"\x89PNG"
