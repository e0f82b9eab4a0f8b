"""Parallel text for sequence-to-sequence models: integers <-> English words, and TSV pairs.

Numbers (reproducible, generated):
    number_to_words(4821) == "four thousand eight hundred twenty-one"   (American, no "and")
    words_to_number("four thousand eight hundred twenty-one") == 4821
    NumberSplits(max_number, val_size, test_size, seed): a fixed validation and a fixed held-out
    test set of numbers; `train_numbers(n, epoch)` samples training numbers that are never in
    either (a pure function of seed and epoch). Digit counts are drawn uniformly, so "7" and
    "907305" both occur; held-out numbers are drawn from numbers >= 100 because every smaller
    number is its own word pattern ("seventeen") that training must see.

TSV (a user's own pairs): `read_tsv_pairs(path)` reads "source<TAB>target" lines; the task splits
them into train/val/test with a seed.

`PieceTokenizer`: a small reversible tokenizer for both sides. Text is cut into pieces, each
digit alone, each word with the single space before it (" thousand"), each other character alone,
so decode(encode(text)) == text for text in the vocabulary. Ids 0-3 are <pad> <bos> <eos> <unk>.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from duboko.errors import DubokoError
from duboko.io import atomic_write_json, read_file_bytes, read_json
from duboko.seeding import generator

# ---------------------------------------------------------------------------------------------
# Integers <-> English words.

ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand")]


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    elif n > 0:
        words.append(ONES[n])
    return words


def number_to_words(n: int) -> str:
    """0 <= n < 10^15 in American English words: 907305 -> "nine hundred seven thousand three
    hundred five"."""
    if not 0 <= n < 10**15:
        raise DubokoError(f"number_to_words handles 0 <= n < 10^15, got {n}")
    if n == 0:
        return "zero"
    words = []
    for value, name in SCALES:
        if n >= value:
            words += _below_thousand(n // value) + [name]
            n %= value
    return " ".join(words + _below_thousand(n))


_WORD_VALUES = {w: i for i, w in enumerate(ONES)} | {w: 10 * i for i, w in enumerate(TENS) if w}


def words_to_number(text: str) -> int:
    """Inverse of `number_to_words` (used to check it and the model's answers)."""
    total, group = 0, 0
    tokens = text.replace("-", " ").split()
    if not tokens:
        raise DubokoError("words_to_number got empty text")
    scales = dict((name, value) for value, name in SCALES)
    for tok in tokens:
        if tok in _WORD_VALUES:
            group += _WORD_VALUES[tok]
        elif tok == "hundred":
            group *= 100
        elif tok in scales:
            total += group * scales[tok]
            group = 0
        else:
            raise DubokoError(f"{tok!r} is not a number word")
    return total + group


class NumberSplits:
    """Fixed validation and held-out test numbers, and training numbers that avoid both."""

    def __init__(self, max_number: int = 999_999, val_size: int = 1000, test_size: int = 2000, seed: int = 1234):
        if max_number < 1000:
            raise DubokoError(f"data.max_number must be >= 1000, got {max_number}")
        if val_size + test_size > (max_number - 100) // 2:
            raise DubokoError(
                f"data.val_size + data.test_size ({val_size + test_size}) must be at most half the "
                f"numbers from 100 to {max_number}"
            )
        self.max_number = max_number
        self.max_digits = len(str(max_number))
        self.seed = seed
        g = generator(seed)
        held: list[int] = []
        seen: set[int] = set()
        while len(held) < val_size + test_size:
            n = self._draw(g, min_digits=3)
            if n >= 100 and n not in seen:
                seen.add(n)
                held.append(n)
        self.val = held[:val_size]
        self.test = held[val_size:]
        self.held_out = seen

    def _draw(self, g: torch.Generator, min_digits: int = 1) -> int:
        """A number whose digit count is uniform in [min_digits, max_digits], then uniform."""
        digits = int(torch.randint(min_digits, self.max_digits + 1, (1,), generator=g))
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        hi = min(10**digits - 1, self.max_number)
        return lo + int(torch.randint(0, hi - lo + 1, (1,), generator=g))

    def train_numbers(self, n: int, epoch: int = 0) -> list[int]:
        """n training numbers for `epoch` (new ones each epoch), never validation or test ones."""
        # The training stream of `epoch` is keyed 7919·(epoch + 1) under the split's seed (the key
        # the numbers were always drawn with, so bundled recipes keep their data); never the
        # held-out draw above, which is `generator(seed)` itself.
        g = generator(self.seed, 7919 * (epoch + 1))
        out = []
        while len(out) < n:
            x = self._draw(g)
            if x not in self.held_out:
                out.append(x)
        return out


def number_pair(n: int, direction: str) -> tuple[str, str]:
    """(source, target) for one number: to_words "4821" -> "four thousand ...", to_digits back."""
    digits, words = str(n), number_to_words(n)
    if direction == "to_words":
        return digits, words
    if direction == "to_digits":
        return words, digits
    raise DubokoError(f"unknown direction {direction!r}; expected one of: to_words, to_digits, both")


def number_pairs(numbers: Iterable[int], direction: str) -> list[tuple[str, str]]:
    """Pairs for `direction` ("both": each number in both directions, the two interleaved)."""
    pairs = []
    for n in numbers:
        if direction == "both":
            pairs += [number_pair(n, "to_words"), number_pair(n, "to_digits")]
        else:
            pairs.append(number_pair(n, direction))
    return pairs


# ---------------------------------------------------------------------------------------------
# TSV parallel text.


def read_tsv_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """`source<TAB>target` lines (UTF-8; blank lines and lines starting with # skipped)."""
    path = Path(path).expanduser()
    data = read_file_bytes(path, "pairs file ")  # missing / folder / unreadable: one clear error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DubokoError(f"pairs file {path} is not UTF-8 text (bad byte at offset {exc.start})") from exc
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise DubokoError(
                f"{path}:{lineno}: expected 'source<TAB>target', got {line[:60]!r}"
            )
        pairs.append((parts[0].strip(), parts[1].strip()))
    if len(pairs) < 10:
        raise DubokoError(f"pairs file {path} has {len(pairs)} pairs; need at least 10 to split and train")
    return pairs


def split_pairs(
    pairs: Sequence[tuple[str, str]], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list, list, list]:
    """Shuffle with `seed` and cut into (train, val, test); identical sources stay in one split so
    a test source is never seen in training."""
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DubokoError(
            f"data.val_fraction and data.test_fraction must be in (0, 1) with sum < 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    sources = sorted({s for s, _ in pairs})
    order = torch.randperm(len(sources), generator=generator(seed)).tolist()
    n_val = max(1, round(len(sources) * val_fraction))
    n_test = max(1, round(len(sources) * test_fraction))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[sources[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for p in pairs:
        out[split_of[p[0]]].append(p)
    return out["train"], out["val"], out["test"]


# ---------------------------------------------------------------------------------------------
# Tokenizer.

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
PIECE_PATTERN = re.compile(r"\d| ?[^\W\d_]+|\s+|.", re.UNICODE)
PIECES_FILE = "seq2seq_tokenizer.json"


class PieceTokenizer:
    """Reversible piece-level tokenizer shared by source and target (see the module docstring)."""

    def __init__(self, pieces: Sequence[str]):
        if list(pieces[:4]) != SPECIALS:
            raise ValueError("the vocabulary starts with <pad> <bos> <eos> <unk>")
        self.pieces = list(pieces)
        self.stoi = {p: i for i, p in enumerate(self.pieces)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @staticmethod
    def split(text: str) -> list[str]:
        return PIECE_PATTERN.findall(text)

    @classmethod
    def train(cls, texts: Iterable[str], min_freq: int = 1) -> PieceTokenizer:
        counts = Counter(p for t in texts for p in cls.split(t))
        ranked = sorted((p for p, c in counts.items() if c >= min_freq), key=lambda p: (-counts[p], p))
        return cls(SPECIALS + ranked)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(p, self.unk_id) for p in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.pieces[int(i)] for i in ids if int(i) > 3 or int(i) == self.unk_id)

    def unknown(self, text: str) -> list[str]:
        """Pieces of `text` that are not in the vocabulary."""
        return sorted({p for p in self.split(text) if p not in self.stoi})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "pieces", "pieces": self.pieces}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PieceTokenizer:
        d = read_json(path)
        if not isinstance(d, dict) or d.get("kind") != "pieces" or not isinstance(d.get("pieces"), list):
            raise DubokoError(f"{path} is not a duboko seq2seq tokenizer")
        try:
            return cls(d["pieces"])
        except ValueError as exc:
            raise DubokoError(f"{path} is not a duboko seq2seq tokenizer ({exc})") from exc


def encode_pairs(
    tok: PieceTokenizer, pairs: Sequence[tuple[str, str]], max_len: int
) -> list[tuple[list[int], list[int]]]:
    """Token ids (source + EOS, target + EOS); pairs longer than max_len tokens are dropped."""
    out = []
    for s, t in pairs:
        src = tok.encode(s) + [tok.eos_id]
        tgt = tok.encode(t) + [tok.eos_id]
        if len(src) <= max_len and len(tgt) + 1 <= max_len:
            out.append((src, tgt))
    return out


def collate(
    items: Sequence[tuple[list[int], list[int]]], pad_id: int, bos_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch: src (B, S), tgt_in = BOS + target (B, T), tgt_out = target + EOS (B, T).
    (`items` targets already end in EOS; tgt_in drops it and prepends BOS.)"""
    s_len = max(len(s) for s, _ in items)
    t_len = max(len(t) for _, t in items)
    src = torch.full((len(items), s_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((len(items), t_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((len(items), t_len), pad_id, dtype=torch.long)
    for i, (s, t) in enumerate(items):
        src[i, : len(s)] = torch.tensor(s)
        tgt_out[i, : len(t)] = torch.tensor(t)
        tgt_in[i, : len(t)] = torch.tensor([bos_id] + t[:-1])
    return src, tgt_in, tgt_out
