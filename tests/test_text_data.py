"""Text corpora, the contiguous block split and the char / word / BPE tokenizers."""

import pytest
import torch

from duboko.data.text import (
    WordTokenizer,
    block_split,
    default_corpus_path,
    load_tokenizer,
    read_corpus,
    read_text_file,
    take_ranges,
    train_tokenizer,
)
from duboko.errors import DubokoError

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n"
) * 3


def test_bundled_corpus_is_readable():
    text = read_text_file(default_corpus_path())
    assert len(text) > 4_000_000 and "ROMEO" in text.upper()


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_tokenizers_round_trip_and_save_load(kind, tmp_path):
    tok = train_tokenizer(kind, TEXT, vocab_size=300 if kind == "bpe" else 0)
    ids = tok.encode(TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)  # a run folder works too
    assert again.kind == kind and again.vocab_size == tok.vocab_size
    assert again.encode(TEXT) == ids and again.decode(ids) == TEXT


def test_bpe_encodes_unseen_text_exactly():
    tok = train_tokenizer("bpe", TEXT, vocab_size=300)
    odd = "Zebra café — naïve 42 ✓"
    assert tok.decode(tok.encode(odd)) == odd
    assert len(tok.encode("First Citizen:")) < len("First Citizen:")  # merges were learned


def test_word_tokenizer_pieces_unknown_and_vocab_limit():
    assert WordTokenizer.pieces("The cat sat on the mat.\n") == ["The", " cat", " sat", " on", " the", " mat", ".", "\n"]
    text = "a b a c a b\n"
    tok = train_tokenizer("word", text, vocab_size=3)  # <unk> + the two most frequent pieces
    assert tok.tokens == ["<unk>", " a", " b"]
    assert tok.decode(tok.encode(" a b zebra")) == " a b<unk>"
    tok2 = train_tokenizer("word", text, min_freq=2)
    assert set(tok2.tokens) == {"<unk>", " a", " b"}


def test_char_tokenizer_refuses_unknown_characters():
    tok = train_tokenizer("char", "abc")
    with pytest.raises(DubokoError, match="not in this model's vocabulary"):
        tok.encode("abz")


def test_block_split_covers_everything_without_overlap():
    for n, blocks, frac, seed in [(1000, 10, 0.1, 0), (12345, 20, 0.25, 3), (50, 5, 0.5, 1)]:
        train, val = block_split(n, frac, blocks, seed)
        covered = torch.zeros(n, dtype=torch.int)
        for a, b in train + val:
            covered[a:b] += 1
        assert bool((covered == 1).all())  # every position in exactly one split
        n_val = sum(b - a for a, b in val)
        assert abs(n_val - n * max(1, round(blocks * frac)) / blocks) <= blocks
        ids = torch.arange(n)
        t, v = take_ranges(ids, train), take_ranges(ids, val)
        assert len(set(t.tolist()) & set(v.tolist())) == 0 and len(t) + len(v) == n
    assert block_split(1000, 0.1, 10, 0) == block_split(1000, 0.1, 10, 0)  # seeded


def test_block_split_rejects_bad_fractions():
    with pytest.raises(DubokoError, match="val_fraction"):
        block_split(100, 0.0)
    with pytest.raises(DubokoError, match="too few|only"):
        block_split(5, 0.1, 10)


def test_empty_binary_and_missing_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DubokoError, match=r"empty\.txt is empty"):
        read_corpus(str(empty))
    with pytest.raises(DubokoError, match=r"weights\.bin looks binary"):
        read_corpus(str(binary))
    with pytest.raises(DubokoError, match=r"latin1\.txt is not UTF-8"):
        read_corpus(str(latin))
    with pytest.raises(DubokoError, match=r"nope\.txt does not exist"):
        read_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(DubokoError, match="has no"):
        read_corpus(str(tmp_path / "sub")) if (tmp_path / "sub").mkdir() is None else None


def test_several_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    both = read_corpus(f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}")
    assert both == read_corpus(str(tmp_path)) == "alpha\n\nbeta\n"


from hypothesis import given, settings
from hypothesis import strategies as st

_BPE = None


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_round_trip_property_any_text(text):
    # char and word tokenizers trained on the text itself must give it back exactly ...
    for kind in ("char", "word"):
        tok = train_tokenizer(kind, text)
        assert tok.decode(tok.encode(text)) == text
    # ... and byte-level BPE gives back any text, even characters it never saw.
    global _BPE
    if _BPE is None:
        _BPE = train_tokenizer("bpe", TEXT, vocab_size=300)
    assert _BPE.decode(_BPE.encode(text)) == text
