"""Token folders (duboko.data.tokens): streaming reads equal `read_corpus`, chunk boundaries never
change the tokens, the split is the LM task's, and corrupted folders fail with one clear error."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duboko.data.text import block_split, default_corpus_path, read_corpus, train_tokenizer
from duboko.data.tokens import (
    HEADER_FILE,
    TRAIN_FILE,
    _dtype_for,
    _segments,
    feistel_permutation,
    iter_corpus,
    open_token_folder,
    prepare_tokens,
)
from duboko.errors import DubokoError

# Multibyte characters (2, 3 and 4 UTF-8 bytes), whitespace runs, CRLF, contractions, digits.
MIXED = (
    "\ufeffFirst Citizen:\r\nBefore we proceed, héar me spéak.\r\n\r\n"
    "  All:\n\tSpeak, speak — 東京 naïve 🙂 it's 42.\n\n\n"
    "ROMEO:\n    indented   words\n \n  trailing  \n"
) * 40


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_bytes(MIXED.encode("utf-8"))
    (d / "b.txt").write_bytes(("\n\n" + default_corpus_path().read_text(encoding="utf-8")[:30_000] + "\n\n\n").encode())
    return d


def test_streamed_text_equals_read_corpus_for_any_chunk_size(corpus_dir):
    whole = read_corpus(corpus_dir)
    for chunk in (1, 2, 3, 7, 64, 4096, 1 << 20):  # 1..3 bytes split every multibyte character
        assert "".join(iter_corpus(corpus_dir, chunk)) == whole


def test_streaming_refuses_bad_files_like_read_text_file(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n ")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.txt").write_bytes(b"ok " * 1000 + b"caf\xe9")
    for name, words in (("empty", "is empty"), ("bin", "looks binary"), ("latin1", r"not UTF-8 text \(bad byte at offset 3003\)")):
        with pytest.raises(DubokoError, match=words):
            list(iter_corpus(tmp_path / f"{name}.txt", 64))
    with pytest.raises(DubokoError, match="does not exist"):
        list(iter_corpus(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def tokenizers():
    text = read_corpus(default_corpus_path())[:60_000] + MIXED
    return {kind: train_tokenizer(kind, text, 400) for kind in ("char", "word", "bpe")}


def _chunked_ids(tok, text: str, chunk: int) -> list[int]:
    n = len(text)
    segs = list(_segments(iter([text]), [(0, n)], [], chunk, {"forced_cuts": 0}))
    assert "".join(s.text for s in segs) == text
    return [i for ids in tok.encode_many([s.text for s in segs]) for i in ids.tolist()]


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_chunk_boundaries_never_change_the_tokens(kind, tokenizers):
    tok = tokenizers[kind]
    text = MIXED * 3
    whole = tok.encode(text)
    for chunk in (16, 33, 100, 1000):
        assert _chunked_ids(tok, text, chunk) == whole


ALPHABET = st.sampled_from(list("ab Z9'.,\n\n\t  éü東🙂-"))


@settings(max_examples=60, deadline=None)
@given(st.lists(ALPHABET, min_size=1, max_size=400).map("".join), st.integers(8, 64))
def test_chunk_boundaries_property(tokenizers, text, chunk):
    for kind in ("word", "bpe"):
        tok = tokenizers[kind]
        assert _chunked_ids(tok, text, chunk) == tok.encode(text), kind


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_text_tokens_text_and_the_lm_split(kind, corpus_dir, tmp_path):
    header = prepare_tokens(corpus_dir, tmp_path / "t", kind, vocab_size=300, chunk_bytes=1024)
    folder = open_token_folder(tmp_path / "t", verify=True)
    text = read_corpus(corpus_dir)
    train_r, val_r = block_split(len(text), 0.1, 10, 0)
    assert header["split"]["train_ranges"] == [list(r) for r in train_r] and header["characters"] == len(text)
    tok = folder.tokenizer
    assert tok.decode(folder.train.tolist()) == "".join(text[a:b] for a, b in train_r)
    assert tok.decode(folder.val.tolist()) == "".join(text[a:b] for a, b in val_r)
    # Each block is tokenized on its own, exactly as the in-memory task does.
    expected = [i for a, b in train_r for i in tok.encode(text[a:b])]
    assert folder.train.tolist() == expected
    assert folder.train.dtype == np.dtype("<u2") and header["dtype"] == "uint16"
    # Another chunk size gives byte-identical files.
    again = prepare_tokens(corpus_dir, tmp_path / "u", kind, vocab_size=300, chunk_bytes=1 << 20)
    assert again["train"]["sha256"] == header["train"]["sha256"] and again["val"]["sha256"] == header["val"]["sha256"]


def test_char_tokens_equal_the_in_memory_lm_task(corpus_dir, tmp_path):
    from duboko.config import resolve
    from duboko.tasks.language_model import LanguageModelTask

    prepare_tokens(corpus_dir, tmp_path / "t", "char", chunk_bytes=2048)
    tasks = []
    for key in ("data.path", "data.data_dir"):
        cfg = resolve("text-lstm", [f"{key}={corpus_dir if key == 'data.path' else tmp_path / 't'}", "data.seq_len=16"])
        task = LanguageModelTask(cfg, torch.device("cpu"))
        task.setup()
        tasks.append(task)
    mem, mapped = tasks
    assert isinstance(mapped.train_ids, np.memmap) and not mapped.train_ids.flags.writeable
    assert mem.train_ids.tolist() == mapped.train_ids.tolist() and mem.val_ids.tolist() == mapped.val_ids.tolist()
    assert mem.tokenizer.to_dict() == mapped.tokenizer.to_dict()


def test_bounded_sample_trains_the_tokenizer_on_training_text_only(corpus_dir, tmp_path):
    header = prepare_tokens(corpus_dir, tmp_path / "t", "word", vocab_size=200, sample_chars=1 << 16)
    assert 0 < header["tokenizer"]["trained_on_chars"] <= 1 << 16
    assert header["tokenizer"]["vocab_size"] == 200


def test_dtype_follows_the_vocabulary():
    assert _dtype_for(256) == "uint16" and _dtype_for(65536) == "uint16" and _dtype_for(65537) == "uint32"


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 4097])
def test_feistel_is_a_permutation(n):
    keys = [11, 22, 33, 44]
    perm = feistel_permutation(torch.arange(n), n, keys)
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 1000:
        assert (perm != torch.arange(n)).float().mean() > 0.9  # shuffled
        assert not torch.equal(perm, feistel_permutation(torch.arange(n), n, [1, 2, 3, 4]))


@pytest.fixture()
def folder(corpus_dir, tmp_path):
    prepare_tokens(corpus_dir, tmp_path / "t", "char")
    return tmp_path / "t"


def _edit_header(folder: Path, **changes):
    h = json.loads((folder / HEADER_FILE).read_text())
    for k, v in changes.items():
        section, _, key = k.partition("__")
        if key:
            h[section][key] = v
        else:
            h[section] = v
    (folder / HEADER_FILE).write_text(json.dumps(h))


@pytest.mark.parametrize("damage, words", [
    (lambda f: (f / TRAIN_FILE).write_bytes((f / TRAIN_FILE).read_bytes()[:-2]), "is truncated or was changed"),
    (lambda f: (f / TRAIN_FILE).write_bytes((f / TRAIN_FILE).read_bytes() + b"x"), "is truncated or was changed"),
    (lambda f: _edit_header(f, dtype="float32"), "dtype 'float32' is not one of"),
    (lambda f: _edit_header(f, version=99), "version 99"),
    (lambda f: _edit_header(f, format="other"), "not a duboko token header"),
    (lambda f: _edit_header(f, train__tokens="many"), "train.tokens = 'many' is not a valid value"),
    (lambda f: _edit_header(f, train__file="../escape.bin"), "must be a file name inside the folder"),
    (lambda f: _edit_header(f, tokenizer__vocab_size=5), "the folder is inconsistent"),
    (lambda f: (f / HEADER_FILE).write_text("{not json"), "tokens.json"),
    (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
    (lambda f: (f / TRAIN_FILE).write_bytes(b"\xff\xff" * (os.path.getsize(f / TRAIN_FILE) // 2)), "outside the tokenizer"),
])
def test_corrupted_folders_give_one_line_errors(folder, damage, words):
    damage(folder)
    with pytest.raises(DubokoError, match=words) as info:
        open_token_folder(folder)
    assert "\n" not in str(info.value)


def test_verify_catches_changed_tokens_and_header_size_is_bounded(folder, monkeypatch):
    data = bytearray((folder / TRAIN_FILE).read_bytes())
    data[(len(data) // 2) & ~1] ^= 1  # the low byte of one token: changed, still in range
    (folder / TRAIN_FILE).write_bytes(bytes(data))
    open_token_folder(folder)  # the cheap checks pass
    with pytest.raises(DubokoError, match="sha256"):
        open_token_folder(folder, verify=True)
    import duboko.data.tokens as tokens

    monkeypatch.setattr(tokens, "MAX_HEADER_BYTES", 100)
    with pytest.raises(DubokoError):
        open_token_folder(folder)


def test_missing_and_existing_folders(tmp_path, folder, corpus_dir):
    with pytest.raises(DubokoError, match="does not exist"):
        open_token_folder(tmp_path / "nope")
    with pytest.raises(DubokoError, match="not a token folder"):
        open_token_folder(corpus_dir)
    with pytest.raises(DubokoError, match="already holds a token folder"):
        prepare_tokens(corpus_dir, folder, "char")
    prepare_tokens(corpus_dir, folder, "char", overwrite=True)
    assert not list(folder.glob("*.tmp"))


def _rss_anon_kb() -> int:
    """Private resident memory (KiB). The file-backed part of RSS is page cache the kernel maps
    on access (whole large folios, up to 2 MB per touch here) and reclaims at will; it is not
    memory the program holds."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status: cannot read the resident set size on this system")


