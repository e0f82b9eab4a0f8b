"""Recurrent language models: embedding -> RNN / LSTM / GRU -> linear head over the vocabulary.

A recurrent network reads a sequence one step at a time and carries a hidden state h_t that
summarises everything seen so far. The plain (Elman) RNN's gradient through time is a product of
Jacobians that shrinks (or explodes) geometrically; the LSTM and GRU add gated, additive paths
through the cell state that let gradients survive hundreds of steps (`duboko gradflow` shows it).

Two implementations of the same recurrence, with the same parameter names and layout:
- `fused` (training default): torch's `nn.LSTM` / `nn.GRU` / `nn.RNN`, one fused kernel per layer.
- `readable`: `ReadableRNN`, the cells below with every gate written out, looping over time in
  Python. Tested equal to torch's modules (to 1e-5) for the same weights, so a run trained with
  the fused path can be loaded into the readable one and stepped through.

Language-model protocol (shared with the GPT family, see `duboko.nn.sampling`):
    forward(idx (B, T), state=None) -> (logits (B, T, vocab_size), new_state)
where state is h (num_layers, B, hidden_size) for RNN/GRU and (h, c) for the LSTM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from duboko.nn.checks import check_at_least_one, check_dropout, check_one_of
from duboko.registry import register_model

# h, or (h, c) for the LSTM; each (num_layers, B, hidden_size).
State = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# Gates per cell type: rows of weight_ih / weight_hh are these blocks stacked, in torch's order.
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


# ---------------------------------------------------------------------------------------------
# The cells, written out. Weights follow torch's layout: weight_ih (G·H, in), weight_hh (G·H, H),
# bias_ih (G·H,), bias_hh (G·H,), with the G gate blocks stacked in torch's order.


def rnn_cell(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Elman RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh).  x (B, in), h (B, H) -> h' (B, H)."""
    return torch.tanh(F.linear(x, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh))


def lstm_cell(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000):
        i = σ(W_ii x + b_ii + W_hi h + b_hi)      input gate: how much new content to write
        f = σ(W_if x + b_if + W_hf h + b_hf)      forget gate: how much old cell state to keep
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)   candidate content
        o = σ(W_io x + b_io + W_ho h + b_ho)      output gate: how much of the cell to show
        c' = f ⊙ c + i ⊙ g                        additive update: the gradient path through time
        h' = o ⊙ tanh(c')
    x (B, in), h and c (B, H) -> h', c' (B, H)."""
    gates = F.linear(x, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=-1)  # torch's order: input, forget, cell (g), output
    input_gate = torch.sigmoid(i)
    forget_gate = torch.sigmoid(f)
    candidate = torch.tanh(g)
    output_gate = torch.sigmoid(o)
    c_next = forget_gate * c + input_gate * candidate
    h_next = output_gate * torch.tanh(c_next)
    return h_next, c_next


def gru_cell(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """GRU (Cho et al. 2014, eq. 5-8, in torch's form):
        r = σ(W_ir x + b_ir + W_hr h + b_hr)           reset gate: how much past enters the candidate
        z = σ(W_iz x + b_iz + W_hz h + b_hz)           update gate: keep old state vs take the new
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))  candidate state
        h' = (1 − z) ⊙ n + z ⊙ h
    x (B, in), h (B, H) -> h' (B, H)."""
    x_r, x_z, x_n = F.linear(x, weight_ih, bias_ih).chunk(3, dim=-1)  # (B, H) each
    h_r, h_z, h_n = F.linear(h, weight_hh, bias_hh).chunk(3, dim=-1)
    reset_gate = torch.sigmoid(x_r + h_r)
    update_gate = torch.sigmoid(x_z + h_z)
    candidate = torch.tanh(x_n + reset_gate * h_n)
    return (1 - update_gate) * candidate + update_gate * h


class _ReadableCell(nn.Module):
    """One cell with torch.nn.{RNN,LSTM,GRU}Cell's parameter names, initialisation and call."""

    mode = ""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        gates = GATES[self.mode]
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(gates * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)  # torch's init: U(-1/√H, 1/√H) for every weight
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _weights(self):
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh


class RNNCell(_ReadableCell):
    mode = "rnn"

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden_size) if h is None else h
        return rnn_cell(x, h, *self._weights())


class LSTMCell(_ReadableCell):
    mode = "lstm"

    def forward(self, x: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None = None):
        if hc is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hc = (zeros, zeros)
        return lstm_cell(x, hc[0], hc[1], *self._weights())


class GRUCell(_ReadableCell):
    mode = "gru"

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden_size) if h is None else h
        return gru_cell(x, h, *self._weights())


