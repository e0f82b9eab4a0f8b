"""What a trained language model expects next: the most likely next tokens after a text.

    next_token_table(model, tokenizer, "The cat sat on the", top=5)
    -> [(" mat", 412, 0.31), (" floor", 977, 0.12), ...]

Works for every language model duboko trains (RNN family and GPT): the model maps ids (1, T) to
logits (1, T, V) and a state; only the last position's logits are used.
"""

from __future__ import annotations

import torch
from torch import nn

from duboko.errors import DubokoError


def context_ids(model: nn.Module, tokenizer, text: str) -> list[int]:
    """`text` as token ids, cut to the last `model.config.block_size` tokens for a model with a
    fixed context (a GPT); an RNN reads any length. Text that encodes to nothing is refused."""
    ids = tokenizer.encode(text)
    if not ids:
        raise DubokoError(f"the text {text!r} encodes to no tokens")
    block = getattr(getattr(model, "config", None), "block_size", None)
    return ids[-block:] if block else ids


def next_token_table(model: nn.Module, tokenizer, text: str, top: int, temperature: float = 1.0) -> list[tuple[str, int, float]]:
    """[(token text, id, probability)] of the `top` most likely next tokens after `text`, most
    likely first; probabilities are softmax(logits / temperature)."""
    if top < 1:
        raise DubokoError(f"top must be >= 1, got {top}")
    if temperature <= 0:
        raise DubokoError(f"temperature must be > 0, got {temperature}")
    ids = context_ids(model, tokenizer, text)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids], device=device))  # (1, T, V)
    probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)  # (V,)
    values, order = torch.topk(probs, min(top, probs.numel()))
    return [(tokenizer.token_text(int(i)), int(i), float(v)) for v, i in zip(values, order)]
