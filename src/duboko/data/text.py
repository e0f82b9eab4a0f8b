"""Text corpora, a leak-free train/validation split, and the char / word / BPE tokenizers.

Public API (used by the language-model task, the GPT family and the text commands):

    read_corpus(paths)                      -> str      one or more UTF-8 text files (or folders)
    default_corpus_path()                   -> Path     the bundled Shakespeare corpus
    block_split(n, val_fraction, ...)       -> (train_ranges, val_ranges)  contiguous blocks
    take_ranges(ids, ranges)                -> LongTensor  the blocks of `ids`, concatenated
    train_tokenizer(kind, text, vocab_size, min_freq) -> Tokenizer   kind: char | word | bpe
    train_tokenizer_from_texts(kind, texts, ...)          the same from many pieces (a sample)
    load_tokenizer(path) / Tokenizer.save(path)           JSON in the run folder (atomic write)
    Tokenizer: .kind .vocab_size .encode(text) -> list[int] .decode(ids) -> str
               .token_text(id) -> str (how one token reads, for `next-word`)
               .encode_many(texts) -> list[np.ndarray]   fast batch encoding (token files)
    TOKENIZER_FILE = "tokenizer.json"

Every text-data mistake (missing path, empty file, binary file, undecodable bytes) raises
`DubokoError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duboko.errors import DubokoError, unknown_name
from duboko.io import atomic_write_json, read_file_bytes
from duboko.seeding import generator

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_KINDS = ("char", "word", "bpe")
UNK = "<unk>"


# ---------------------------------------------------------------------------------------------
# Corpora.


def default_corpus_path() -> Path:
    """The bundled corpus: 33 Shakespeare plays, `Speaker:` lines, 4.0 MB, 71 characters."""
    return Path(str(resources.files("duboko") / "data" / "bundled" / "shakespeare" / "shakespeare.txt"))


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Paths as given: a file, a folder (its *.txt files, sorted), or several of either. A
    string may list several paths separated by commas or os.pathsep."""
    if isinstance(paths, (str, os.PathLike)):
        text = os.fspath(paths)
        items: list[str] = [p for p in re.split(rf"[,{re.escape(os.pathsep)}]", text) if p.strip()]
    else:
        items = [os.fspath(p) for p in paths]
    if not items:
        raise DubokoError("no text file given; expected a path to a UTF-8 .txt file or a folder of them")
    files: list[Path] = []
    for item in items:
        path = Path(item.strip()).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise DubokoError(f"text folder {path} has no *.txt files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise DubokoError(f"text file {path} does not exist")
    return files


def read_text_file(path: str | os.PathLike) -> str:
    """One UTF-8 text file; empty, binary or unreadable files are refused, naming the file."""
    path = Path(path)
    data = read_file_bytes(path, "text file ")
    if not data.strip():
        raise DubokoError(f"text file {path} is empty; expected UTF-8 text to train on")
    # NUL bytes never occur in text; they do in nearly every binary format (images, archives, pickles).
    if b"\x00" in data[:1 << 16]:
        raise DubokoError(f"text file {path} looks binary (it contains NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DubokoError(
            f"text file {path} is not UTF-8 text (bad byte at offset {exc.start}); "
            "expected a UTF-8 .txt file"
        ) from exc
    return text.replace("\r\n", "\n").lstrip("\ufeff")


def read_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> str:
    """The text of one or more files (blank line between files); None or "" -> bundled corpus."""
    if paths is None or (isinstance(paths, str) and not paths.strip()):
        return read_text_file(default_corpus_path())
    texts = [read_text_file(p) for p in _expand(paths)]
    return "\n".join(t.strip("\n") + "\n" for t in texts)


# ---------------------------------------------------------------------------------------------
# Train/validation split by contiguous blocks.


def block_split(
    n: int, val_fraction: float = 0.1, num_blocks: int = 10, seed: int = 0
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut positions [0, n) into `num_blocks` contiguous blocks and give round(num_blocks ·
    val_fraction) of them (at least one), chosen with `seed`, to validation.

    Returns (train_ranges, val_ranges), each a sorted list of half-open (start, end) ranges; they
    do not overlap and together cover [0, n). Whole blocks (not scattered sequences) keep
    validation text from leaking into training through overlapping windows.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DubokoError(f"data.val_fraction must be between 0 and 1, got {val_fraction!r}")
    if num_blocks < 2:
        raise DubokoError(f"data.split_blocks must be >= 2, got {num_blocks!r}")
    if n < num_blocks * 2:
        raise DubokoError(f"the corpus has only {n} tokens; need at least {num_blocks * 2} to split it")
    edges = [round(i * n / num_blocks) for i in range(num_blocks + 1)]
    n_val = min(num_blocks - 1, max(1, round(num_blocks * val_fraction)))
    val_ids = set(torch.randperm(num_blocks, generator=generator(seed))[:n_val].tolist())
    train, val = [], []
    for i in range(num_blocks):
        (val if i in val_ids else train).append((edges[i], edges[i + 1]))
    return _merge(train), _merge(val)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def take_ranges(ids: torch.Tensor, ranges: Iterable[tuple[int, int]]) -> torch.Tensor:
    """The given ranges of a 1-D tensor, concatenated."""
    return torch.cat([ids[a:b] for a, b in ranges])


# ---------------------------------------------------------------------------------------------
# Tokenizers.


class Tokenizer:
    """Text <-> token ids. Subclasses: CharTokenizer, WordTokenizer, BPETokenizer."""

    kind: str = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (for `next-word` listings)."""
        return self.decode([token_id])

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode several texts; each result is what `encode` gives, as an int64 array."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically."""
        atomic_write_json(path, self.to_dict())


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the corpus' characters, sorted."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted({c for c in text if c not in self.stoi})
            raise DubokoError(
                f"characters {''.join(missing)!r} are not in this model's vocabulary of "
                f"{self.vocab_size} characters: {''.join(self.chars)!r}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        # Vectorized: code points (UTF-32) looked up in the sorted vocabulary's code points
        # (sorted strings of one character sort by code point). ~50x faster than `encode`.
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        out = []
        for text in texts:
            points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
            ids = np.searchsorted(codes, points)
            bad = (ids >= len(codes)) | (codes[np.minimum(ids, len(codes) - 1)] != points)
            if bad.any():
                self.encode(text)  # raises, naming the unknown characters
            out.append(ids.astype(np.int64))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


# GPT-2-style pre-tokenization: a word or a punctuation mark takes the single space before it
# (" the", " ,"), and whitespace runs are tokens of their own. Every character falls in exactly one
# piece, so "".join(pieces) == text and decoding is exact for words in the vocabulary.
WORD_PATTERN = re.compile(r" ?\w+(?:'\w+)*| ?[^\w\s]|\s+(?!\S)|\s+")


class WordTokenizer(Tokenizer):
    """Whole words (with their leading space), punctuation and whitespace runs; the most frequent
    `vocab_size - 1` pieces of the training text, everything else -> `<unk>` (id 0)."""

    kind = "word"

    def __init__(self, tokens: Sequence[str]):
        if not tokens or tokens[0] != UNK:
            raise ValueError("a word vocabulary starts with <unk>")
        self.tokens = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.tokens)}

    @staticmethod
    def pieces(text: str) -> list[str]:
        return WORD_PATTERN.findall(text)

    @classmethod
    def train(cls, text: str, vocab_size: int = 10000, min_freq: int = 1) -> WordTokenizer:
        return cls.train_texts([text], vocab_size, min_freq)

    @classmethod
    def train_texts(cls, texts: Iterable[str], vocab_size: int = 10000, min_freq: int = 1) -> WordTokenizer:
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(cls.pieces(text))
        ranked = sorted((c for c in counts.items() if c[1] >= min_freq), key=lambda kv: (-kv[1], kv[0]))
        limit = vocab_size - 1 if vocab_size > 0 else len(ranked)
        return cls([UNK] + [t for t, _ in ranked[:limit] if t != UNK])

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(p, 0) for p in self.pieces(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[int(i)] for i in ids)

    def token_text(self, token_id: int) -> str:
        return self.tokens[int(token_id)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "word", "tokens": self.tokens}


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with Hugging Face `tokenizers` (GPT-2's scheme): any text encodes,
    and decoding is exact."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = 2000, min_freq: int = 2) -> BPETokenizer:
        return cls.train_texts([text], vocab_size, min_freq)

    @classmethod
    def train_texts(cls, texts: Iterable[str], vocab_size: int = 2000, min_freq: int = 2) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size <= len(alphabet):
            raise DubokoError(f"data.vocab_size for bpe must exceed {len(alphabet)} (the bytes), got {vocab_size}")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=max(1, min_freq), initial_alphabet=alphabet,
            show_progress=False, special_tokens=[],
        )
        # Train from line chunks so the tokenizers library sees many small sequences.
        def chunks() -> Iterator[str]:
            for text in texts:
                lines = text.splitlines(keepends=True)
                for i in range(0, len(lines), 64):
                    yield "".join(lines[i:i + 64])

        tok.train_from_iterator(chunks(), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs the texts in parallel in Rust.
        return [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(list(texts))]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "hf": json.loads(self.hf.to_str())}


def train_tokenizer(kind: str, text: str, vocab_size: int = 0, min_freq: int = 1) -> Tokenizer:
    """Train a tokenizer on `text`. vocab_size 0 -> 10000 (word) / 2000 (bpe); char ignores it."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "word":
        return WordTokenizer.train(text, vocab_size or 10000, min_freq)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size or 2000, max(min_freq, 2))
    raise unknown_name("tokenizer", kind, TOKENIZER_KINDS)


def train_tokenizer_from_texts(kind: str, texts: Sequence[str], vocab_size: int = 0, min_freq: int = 1) -> Tokenizer:
    """`train_tokenizer` on several pieces of text (a sample of a corpus too big to hold)."""
    if kind == "char":
        return CharTokenizer(sorted(set().union(*map(set, texts))))
    if kind == "word":
        return WordTokenizer.train_texts(texts, vocab_size or 10000, min_freq)
    if kind == "bpe":
        return BPETokenizer.train_texts(texts, vocab_size or 2000, max(min_freq, 2))
    raise unknown_name("tokenizer", kind, TOKENIZER_KINDS)


def _distinct_strings(items: Any, kind: str, single_chars: bool = False) -> list[str]:
    """A saved vocabulary, checked: a list of distinct strings (single characters for `char`)."""
    what = "single characters" if single_chars else "strings"
    if (
        not isinstance(items, list)
        or not all(isinstance(x, str) and (len(x) == 1 or not single_chars) for x in items)
        or len(set(items)) != len(items)
    ):
        raise DubokoError(f"a {kind} tokenizer's vocabulary must be a list of distinct {what}")
    return items


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(_distinct_strings(d["chars"], "char", single_chars=True))
    if kind == "word":
        return WordTokenizer(_distinct_strings(d["tokens"], "word"))
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(d["hf"])))
    raise unknown_name("tokenizer kind", kind, TOKENIZER_KINDS)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save` (a run folder's tokenizer.json, or the folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    from duboko.io import read_json

    d = read_json(path)
    try:
        return tokenizer_from_dict(d)
    except (KeyError, TypeError, ValueError, Exception) as exc:
        if isinstance(exc, DubokoError):
            raise
        raise DubokoError(f"{path} is not a duboko tokenizer ({exc})") from exc
