"""Sampling from a language model: temperature, top-k, top-p (nucleus), repetition penalty, stop
strings, a seed, and streaming; one `generate` for every family.

The language-model protocol (RNN and GPT families): a model is an `nn.Module` with
`config.vocab_size` and

    forward(idx: LongTensor (B, T), state=None) -> (logits (B, T, vocab), new_state)

where `state` is whatever the model carries between calls (an RNN's hidden state, a GPT's key/value
cache); `state=None` starts fresh. A model whose config has `block_size` can only attend to that
many positions, and `generate` crops its context to fit.

Public API:
    filter_logits(logits, temperature, top_k, top_p) -> logits with cut tokens at -inf
    apply_repetition_penalty(logits, previous_ids, penalty) -> logits
    sample_next(logits, ..., generator) -> int
    draw_one(probs, generator) -> int   (torch.multinomial(probs, 1) without its host-synced checks)
    generate(model, prompt_ids, max_new_tokens, ...) -> list[int]   (the new tokens only)
    TextStreamer(tokenizer, write)  an `on_token` callback that prints text as it is produced
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: Sequence[int] | torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, eq. 2 as implemented by HF transformers):
    the logit of every token already present is divided by `penalty` if positive, multiplied if
    negative, so seen tokens get less likely for penalty > 1. logits: (V,)."""
    if penalty == 1.0 or len(previous_ids) == 0:
        return logits
    ids = torch.as_tensor(previous_ids, dtype=torch.long, device=logits.device).unique()
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Scale by 1/temperature, keep the k most likely tokens (top_k > 0) and the smallest set
    whose probability reaches top_p (Holtzman et al. 2020, nucleus sampling); the rest -> -inf.
    logits: (V,) float. temperature must be > 0 here (0 means greedy and is handled by the caller)."""
    logits = logits.float()
    if temperature != 1.0:  # x / 1 == x exactly: skip the op (one of the few per generated token)
        logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    previous_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> int:
    """One token id from next-token logits (V,). temperature 0 -> the most likely token.

    Sampling runs on the CPU with `generator`, so a seed gives the same text on any device."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.requires_grad:
        logits = logits.detach().float().cpu()  # (each call is cheap, but this runs once per token)
    logits = apply_repetition_penalty(logits, previous_ids, repetition_penalty)
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return draw_one(probs, generator)


def draw_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn from the distribution `probs` (V,): exactly `int(torch.multinomial(probs, 1,
    generator=generator))`, the same index from the same random numbers, at about a third of its cost.

    For one draw, torch.multinomial (aten/src/ATen/native/Distributions.cpp, the n_sample == 1 fast
    path) draws q ~ Exp(1) per entry with `exponential_` from the generator and returns
    argmax(p / q) (the exponential race, equivalent to the Gumbel-max trick: P(argmax = i) = p_i).
    Before that it checks max < inf, min >= 0 and sum > 0 with three host syncs, ~2/3 of its time
    at V = 71. Here the same q, the same division and the same argmax; the checks are replaced by
    one on the winner: softmax output is never negative or infinite, and a NaN anywhere (a NaN
    logit, or all logits -inf) makes argmax pick a NaN, so that raises as torch.multinomial would."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)  # (V,) Exp(1), multinomial's draw
    torch.div(probs, q, out=q)
    i = int(torch.argmax(q))
    if math.isnan(float(q[i])):
        raise RuntimeError(f"probability tensor contains either `inf`, `nan` or element < 0, got {probs.tolist()[:8]}...")
    return i


def _block_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "block_size", None)
    return int(size) if size else None