class ReadableRNN(nn.Module):
    """A multi-layer RNN/LSTM/GRU looping over time with the written-out cells.

    Same constructor, parameter names (weight_ih_l0, ...), batch_first call and state format as
    torch's nn.RNN / nn.LSTM / nn.GRU, so either loads the other's state dict."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, batch_first: bool = True):
        super().__init__()
        check_one_of("cell", mode, GATES)
        if not batch_first:
            raise ValueError("ReadableRNN is batch-first only")
        self.mode, self.hidden_size, self.num_layers, self.dropout = mode, hidden_size, num_layers, dropout
        gates = GATES[mode]
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            for name, shape in (("weight_ih", (gates * hidden_size, in_size)),
                                ("weight_hh", (gates * hidden_size, hidden_size)),
                                ("bias_ih", (gates * hidden_size,)),
                                ("bias_hh", (gates * hidden_size,))):
                p = nn.Parameter(torch.empty(shape))
                nn.init.uniform_(p, -bound, bound)
                self.register_parameter(f"{name}_l{layer}", p)

    def layer_weights(self, layer: int):
        return tuple(getattr(self, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x (B, T, input_size) -> output (B, T, hidden_size) of the last layer, new state."""
        B, T, _ = x.shape
        L, H = self.num_layers, self.hidden_size
        if state is None:
            zeros = x.new_zeros(L, B, H)
            state = (zeros, zeros) if self.mode == "lstm" else zeros
        if self.mode == "lstm":
            h_all, c_all = state
        else:
            h_all, c_all = state, None
        new_h, new_c = [], []
        layer_input = x
        for layer in range(L):
            weights = self.layer_weights(layer)
            h = h_all[layer]  # (B, H)
            c = c_all[layer] if c_all is not None else None
            outputs = []
            for t in range(T):
                x_t = layer_input[:, t]  # (B, in)
                if self.mode == "lstm":
                    h, c = lstm_cell(x_t, h, c, *weights)
                elif self.mode == "gru":
                    h = gru_cell(x_t, h, *weights)
                else:
                    h = rnn_cell(x_t, h, *weights)
                outputs.append(h)
            layer_input = torch.stack(outputs, dim=1)  # (B, T, H)
            # torch applies dropout between layers, not after the last one.
            if layer < L - 1 and self.dropout > 0:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
            new_h.append(h)
            new_c.append(c)
        h_n = torch.stack(new_h)  # (L, B, H)
        if self.mode == "lstm":
            return layer_input, (h_n, torch.stack(new_c))
        return layer_input, h_n


# ---------------------------------------------------------------------------------------------
# The language model.


@dataclass
class RNNLMConfig:
    vocab_size: int = 128  # tokens; the language-model task sets it from the tokenizer
    cell: str = "lstm"  # lstm | gru | rnn (tanh)
    embedding_dim: int = 0  # token embedding size (0: hidden_size)
    hidden_size: int = 512  # units per recurrent layer
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout on the embeddings, between layers and before the head
    tie_weights: bool = False  # share the embedding matrix with the output layer (Press & Wolf 2017)
    implementation: str = "fused"  # fused (torch's nn.LSTM/GRU/RNN) | readable (written-out cells)


class RNNLanguageModel(nn.Module):
    """Embedding -> recurrent layers -> linear head: next-token logits at every position."""

    def __init__(self, config: RNNLMConfig):
        super().__init__()
        check_one_of("cell", config.cell, GATES)
        check_one_of("implementation", config.implementation, ("fused", "readable"))
        check_at_least_one(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_layers)
        check_dropout(config.dropout)
        emb_dim = config.embedding_dim or config.hidden_size
        if config.tie_weights and emb_dim != config.hidden_size:
            raise ValueError(
                f"tie_weights needs embedding_dim == hidden_size, got {emb_dim} and {config.hidden_size}"
            )
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, emb_dim)
        self.dropout = nn.Dropout(config.dropout)
        between = config.dropout if config.num_layers > 1 else 0.0
        if config.implementation == "fused":
            fused = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.cell]
            self.rnn = fused(emb_dim, config.hidden_size, config.num_layers, dropout=between, batch_first=True)
        else:
            self.rnn = ReadableRNN(config.cell, emb_dim, config.hidden_size, config.num_layers, between)
        if config.tie_weights:
            # The head reuses embedding.weight (vocab, H); only its bias is new. One tensor in the
            # state dict (safetensors refuses two names for the same memory).
            self.head = None
            self.head_bias = nn.Parameter(torch.zeros(config.vocab_size))
        else:
            self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward_embeddings(self, emb: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """From embedded tokens (B, T, E): logits (B, T, vocab), new state. (`gradflow` uses it
        to take gradients with respect to each input step.)"""
        out, state = self.rnn(self.dropout(emb), state)  # (B, T, H)
        out = self.dropout(out)
        if self.head is None:
            logits = F.linear(out, self.embedding.weight, self.head_bias)
        else:
            logits = self.head(out)
        return logits, state  # (B, T, vocab)

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        return self.forward_embeddings(self.embedding(idx), state)  # idx (B, T) -> (B, T, vocab)


def _token_input(config: RNNLMConfig, batch_size: int) -> tuple[torch.Tensor]:
    return (torch.randint(0, config.vocab_size, (batch_size, 64)),)


# Registered variants: the family's arguments once, then each name with what it overrides.
_register = partial(
    register_model, family="rnn", model_cls=RNNLanguageModel, config_cls=RNNLMConfig, example_input=_token_input
)
for _cell, _what in (("lstm", "LSTM"), ("gru", "GRU"), ("rnn", "plain tanh RNN")):
    _register(
        f"{_cell}-char",
        description=f"Character-level {_what} language model: embedding -> 1x512 {_cell.upper()} -> head",
        cell=_cell,
        hidden_size=512,
        num_layers=1,
    )
_register(
    "lstm-word",
    description="Word-level LSTM language model: 2x512 LSTM, tied embeddings, dropout 0.3",
    cell="lstm",
    hidden_size=512,
    num_layers=2,
    dropout=0.3,
    tie_weights=True,
)
