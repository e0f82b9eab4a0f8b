"""Property-based fuzzing (hypothesis) of the input parsers: the IDX reader, image loading, the
config parser (`parse_value`, `resolve` with random overrides) and the text tokenizers.

Property: any input either parses into something well-formed or raises `DubokoError`; never any
other exception. Example counts are set per test (EXAMPLES) so the file stays well under a minute
on one thread; the total is printed by `test_example_budget`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from duboko import config as C
from duboko.data import idx
from duboko.errors import DubokoError
from duboko.tasks.image_classification import ImageClassificationTask

EXAMPLES = {
    "idx_random_bytes": 1500,
    "idx_structured": 1500,
    "image_random_bytes": 300,
    "image_valid_and_mutated": 400,
    "parse_value": 2000,
    "resolve": 600,
    "parse_overrides": 600,
    "char_word_tokenizers": 600,
    "bpe_tokenizer": 40,
    "load_tokenizer": 300,
}


def fuzz(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_example_budget():
    total = sum(EXAMPLES.values())
    print(f"hypothesis examples: {EXAMPLES} total {total}")
    assert total >= 5000


# ---------------------------------------------------------------------------------------------
# IDX reader.


def _check_idx(data: bytes, expected_shape=None) -> None:
    try:
        array = idx.parse(data, "fuzz.idx", expected_shape)
    except DubokoError:
        return
    # Accepted: the header must describe exactly the payload.
    ndim = data[3]
    assert array.ndim == ndim
    header = 4 + 4 * ndim
    assert array.nbytes == len(data) - header
    assert tuple(array.shape) == struct.unpack(f">{ndim}I", data[4:header])


@fuzz("idx_random_bytes")
@given(st.binary(max_size=96))
def test_idx_random_bytes(data):
    _check_idx(data)


@st.composite
def idx_files(draw):
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x07, 0xFF]))
    ndim = draw(st.integers(0, 6))
    small = st.integers(0, 6)
    huge = st.sampled_from([2**16, 2**31 - 1, 2**31, 2**32 - 1])
    dims = draw(st.lists(st.one_of(small, small, huge), min_size=ndim, max_size=ndim))
    zero = draw(st.sampled_from([0, 0, 0, 1, 0x0100]))
    head = struct.pack(">HBB", zero, code, ndim) + b"".join(struct.pack(">I", d) for d in dims)
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(code, 1)
    need = int(np.prod([d for d in dims if d < 2**16], dtype=np.int64)) * itemsize if dims else 0
    size = draw(st.one_of(st.just(need), st.integers(0, 200), st.just(max(0, need - 1)), st.just(need + 1)))
    payload = draw(st.binary(min_size=min(size, 300), max_size=min(size, 300)))
    cut = draw(st.one_of(st.none(), st.integers(0, len(head))))
    data = head + payload
    if cut is not None:
        data = head[:cut]
    expected = draw(st.one_of(st.none(), st.just(tuple(dims)), st.lists(st.integers(0, 4), max_size=3).map(tuple)))
    return data, expected


@fuzz("idx_structured")
@given(idx_files())
def test_idx_structured(case):
    data, expected = case
    _check_idx(data, expected)


# ---------------------------------------------------------------------------------------------
# Image loading (`predict`'s reader).

_TMP = tempfile.TemporaryDirectory(prefix="duboko_fuzz_")
_TASK = ImageClassificationTask.__new__(ImageClassificationTask)


def _check_image(data: bytes, suffix: str) -> None:
    path = Path(_TMP.name) / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        array, inverted = _TASK.load_image_file(str(path))
    except DubokoError:
        return
    assert tuple(array.shape) == (28, 28) and str(array.dtype) == "torch.uint8" and isinstance(inverted, bool)


@fuzz("image_random_bytes")
@given(st.binary(max_size=400), st.sampled_from([".png", ".jpg", ".bmp", ".gif", ".tiff", ".webp", ""]))
def test_image_random_bytes(data, suffix):
    _check_image(data, suffix)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I", "F", "I;16", "YCbCr", "HSV"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff", "WEBP": ".webp", "PPM": ".ppm"}


@st.composite
def image_files(draw):
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    try:
        img = base.convert(mode)
    except ValueError:
        img = base
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    buffer = io.BytesIO()
    try:
        img.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        img.convert("RGB").save(buffer, format="PNG")
        fmt = "PNG"
    data = bytearray(buffer.getvalue())
    mutation = draw(st.sampled_from(["none", "none", "flip", "truncate", "append"]))
    if mutation == "flip" and data:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "append":
        data += draw(st.binary(max_size=64))
    return bytes(data), FORMATS[fmt]


@fuzz("image_valid_and_mutated")
@given(image_files())
def test_image_valid_and_mutated(case):
    data, suffix = case
    _check_image(data, suffix)


# ---------------------------------------------------------------------------------------------
# Config parser.


@fuzz("parse_value")
@given(st.one_of(st.text(max_size=40), st.from_regex(r"\A[\[\{\"'0-9eE.+\-a-z, \]\}:=]{0,30}\Z")))
def test_parse_value_never_raises(text):
    C.parse_value(text)  # any text is a value: a literal or, failing that, the bare string


_RAW = {**C.load_recipe_file("mnist-cnn")[1], "recipe": "mnist-cnn"}
_KEYS = sorted(
    {f"train.{k}" for k in C.TrainConfig.__dataclass_fields__}
    | {f"data.{k}" for k in ImageClassificationTask.data_config.__dataclass_fields__}
    | {f"model.{k}" for k in ("name", "in_channels", "image_size", "num_classes", "dropout")}
    | {"epochs", "lr", "batch_size", "dropout", "image_size", "seed"}
)
_VALUES = st.one_of(
    st.text(max_size=12).map(C.parse_value),
    st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["my_net", "my_net_28", "mlp", "gpt-tiny", "nope", "adam", "sgd", "cosine", "fp32", "bf16", "stop", "skip", "mnist"]),
)
_OVERRIDE_KEYS = st.one_of(st.sampled_from(_KEYS), st.sampled_from(_KEYS), st.text(max_size=12),
                           st.sampled_from(["model.", ".lr", "train..lr", "a.b.c", "=", ""]))


@fuzz("resolve")
@given(st.lists(st.tuples(_OVERRIDE_KEYS, _VALUES), max_size=5))
def test_resolve_with_random_overrides(overrides):
    try:
        cfg = C.resolve(_RAW, overrides)
    except DubokoError:
        return
    # Accepted: a typed config that survives its own round trip through config.json.
    assert isinstance(cfg.train, C.TrainConfig)
    assert all(v == v and abs(v) != float("inf") for v in vars(cfg.train).values() if isinstance(v, float))
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    assert json.dumps(C.resolve(json.loads(text)).to_dict(), sort_keys=True) == text


@fuzz("parse_overrides")
@given(st.lists(st.text(max_size=30), max_size=4))
def test_parse_overrides_of_raw_cli_text(items):
    try:
        pairs = C.parse_overrides(items)
        C.resolve(_RAW, pairs)
    except DubokoError:
        pass


# ---------------------------------------------------------------------------------------------
# Tokenizers (the text family's data/text.py; skipped when it is absent).

try:
    from duboko.data import text as text_mod
except ImportError:  # the text family is not there: only its tests skip
    text_mod = None
needs_text = pytest.mark.skipif(text_mod is None, reason="duboko.data.text is not present")
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


@needs_text
@fuzz("char_word_tokenizers")
@given(_TEXT, _TEXT, st.integers(0, 50), st.integers(0, 3))
def test_char_and_word_tokenizers(train_text, other, vocab, min_freq):
    for kind in ("char", "word"):
        try:
            tok = text_mod.train_tokenizer(kind, train_text, vocab, min_freq)
        except DubokoError:
            continue
        ids = tok.encode(train_text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        if kind == "char" or vocab == 0 and min_freq <= 1:
            assert tok.decode(ids) == train_text  # exact round trip on the training text
        try:
            other_ids = tok.encode(other)
        except DubokoError:
            continue
        assert all(0 <= i < tok.vocab_size for i in other_ids)
        tok.decode(other_ids)
        # Saved and loaded (JSON), it encodes the same.
        again = text_mod.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
        assert again.encode(other) == other_ids


@needs_text
@fuzz("bpe_tokenizer")
@given(st.text(max_size=300), _TEXT, st.one_of(st.integers(257, 400), st.just(100)))
def test_bpe_tokenizer(train_text, other, vocab):
    try:
        tok = text_mod.train_tokenizer("bpe", train_text, vocab)
    except DubokoError:
        return
    for text in (train_text, other):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text  # byte-level BPE decodes exactly


_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12,
)


@needs_text
@fuzz("load_tokenizer")
@given(st.one_of(
    _JSONISH,
    st.fixed_dictionaries({"kind": st.sampled_from(["char", "word", "bpe", "x"])}, optional={
        "chars": _JSONISH, "tokens": _JSONISH, "hf": _JSONISH}),
))
def test_load_tokenizer_from_random_json(obj):
    path = Path(_TMP.name) / "tokenizer.json"
    path.write_text(json.dumps(obj))
    try:
        tok = text_mod.load_tokenizer(path)
    except DubokoError:
        return
    tok.vocab_size  # noqa: B018 - a loaded tokenizer answers its basic questions
