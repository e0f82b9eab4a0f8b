"""The written-out RNN/LSTM/GRU cells equal torch's modules for the same weights (to 1e-5)."""

import pytest
import torch
from torch import nn

from duboko.models.rnn import GRUCell, LSTMCell, ReadableRNN, RNNCell, RNNLMConfig, RNNLanguageModel
from duboko.registry import create_model

TORCH_CELLS = {"rnn": (RNNCell, nn.RNNCell), "lstm": (LSTMCell, nn.LSTMCell), "gru": (GRUCell, nn.GRUCell)}
TORCH_LAYERS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@pytest.mark.parametrize("mode", ["rnn", "lstm", "gru"])
def test_cell_equals_torch_cell(mode):
    torch.manual_seed(0)
    ours_cls, torch_cls = TORCH_CELLS[mode]
    ref = torch_cls(7, 11)
    ours = ours_cls(7, 11)
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x = torch.randn(5, 7)
    if mode == "lstm":
        hc = (torch.randn(5, 11), torch.randn(5, 11))
        for a, b in zip(ours(x, hc), ref(x, hc)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(ours(x), ref(x)):  # zero initial state
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        h = torch.randn(5, 11)
        torch.testing.assert_close(ours(x, h), ref(x, h), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["rnn", "lstm", "gru"])
def test_readable_layers_equal_torch_multilayer(mode):
    torch.manual_seed(1)
    ref = TORCH_LAYERS[mode](6, 10, num_layers=2, batch_first=True)
    ours = ReadableRNN(mode, 6, 10, num_layers=2)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 9, 6, requires_grad=True)
    if mode == "lstm":
        state = (torch.randn(2, 3, 10), torch.randn(2, 3, 10))
    else:
        state = torch.randn(2, 3, 10)
    out_a, st_a = ours(x, state)
    out_b, st_b = ref(x, state)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    if mode == "lstm":
        for a, b in zip(st_a, st_b):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(st_a, st_b, atol=1e-5, rtol=1e-5)
    # Same gradients, too: the readable path is the same function.
    (ga,) = torch.autograd.grad(out_a.square().sum(), x)
    (gb,) = torch.autograd.grad(out_b.square().sum(), x)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_language_model_fused_equals_readable(cell):
    torch.manual_seed(2)
    cfg = dict(vocab_size=13, cell=cell, hidden_size=16, num_layers=2)
    fused = RNNLanguageModel(RNNLMConfig(**cfg)).eval()
    readable = RNNLanguageModel(RNNLMConfig(**cfg, implementation="readable")).eval()
    readable.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 13, (2, 8))
    la, sa = fused(idx)
    lb, sb = readable(idx)
    assert la.shape == (2, 8, 13)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    # Carrying the state over two halves equals one pass over the whole sequence.
    l1, s1 = fused(idx[:, :5])
    l2, _ = fused(idx[:, 5:], s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), la, atol=1e-5, rtol=1e-5)


def test_tied_weights_share_one_tensor_and_bad_configs_fail():
    m = create_model("lstm-word", vocab_size=50, hidden_size=16)
    assert m.head is None
    names = list(m.state_dict())
    assert "embedding.weight" in names and not any(n.startswith("head.weight") for n in names)
    logits, (h, c) = m(torch.randint(0, 50, (2, 3)))
    assert logits.shape == (2, 3, 50) and h.shape == (2, 2, 16)
    with pytest.raises(Exception, match="tie_weights"):
        create_model("lstm-word", vocab_size=50, hidden_size=16, embedding_dim=8)
    with pytest.raises(Exception, match="cell"):
        create_model("lstm-char", cell="transformer")
