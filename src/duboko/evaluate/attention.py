"""Attention maps: what each head of each attention layer looks at, for one input.

`collect_attention` runs a prompt through a GPT (language-model task) or an encoder-decoder
(seq2seq task, greedy decoding first) with `duboko.nn.attention.recording_attention`, which makes
every `MultiHeadAttention` keep its last softmax weights; `plot_attention` draws them, one row per
attention module and one column per head, queries down and keys across.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.evaluate.next_token import context_ids
from duboko.nn.attention import recording_attention


@dataclass
class AttentionMap:
    name: str  # module name in the model, e.g. "decoder.layers.0.cross_attn"
    weights: torch.Tensor  # (H, T, S) on the CPU: head, query position, key position; rows sum to 1
    queries: list[str]  # T token texts
    keys: list[str]  # S token texts


def _record(model: nn.Module, *inputs: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Run `model(*inputs)` (batch of one) and return (module name, weights (H, T, S)) for every
    attention module, in definition order."""
    with torch.no_grad(), recording_attention(model) as modules:
        model(*inputs)
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m.weights[0].float().cpu()) for m in modules]


def _seq2seq_attention(model: nn.Module, task, prompt: str) -> tuple[list[AttentionMap], str]:
    """Decode `prompt` greedily, then re-run source and output once to record encoder
    self-attention (source x source), decoder self-attention (output x output) and cross
    attention (output x source)."""
    src = task.encode_source(prompt)  # (1, S)
    out_ids = model.greedy_decode(src)[0]
    tgt_in = torch.tensor([[model.config.bos_id] + out_ids], device=src.device)  # (1, T)
    tok = task.tokenizer
    src_tokens = [tok.pieces[i] for i in src[0].tolist()]
    tgt_tokens = [tok.pieces[i] for i in tgt_in[0].tolist()]
    maps = []
    for name, weights in _record(model, src, tgt_in):
        if name.startswith("encoder"):
            q, k = src_tokens, src_tokens
        elif name.endswith("cross_attn"):
            q, k = tgt_tokens, src_tokens
        else:
            q, k = tgt_tokens, tgt_tokens
        maps.append(AttentionMap(name, weights, q, k))
    return maps, f"{prompt!r} -> {tok.decode(out_ids)!r}"


def collect_attention(model: nn.Module, task, prompt: str) -> tuple[list[AttentionMap], str]:
    """One AttentionMap per attention module of `model` for `prompt`, and a note on what was
    run. `task` is the run's task: a seq2seq task (its `encode_source` and piece tokenizer) or a
    language-model task (its tokenizer)."""
    if task.name == "seq2seq":
        return _seq2seq_attention(model, task, prompt)
    tok = task.tokenizer
    ids = context_ids(model, tok, prompt)
    tokens = [tok.token_text(i) for i in ids]
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    recorded = _record(model, x)
    if not recorded:
        raise DubokoError(f"model {type(model).__name__} has no attention layers to draw")
    return [AttentionMap(name, weights, tokens, tokens) for name, weights in recorded], repr(prompt)


def module_label(name: str) -> str:
    """A row label from a module name: "decoder.layers.1.cross_attn" -> "dec L1 cross"."""
    parts = name.split(".")
    stack = "enc" if parts[0] == "encoder" else "dec"
    layer = parts[2] if len(parts) > 2 else "?"
    kind = {"attn": "self", "self_attn": "self", "cross_attn": "cross"}.get(parts[-1], parts[-1])
    return f"{stack} L{layer} {kind}"


def plot_attention(maps: list[AttentionMap], path: str | Path, title: str = "") -> None:
    """One row per attention module, one column per head; queries down, keys across."""
    from matplotlib.colors import PowerNorm

    from duboko.evaluate.plots import figure, hide_ticks

    if not maps:
        raise DubokoError("no attention maps to draw")
    rows = len(maps)
    heads = max(m.weights.shape[0] for m in maps)
    size = max(max(len(m.queries), len(m.keys)) for m in maps)  # longest sequence
    cell = min(3.2, max(1.6, 0.13 * size + 0.6))  # inches per map
    show_ticks = size <= 40  # longer sequences: token labels would overlap
    title = title or "attention weights (rows: queries, columns: keys)"
    with figure(path, rows, heads, size=(cell * heads + 1.0, cell * rows + 0.8), title=title, title_size=10,
                dpi=110) as (fig, axes):
        for r, m in enumerate(maps):
            for h in range(heads):
                ax = axes[r][h]
                if h >= m.weights.shape[0]:
                    ax.axis("off")
                    continue
                # A square-root colour scale: weights spread over many keys stay visible.
                ax.imshow(m.weights[h].numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                          aspect="auto", interpolation="nearest")
                if show_ticks:
                    fs = max(3.0, min(7.0, 160.0 / size))
                    ax.set_xticks(range(len(m.keys)))
                    ax.set_xticklabels([repr(t)[1:-1] for t in m.keys], rotation=90, fontsize=fs)
                    ax.set_yticks(range(len(m.queries)))
                    ax.set_yticklabels([repr(t)[1:-1] for t in m.queries], fontsize=fs)
                else:
                    hide_ticks(ax)
                if r == 0:
                    ax.set_title(f"head {h}", fontsize=9)
                if h == 0:
                    ax.set_ylabel(module_label(m.name), fontsize=9)