def _last_logits(model: nn.Module, ids: list[int], state: Any, device: torch.device) -> tuple[torch.Tensor, Any]:
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    logits, state = model(x, state)  # (1, T, V)
    return logits[0, -1], state


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], Any] | None = None,
) -> list[int]:
    """Sample up to `max_new_tokens` tokens after `prompt_ids`; returns the new ids only.

    - temperature / top_k / top_p / repetition_penalty: see `sample_next` (temperature 0: greedy).
    - stop: strings that end generation once the decoded new text contains one (needs `decode`,
      e.g. `tokenizer.decode`); the returned ids include the token that completed it, and callers
      cut the text at the stop string. stop_ids: token ids that end generation (kept in the output).
    - seed: seeds a private CPU generator (the global RNG is untouched); None -> nondeterministic.
    - use_cache: feed only the newest token with the carried state (RNN hidden state / GPT KV
      cache). False feeds the whole context each step with state=None (slower, same result);
      a model with `config.block_size` gets its context cropped to the last block_size tokens, and
      once a cached context would exceed block_size the cropped context is re-fed.
    - on_token(id): called with every new token as it is produced (streaming).
    The model is run in eval mode under `torch.inference_mode` (no autograd bookkeeping at all; the
    state never leaves this function) and put back in its previous mode afterwards. Per token: one
    model call on the newest token, one softmax over the last row of logits, one multinomial draw
    and one host sync (the int of the token).
    """
    ids = [int(i) for i in (prompt_ids.flatten().tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not ids:
        raise ValueError("generate needs at least one prompt token")
    if stop and decode is None:
        raise ValueError("stop strings need a decode function")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = _model_device(model)
    block = _block_size(model)
    stop_ids_set = {int(s) for s in stop_ids}
    # Stop strings are searched in the tail of the text only: the new piece plus the longest
    # stop string's length before it, so a long generation costs O(1) decoding per token.
    text = IncrementalDecoder(decode) if stop else None
    longest_stop = max((len(s) for s in stop), default=0)
    prompt_len = len(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            state = None
            in_state = 0  # tokens the state has seen
            logits = None
            for _ in range(max_new_tokens):
                if use_cache and logits is not None and (block is None or in_state + 1 <= block):
                    logits, state = _last_logits(model, ids[-1:], state, device)
                    in_state += 1
                else:
                    context = ids[-block:] if block else ids
                    logits, state = _last_logits(model, context, None, device)
                    in_state = len(context)
                token = sample_next(
                    logits, temperature, top_k, top_p, repetition_penalty, ids, generator
                )
                ids.append(token)
                if on_token is not None:
                    on_token(token)
                if token in stop_ids_set:
                    break
                if text is not None:
                    before = len(text.text)
                    tail = text.push(token)[max(0, before - longest_stop):]
                    if any(s in tail for s in stop):
                        break
    finally:
        model.train(was_training)
    return ids[prompt_len:]


class IncrementalDecoder:
    """The text of a growing list of token ids, decoding only the ids since the last complete
    character instead of all of them per token (O(1) per token rather than O(n)).

    Ids are committed once their decoded text does not end in U+FFFD (the replacement character:
    half of a multi-byte UTF-8 character from byte-level BPE); the pending ids are decoded together
    until they complete. This relies on decode(a + b) == decode(a) + decode(b) whenever decode(a)
    ends on a whole character, true of duboko's tokenizers (char, word, byte-level BPE: tested)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.committed = ""  # decode(ids[:start])
        self.start = 0  # ids[start:] are pending
        self.text = ""  # committed + decode(pending): the text so far

    def push(self, token_id: int) -> str:
        """Add one id; returns the whole text so far."""
        self.ids.append(int(token_id))
        piece = self.decode(self.ids[self.start:])
        if piece.endswith("\ufffd"):
            self.text = self.committed + piece
        else:
            self.committed += piece
            self.start = len(self.ids)
            self.text = self.committed
        return self.text


class TextStreamer:
    """An `on_token` callback that writes decoded text as soon as it is complete.

    Decodes only the tokens since the last complete character (`IncrementalDecoder`) and writes
    what was added, holding back a trailing replacement character (half of a multi-byte UTF-8
    character from byte-level BPE) and any end that could begin a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], Any], stop: Sequence[str] = ()):
        self.decode = decode
        self.write = write
        self.stop = list(stop)
        self._text = IncrementalDecoder(decode)
        self.ids = self._text.ids
        self.written = 0
        self.stopped = False
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def __call__(self, token_id: int) -> None:
        if self.stopped:
            return
        before = len(self._text.text)
        text = self._text.push(token_id)
        # A stop string not found before can only end inside the new piece.
        lo = max(0, min(before, self.written) - self._longest_stop)
        for s in self.stop:
            at = text.find(s, lo)
            if at >= 0:  # print up to the stop string, never the stop string itself
                text = text[:at]
                self.stopped = True
        end = len(text)
        if not self.stopped:
            if text.endswith("\ufffd"):
                return
            end -= _pending_stop(text, self.stop)  # could be the start of a stop string: wait
        if end > self.written:
            self.write(text[self.written:end])
            self.written = end

    def flush(self) -> None:
        """Write what was held back (generation ended without completing a stop string)."""
        text = self.text()
        if len(text) > self.written:
            self.write(text[self.written:])
            self.written = len(text)

    def text(self) -> str:
        return cut_at_stop(self._text.text, self.stop)


def _pending_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]