@pytest.mark.parametrize("stateful", [True, False])
def test_memory_does_not_grow_with_the_token_file(folder, tmp_path, stateful):
    """A 64 MB token file (32M tokens) costs the task no more private memory than the small one:
    it is mapped, not read, and the per-epoch draws are made per batch."""
    from duboko.config import resolve
    from duboko.tasks.language_model import LanguageModelTask

    big = tmp_path / "big"
    shutil.copytree(folder, big)
    n = 32 << 20
    rng = np.random.default_rng(0)
    with open(big / TRAIN_FILE, "wb") as f:
        for _ in range(n // (1 << 22)):
            f.write(rng.integers(0, 20, 1 << 22, dtype=np.uint16).tobytes())
    _edit_header(big, train__tokens=n)
    costs = []
    for path in (folder, big):
        cfg = resolve("text-lstm", [f"data.data_dir={path}", "data.seq_len=32", "train.batch_size=8",
                                    f"data.stateful={str(stateful).lower()}"])
        before = _rss_anon_kb()
        task = LanguageModelTask(cfg, torch.device("cpu"))
        task.setup()
        for i, b in zip(range(5), task.train_batches(epoch=0)):
            assert b["x"].shape == (8, 32) and b["x"].dtype == torch.int64
            assert torch.equal(b["x"][:, 1:], b["y"][:, :-1])
        costs.append(_rss_anon_kb() - before)
        del task
    assert costs[1] < costs[0] + 8 * 1024, costs  # KiB: far below the 64 MB file
