"""Captions for MNIST digits and the prompt tokenizer of the text-to-image model.

Captions are made from a label with several phrasings ("a handwritten seven", "the digit 7", "7",
"number seven, written by hand", ...). The phrasings are split in two fixed lists: TRAIN_TEMPLATES
are used in training; HELD_OUT_TEMPLATES are never seen in training and serve to measure whether
the model generalises to new ways of asking for a digit (`prompt_accuracy`).

The tokenizer is character-level over a fixed alphabet (lower-case letters, digits, space and a
little punctuation), so it needs no training data and any prompt made of those characters has
tokens. Prompts are lower-cased and their spaces collapsed. Id 0 is padding and id 1 the
begin-of-prompt token that every prompt starts with (the empty prompt is just [1], the "no
condition" of classifier-free guidance).
"""

from __future__ import annotations

import torch

from duboko.errors import DubokoError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {w} is the digit as a word, {d} as a numeral.
TRAIN_TEMPLATES = [
    "a handwritten {w}",
    "the digit {d}",
    "{d}",
    "{w}",
    "number {w}, written by hand",
    "a {w}",
    "the number {w}",
    "digit {d}",
    "an image of the digit {w}",
    "handwritten {d}",
    "a picture of a {d}",
    "a drawing of the number {d}",
    "write a {w}",
    "{w}, handwritten",
    "the numeral {d}",
    "a scanned {w}",
]
HELD_OUT_TEMPLATES = [
    "a handwritten digit {w}",
    "the number {d}",
    "a photo of a {w}",
    "{w} written by hand",
    "draw the digit {w}",
    "an image of a {d}",
]

PAD, BOS = 0, 1
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 ,.'-!?"
VOCAB_SIZE = 2 + len(ALPHABET)
_IDS = {ch: i + 2 for i, ch in enumerate(ALPHABET)}


def caption(label: int, template: str) -> str:
    if not 0 <= label <= 9:
        raise DubokoError(f"digit label must be 0-9, got {label}")
    return template.format(w=DIGIT_WORDS[label], d=str(label))


def captions_for(label: int, held_out: bool = False) -> list[str]:
    """Every phrasing of `label` from the train (or held-out) templates."""
    return [caption(label, t) for t in (HELD_OUT_TEMPLATES if held_out else TRAIN_TEMPLATES)]


def random_captions(labels: torch.Tensor, generator: torch.Generator | None = None, held_out: bool = False) -> list[str]:
    """One random phrasing per label (labels (B,) int); the draw uses `generator` (CPU)."""
    templates = HELD_OUT_TEMPLATES if held_out else TRAIN_TEMPLATES
    picks = torch.randint(0, len(templates), (len(labels),), generator=generator)
    return [caption(int(y), templates[int(k)]) for y, k in zip(labels.tolist(), picks.tolist())]


class PromptTokenizer:
    """Character-level prompt tokenizer with a fixed alphabet and a length limit (BOS included)."""

    kind = "char"

    def __init__(self, max_len: int = 48):
        if max_len < 2:
            raise DubokoError(f"max prompt length must be >= 2 tokens, got {max_len}")
        self.max_len = max_len
        self.vocab_size = VOCAB_SIZE

    @staticmethod
    def normalize(prompt: str) -> str:
        return " ".join(prompt.lower().split())

    def encode(self, prompt: str) -> list[int]:
        text = self.normalize(prompt)
        for i, ch in enumerate(text):
            if ch not in _IDS:
                raise DubokoError(
                    f"prompt {prompt!r} has the character {ch!r} (position {i + 1}) that the prompt "
                    f"tokenizer does not know; prompts may use only: letters a-z, digits 0-9, space and {ALPHABET[37:]!r}"
                )
        if len(text) + 1 > self.max_len:
            raise DubokoError(
                f"prompt {prompt!r} is {len(text)} characters long; the model takes at most "
                f"{self.max_len - 1} characters (max_prompt_len {self.max_len}, one token is the prompt start)"
            )
        return [BOS] + [_IDS[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i - 2] for i in ids if i >= 2)

    def batch(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Prompts -> (B, L) LongTensor padded with 0 to the longest prompt."""
        encoded = [self.encode(p) for p in prompts]
        width = max(len(e) for e in encoded)
        out = torch.zeros(len(encoded), width, dtype=torch.long)
        for i, e in enumerate(encoded):
            out[i, : len(e)] = torch.tensor(e)
        return out.to(device) if device is not None else out

    def to_dict(self) -> dict:
        return {"kind": "duboko-prompt-char", "alphabet": ALPHABET, "max_len": self.max_len, "pad": PAD, "bos": BOS}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptTokenizer":
        if d.get("kind") != "duboko-prompt-char" or d.get("alphabet") != ALPHABET:
            raise DubokoError("the run's prompt tokenizer is not the one this duboko version knows (alphabet differs)")
        return cls(int(d["max_len"]))
