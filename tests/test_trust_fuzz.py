"""Property-based fuzzing (hypothesis) of everything duboko reads from outside: the IDX reader,
image loading (`predict`'s reader), the config parser (`parse_value`, `parse_overrides`,
`resolve` of random overrides and of random config.json documents), the text tokenizers,
manifests, whole run folders (a real run, mutated, optionally re-hashed so that the parsers
behind the hash see the crafted bytes) and CLI argument vectors (`main(argv)` called directly).

Property: any input either parses into something well-formed or raises `DubokoError` (the CLI:
exit 0 or 2); never any other exception.

Fresh examples every run: the seed is drawn at import unless DUBOKO_FUZZ_SEED is set, printed by
`test_fuzz_totals` (run with `-s` to see it) and attached (hypothesis' `note`) to any failing
example, so `DUBOKO_FUZZ_SEED=<seed> pytest tests/test_trust_fuzz.py` replays a failure. Large
inputs (up to 1 MiB of bytes, 512×512 images) are generated with numpy from a drawn seed, so
that hypothesis' own buffer stays small. `test_fuzz_totals` counts the examples that actually
ran (≥ 20,000 when the whole file runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import struct
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from PIL import Image

from duboko import config as C
from duboko.data import idx
from duboko.data import text as text_mod
from duboko.errors import DubokoError
from duboko.tasks.image_classification import ImageClassificationTask

SEED = int(os.environ.get("DUBOKO_FUZZ_SEED") or secrets.randbits(32))
EXAMPLES = {
    "idx_random_bytes": 5000,
    "idx_large": 300,
    "idx_structured": 400,
    "image_random_bytes": 1200,
    "image_valid_and_mutated": 500,
    "image_huge_header": 150,
    "parse_value": 8000,
    "resolve": 400,
    "parse_overrides": 400,
    "config_json": 1000,
    "char_word_tokenizers": 2500,
    "bpe_tokenizer": 30,
    "load_tokenizer": 300,
    "manifest": 300,
    "run_folder": 100,
    "cli_argv": 300,
}
MIN_TOTAL = 20_000
COUNTS: Counter[str] = Counter()


def fuzz(name: str):
    """Hypothesis settings of one target: its example count, this run's seed (offset per target
    so that the targets do not all draw the same first bytes), no example database."""
    offset = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)

    def wrap(test):
        configured = settings(max_examples=EXAMPLES[name], deadline=None, database=None,
                              suppress_health_check=list(HealthCheck))(test)
        return seed((SEED + offset) % 2**32)(configured)

    return wrap


def count(name: str) -> None:
    COUNTS[name] += 1
    note(f"replay with DUBOKO_FUZZ_SEED={SEED}")


_TMP = tempfile.TemporaryDirectory(prefix="duboko_fuzz_")
TMP = Path(_TMP.name)


def _big_bytes(rng_seed: int, size: int) -> bytes:
    return np.random.default_rng(rng_seed).integers(0, 256, size, dtype=np.uint8).tobytes()


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
    if expected_shape is not None:
        assert tuple(array.shape) == tuple(expected_shape)


@fuzz("idx_random_bytes")
@given(st.binary(max_size=2048))
def test_idx_random_bytes(data):
    count("idx_random_bytes")
    _check_idx(data)


@fuzz("idx_large")
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**20), st.binary(min_size=0, max_size=16))
def test_idx_large_random_payload(rng_seed, size, head):
    """Up to 1 MiB: a real-looking header (or random bytes) in front of random payload."""
    count("idx_large")
    _check_idx(head + _big_bytes(rng_seed, size))
    # A valid uint8 header for exactly this payload, as one flat vector or a square-ish matrix.
    _check_idx(struct.pack(">HBBI", 0, 0x08, 1, size) + _big_bytes(rng_seed, size))


@st.composite
def idx_files(draw):
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x07, 0xFF]))
    ndim = draw(st.integers(0, 8))
    small = st.integers(0, 40)
    huge = st.sampled_from([2**16, 2**24, 2**31 - 1, 2**31, 2**32 - 1])
    dims = draw(st.lists(st.one_of(small, small, huge), min_size=ndim, max_size=ndim))
    zero = draw(st.sampled_from([0, 0, 0, 1, 0x0100]))
    head = struct.pack(">HBB", zero, code, ndim) + b"".join(struct.pack(">I", d) for d in dims)
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(code, 1)
    need = int(np.prod([d for d in dims if d < 2**16], dtype=np.int64)) * itemsize if dims else 0
    need = min(need, 2**14)
    size = draw(st.one_of(st.just(need), st.integers(0, 4096), st.just(max(0, need - 1)), st.just(need + 1)))
    payload = _big_bytes(draw(st.integers(0, 2**32 - 1)), size)
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, len(head))))
    data = head[:cut] if cut is not None else head + payload
    expected = draw(st.one_of(st.none(), st.just(tuple(dims)), st.lists(st.integers(0, 40), max_size=3).map(tuple)))
    return data, expected


@fuzz("idx_structured")
@given(idx_files())
def test_idx_structured(case):
    count("idx_structured")
    data, expected = case
    _check_idx(data, expected)


# ---------------------------------------------------------------------------------------------
# Image loading (`predict`'s reader).

_TASK = ImageClassificationTask.__new__(ImageClassificationTask)


def _check_image(data: bytes, suffix: str) -> None:
    path = TMP / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        array, inverted = _TASK.load_image_file(str(path))
    except DubokoError:
        return
    assert tuple(array.shape) == (28, 28) and str(array.dtype) == "torch.uint8" and isinstance(inverted, bool)


SUFFIXES = [".png", ".jpg", ".bmp", ".gif", ".tiff", ".webp", ".ppm", ""]


@fuzz("image_random_bytes")
@given(st.one_of(st.binary(max_size=1024), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**16)).map(
    lambda t: _big_bytes(*t))), st.sampled_from(SUFFIXES), st.sampled_from(
    [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF89a", b"II*\x00", b"MM\x00*", b"RIFF", b"P5\n"]))
def test_image_random_bytes(data, suffix, magic):
    count("image_random_bytes")
    _check_image(magic + data, suffix)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I", "F", "I;16", "YCbCr", "HSV", "PA", "La"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff", "WEBP": ".webp", "PPM": ".ppm"}


@st.composite
def image_files(draw):
    mode = draw(st.sampled_from(MODES))
    side = st.one_of(st.integers(1, 48), st.integers(1, 48), st.integers(1, 48), st.integers(49, 384))
    w, h = draw(side), draw(side)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pattern = draw(st.sampled_from(["noise", "flat", "stroke"]))
    pixels = {"noise": lambda: rng.integers(0, 256, (h, w), dtype=np.uint8),
              "flat": lambda: np.full((h, w), rng.integers(0, 256), dtype=np.uint8),
              "stroke": lambda: (np.add.outer(np.arange(h), np.arange(w)) % 7 == 0).astype(np.uint8) * 255}[pattern]()
    base = Image.fromarray(pixels)
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
    mutation = draw(st.sampled_from(["none", "none", "flip", "truncate", "append", "splice"]))
    if mutation == "flip" and data:
        for _ in range(draw(st.integers(1, 16))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "append":
        data += draw(st.binary(max_size=256))
    elif mutation == "splice" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i:i] = _big_bytes(draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, 4096)))
    return bytes(data), draw(st.sampled_from([FORMATS[fmt]] * 3 + SUFFIXES))


@fuzz("image_valid_and_mutated")
@given(image_files())
def test_image_valid_and_mutated(case):
    count("image_valid_and_mutated")
    data, suffix = case
    _check_image(data, suffix)


def _png_claiming(width: int, height: int, mode_bytes: bytes, body: bytes) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">II", width, height) + mode_bytes + b"\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


@fuzz("image_huge_header")
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), st.sampled_from([b"\x08\x00", b"\x08\x02", b"\x10\x00", b"\x01\x00", b"\x08\x06"]),
       st.integers(0, 2**16))
def test_image_header_claiming_huge_sizes(width, height, mode_bytes, zeros):
    """A small PNG whose header claims up to 2³¹ × 2³¹ pixels (a decompression bomb): refused or
    decoded within bounds, never a MemoryError."""
    count("image_huge_header")
    _check_image(_png_claiming(width, height, mode_bytes, bytes(zeros)), ".png")


# ---------------------------------------------------------------------------------------------
# Config parser.


@fuzz("parse_value")
@given(st.one_of(st.text(max_size=200), st.from_regex(r"\A[\[\{\"'0-9eE.+\-a-z, \]\}:=()]{0,60}\Z"),
                 st.integers(0, 3000).map(lambda n: "[" * n + "]" * n)))
def test_parse_value_never_raises(text):
    count("parse_value")
    C.parse_value(text)  # any text is a value: a literal or, failing that, the bare string


_RAW = {**C.load_recipe_file("mnist-cnn")[1], "recipe": "mnist-cnn"}
_KEYS = sorted(
    {f"train.{k}" for k in C.TrainConfig.__dataclass_fields__}
    | {f"data.{k}" for k in ImageClassificationTask.data_config.__dataclass_fields__}
    | {f"model.{k}" for k in ("name", "in_channels", "image_size", "num_classes", "dropout", "hidden_sizes")}
    | {"epochs", "lr", "batch_size", "dropout", "image_size", "seed", "max_steps"}
)
_VALUES = st.one_of(
    st.text(max_size=12).map(C.parse_value),
    st.integers(-10**12, 10**12),
    st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-5, 5), st.integers(0, 10**9), st.floats(-2, 2), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["my_net", "my_net_28", "mlp", "gpt-tiny", "nope", "adam", "sgd", "cosine", "fp32", "bf16", "stop",
                     "skip", "mnist", "auto", "cpu", "cuda:7", "../../etc", ""]),
)
_OVERRIDE_KEYS = st.one_of(st.sampled_from(_KEYS), st.sampled_from(_KEYS), st.text(max_size=12),
                           st.sampled_from(["model.", ".lr", "train..lr", "a.b.c", "=", "", "recipe", "task"]))


def _check_resolved(cfg) -> None:
    # Accepted: a typed config that survives its own round trip through config.json.
    assert isinstance(cfg.train, C.TrainConfig)
    assert all(v == v and abs(v) != float("inf") for v in vars(cfg.train).values() if isinstance(v, float))
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    assert json.dumps(C.resolve(json.loads(text)).to_dict(), sort_keys=True) == text


@fuzz("resolve")
@given(st.lists(st.tuples(_OVERRIDE_KEYS, _VALUES), max_size=6))
def test_resolve_with_random_overrides(overrides):
    count("resolve")
    try:
        cfg = C.resolve(_RAW, overrides)
    except DubokoError:
        return
    _check_resolved(cfg)


@fuzz("parse_overrides")
@given(st.lists(st.one_of(st.text(max_size=60), st.tuples(st.sampled_from(_KEYS), st.text(max_size=30)).map("=".join)),
                max_size=6))
def test_parse_overrides_of_raw_cli_text(items):
    count("parse_overrides")
    try:
        pairs = C.parse_overrides(items)
        C.resolve(_RAW, pairs)
    except DubokoError:
        pass


_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=5)),
    max_leaves=24,
)
_SECTIONS = st.fixed_dictionaries({}, optional={
    "recipe": st.one_of(st.sampled_from(["mnist-cnn", "digits", "nope", ""]), _JSONISH),
    "task": st.one_of(st.sampled_from(["image_classification", "tabular", "lm", "x"]), _JSONISH),
    "model": st.one_of(st.dictionaries(st.sampled_from(["name", "image_size", "hidden_sizes", "num_classes", "x"]),
                                       _VALUES, max_size=4), _JSONISH),
    "data": st.one_of(st.dictionaries(st.sampled_from(sorted(ImageClassificationTask.data_config.__dataclass_fields__)),
                                      _VALUES, max_size=4), _JSONISH),
    "train": st.one_of(st.dictionaries(st.sampled_from(sorted(C.TrainConfig.__dataclass_fields__)), _VALUES, max_size=4),
                       _JSONISH),
    "version": _JSONISH,
})


@fuzz("config_json")
@given(st.one_of(_SECTIONS, _SECTIONS.map(lambda d: {**_RAW, **d}), _JSONISH))
def test_resolve_of_a_random_config_json(document):
    """A crafted config.json (what `eval` of a forged run folder would parse)."""
    count("config_json")
    path = TMP / "config_run"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(document))
    try:
        cfg = C.resolve(path)
    except DubokoError:
        return
    _check_resolved(cfg)


# ---------------------------------------------------------------------------------------------
# Tokenizers (data/text.py).

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)


@fuzz("char_word_tokenizers")
@given(_TEXT, _TEXT, st.integers(0, 50), st.integers(0, 3))
def test_char_and_word_tokenizers(train_text, other, vocab, min_freq):
    count("char_word_tokenizers")
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


@fuzz("bpe_tokenizer")
@given(st.text(max_size=2000), _TEXT, st.one_of(st.integers(257, 600), st.just(100)))
def test_bpe_tokenizer(train_text, other, vocab):
    count("bpe_tokenizer")
    try:
        tok = text_mod.train_tokenizer("bpe", train_text, vocab)
    except DubokoError:
        return
    for text in (train_text, other):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text  # byte-level BPE decodes exactly


_REAL_TOKENIZERS = {kind: text_mod.train_tokenizer(kind, "the cat sat on the mat. " * 20, 300).to_dict()
                    for kind in ("char", "word", "bpe")}


def _mutate_json(obj, draw):
    """One random edit deep inside a JSON document: a value replaced, a key dropped, a list cut."""
    if isinstance(obj, dict) and obj:
        key = draw(st.sampled_from(sorted(obj)))
        action = draw(st.sampled_from(["replace", "drop", "recurse", "recurse"]))
        out = dict(obj)
        if action == "replace":
            out[key] = draw(_JSONISH)
        elif action == "drop":
            del out[key]
        else:
            out[key] = _mutate_json(obj[key], draw)
        return out
    if isinstance(obj, list) and obj:
        i = draw(st.integers(0, len(obj) - 1))
        action = draw(st.sampled_from(["replace", "cut", "recurse", "swap"]))
        out = list(obj)
        if action == "replace":
            out[i] = draw(_JSONISH)
        elif action == "cut":
            out = out[:i]
        elif action == "swap":
            j = draw(st.integers(0, len(obj) - 1))
            out[i], out[j] = out[j], out[i]
        else:
            out[i] = _mutate_json(obj[i], draw)
        return out
    return draw(_JSONISH)


@st.composite
def tokenizer_documents(draw):
    choice = draw(st.sampled_from(["random", "fields", "mutated", "mutated"]))
    if choice == "random":
        return draw(_JSONISH)
    if choice == "fields":
        return draw(st.fixed_dictionaries({"kind": st.sampled_from(["char", "word", "bpe", "x"])}, optional={
            "chars": _JSONISH, "tokens": _JSONISH, "hf": _JSONISH}))
    doc = _REAL_TOKENIZERS[draw(st.sampled_from(sorted(_REAL_TOKENIZERS)))]
    for _ in range(draw(st.integers(1, 3))):
        doc = _mutate_json(doc, draw)
    return doc


@fuzz("load_tokenizer")
@given(tokenizer_documents(), _TEXT)
def test_load_tokenizer_from_random_json(obj, text):
    count("load_tokenizer")
    path = TMP / "tokenizer.json"
    path.write_text(json.dumps(obj))
    try:
        tok = text_mod.load_tokenizer(path)
        ids = tok.encode(text)
        tok.decode(ids)
    except DubokoError:
        return
    assert isinstance(tok.vocab_size, int)


# ---------------------------------------------------------------------------------------------
# Manifests and run folders: one real run, trained once (a few steps of `digits`, seconds).

from duboko.cli.main import main  # noqa: E402
from duboko.train.run import load_run, verify_manifest, verify_resumable  # noqa: E402
from duboko.train.verify import verify_run  # noqa: E402

_RUN = TMP / "trained"
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    assert main(["train", "digits", "--out", str(_RUN), "--set", "train.num_threads=1", "--set", "batch_size=32",
                 "--set", "max_steps=3", "--quiet"]) == 0
_RUN_FILES = sorted(p.name for p in _RUN.iterdir() if p.is_file() and not p.name.startswith("."))
_DIGESTS = json.loads((_RUN / "manifest.json").read_text())["sha256"]


@st.composite
def manifests(draw):
    choice = draw(st.sampled_from(["random", "shaped", "edited", "edited"]))
    if choice == "random":
        return draw(_JSONISH)
    names = st.one_of(st.sampled_from(_RUN_FILES), st.text(max_size=12),
                      st.sampled_from(["../config.json", "/etc/passwd", ".", "..", "a/b", "", "manifest.json", ".duboko.lock"]))
    digests = st.one_of(st.sampled_from(sorted(_DIGESTS.values())), st.text(max_size=70), _JSONISH)
    if choice == "shaped":
        return {"sha256": draw(st.dictionaries(names, digests, max_size=8))}
    listed = dict(_DIGESTS)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["drop", "add", "swap", "corrupt"]))
        if action == "drop" and listed:
            del listed[draw(st.sampled_from(sorted(listed)))]
        elif action == "add":
            listed[draw(names)] = draw(digests)
        elif action == "swap" and len(listed) > 1:
            a, b = draw(st.lists(st.sampled_from(sorted(listed)), min_size=2, max_size=2, unique=True))
            listed[a], listed[b] = listed[b], listed[a]
        elif action == "corrupt" and listed:
            key = draw(st.sampled_from(sorted(listed)))
            listed[key] = draw(digests)
    return {"sha256": listed, **draw(st.dictionaries(st.text(max_size=5), _JSONISH, max_size=2))}


_MANIFEST_RUN = TMP / "manifest_run"
shutil.copytree(_RUN, _MANIFEST_RUN)


@fuzz("manifest")
@given(manifests(), st.booleans())
def test_random_manifests(document, resumable):
    """verify_manifest / verify_resumable of a real run folder with a crafted manifest.json:
    accepted only when it lists the required files with their true hashes."""
    count("manifest")
    (_MANIFEST_RUN / "manifest.json").write_text(json.dumps(document))
    os.utime(_MANIFEST_RUN / "manifest.json", ns=(2**62, 2**62))  # newer than every file: no "killed run"
    try:
        (verify_resumable if resumable else verify_manifest)(_MANIFEST_RUN)
    except DubokoError:
        return
    listed = document["sha256"]
    for name in ("config.json", "model.safetensors") if not resumable else ("config.json", "state.safetensors"):
        assert listed[name] == _DIGESTS[name]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@st.composite
def run_folder_edits(draw):
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.one_of(st.sampled_from(_RUN_FILES), st.sampled_from(["extra.json", "tokenizer.json", "x.safetensors"])))
        action = draw(st.sampled_from(["flip", "truncate", "random", "json", "json_edit", "delete", "fifo", "symlink",
                                       "folder", "empty", "big"]))
        payload = None
        if action == "flip":
            payload = [(draw(st.integers(0, 2**31)), draw(st.integers(0, 255))) for _ in range(draw(st.integers(1, 8)))]
        elif action == "truncate":
            payload = draw(st.floats(0, 1))
        elif action == "random":
            payload = draw(st.binary(max_size=512))
        elif action == "json":
            payload = draw(_JSONISH)
        elif action == "json_edit":
            payload = draw(st.integers(0, 2**32 - 1))
        elif action == "big":
            payload = draw(st.integers(0, 2**32 - 1))
        edits.append((name, action, payload))
    return edits, draw(st.booleans())


@fuzz("run_folder")
@given(run_folder_edits(), st.data())
def test_mutated_run_folders(case, data):
    """A real run folder, edited (bytes flipped, files truncated, replaced by random JSON, deleted,
    turned into FIFOs, symlinks or folders, added), and with `rehash` its manifest rewritten to
    match, so that the loaders behind the hash see the crafted bytes: verify_run, load_run and
    verify_resumable either work or raise DubokoError."""
    count("run_folder")
    edits, rehash = case
    run = TMP / "mutated"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(_RUN, run)
    for name, action, payload in edits:
        path = run / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif action not in ("flip", "truncate", "json_edit"):
            path.unlink(missing_ok=True)
        if action == "flip" and path.is_file():
            raw = bytearray(path.read_bytes())
            for i, v in payload:
                if raw:
                    raw[i % len(raw)] = v
            path.write_bytes(bytes(raw))
        elif action == "truncate" and path.is_file():
            raw = path.read_bytes()
            path.write_bytes(raw[: int(len(raw) * payload)])
        elif action == "random":
            path.write_bytes(payload)
        elif action == "json":
            path.write_text(json.dumps(payload))
        elif action == "json_edit" and path.is_file():
            try:
                doc = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):  # already not JSON: write it back as text
                path.write_text(path.read_text(errors="replace"))
            else:
                path.write_text(json.dumps(_mutate_json(doc, data.draw)))
        elif action == "fifo":
            os.mkfifo(path)
        elif action == "symlink":
            path.symlink_to(data.draw(st.sampled_from(["/dev/zero", "/etc/hostname", str(_RUN / "config.json"), "nowhere"])))
        elif action == "folder":
            path.mkdir()
        elif action == "empty":
            path.write_bytes(b"")
        elif action == "big":
            path.write_bytes(_big_bytes(payload, 1 << 18))
    if rehash and (run / "manifest.json").is_file() and not (run / "manifest.json").is_symlink():
        try:
            listed = json.loads((run / "manifest.json").read_text())["sha256"]
            listed = {n: _sha(run / n) for n in list(listed) + [p.name for p in run.iterdir()]
                      if "/" not in n and n != "manifest.json" and (run / n).is_file() and not (run / n).is_symlink()}
            (run / "manifest.json").write_text(json.dumps({"sha256": listed}))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
            pass
    for check in (verify_run, lambda r: load_run(r, device="cpu"), verify_resumable):
        try:
            check(run)
        except DubokoError:
            pass


# ---------------------------------------------------------------------------------------------
# CLI argument vectors, in-process: the parser is built once (as `main` would build it) and each
# vector goes through `main`'s dispatch minus its guard for unexpected exceptions, so that any
# exception other than DubokoError or argparse's exit fails here instead of reading as exit 2.

from duboko.cli.main import build_parser  # noqa: E402

_PARSER = build_parser()


def _dispatch(argv: list[str]) -> int:
    args = _PARSER.parse_args(argv)
    if not getattr(args, "func", None):
        return 2
    try:
        return int(args.func(args) or 0)
    except DubokoError:
        return 2

_BROKEN_RUN = TMP / "broken_run"
shutil.copytree(_RUN, _BROKEN_RUN)
(_BROKEN_RUN / "config.json").write_text('{"recipe": "digits", "model": {"name": "mlp", "hidden_sizes": [100000000, 64]}}')
(TMP / "empty_dir").mkdir()
(TMP / "file.txt").write_text("hello")
(TMP / "noise.png").write_bytes(_big_bytes(1, 3000))
_PATHS = [str(TMP / "missing"), str(TMP / "empty_dir"), str(TMP / "file.txt"), str(_BROKEN_RUN), str(TMP / "noise.png"),
          "/dev/null", "", "-", "--", "/"]
# Commands that read a run folder or a file first; `train` only with recipes or files that are not there.
_COMMANDS = ["eval", "predict", "summary", "verify", "sample", "noising", "trajectory", "export", "import-hf",
             "report", "explain", "mistakes", "filters", "generate", "next-word", "gradflow", "translate",
             "attention", "import-weights", "compare", "gradcheck", "lr-find", "recipes", "models", "activations"]
_FLAGS = ["--set", "--out", "--n", "--steps", "--nrow", "--temperature", "--top-k", "--top-p", "--max-new-tokens",
          "--prompt", "--guidance", "--eta", "--seed", "--device", "--top", "--input-shape", "--model", "--from",
          "--format", "--batch-size", "--image", "--layer", "--engine", "--onnx", "--overwrite", "--quiet", "--json",
          "--resume", "--config", "--help", "-h", "--beam", "--quantize"]
_VALUES_TEXT = ["0", "-1", "-3", "1", "3", "1e309", "nan", "inf", "-inf", "10000000000", "2.5", "abc", "", "3,100000,100000",
                "image_size=abc", "image_size=-16", "hidden_sizes=[100000000,64]", "lr=nan", "max_steps=-5", "x=y",
                "model.name=nope", "a.b.c=1", "int8", "onnx", "hf-gpt2", "cpu", "cuda", "my_net", "mlp"]
_TOKENS = st.one_of(st.sampled_from(_FLAGS), st.sampled_from(_VALUES_TEXT), st.sampled_from(_PATHS),
                    st.text(max_size=10), st.integers(-2**40, 2**40).map(str))


@fuzz("cli_argv")
@given(st.one_of(
    st.tuples(st.sampled_from(_COMMANDS), st.sampled_from(_PATHS), st.lists(_TOKENS, max_size=8)).map(
        lambda t: [t[0], t[1], *t[2]]),
    st.tuples(st.sampled_from(["no-such-recipe", str(TMP / "missing.toml"), str(TMP / "file.txt")]),
              st.lists(_TOKENS, max_size=6)).map(lambda t: ["train", t[0], *[x for x in t[1] if x != "--resume"]]),
    st.lists(_TOKENS, max_size=6),
))
def test_random_cli_argument_vectors(argv):
    count("cli_argv")
    out = TMP / "cli_out"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(out) if a == "--" else a for a in argv]
    # In the temporary folder: an output named by a random relative path lands there, not in the checkout.
    with contextlib.chdir(TMP), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = _dispatch(argv)
        except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
            code = exc.code
    assert code in (0, 2, None), (argv, code)


# ---------------------------------------------------------------------------------------------


def test_fuzz_totals():
    """Runs last (file order): the examples that actually ran, per target, and the seed."""
    total = sum(COUNTS.values())
    print(f"\nfuzz seed DUBOKO_FUZZ_SEED={SEED}; examples run: {dict(COUNTS)}; total {total:,}")
    missing = sorted(set(EXAMPLES) - set(COUNTS))
    if missing:
        pytest.skip(f"only part of the file ran (not run: {', '.join(missing)}); the total is checked on a full run")
    assert total >= MIN_TOTAL, f"only {total:,} examples ran (seed {SEED}); expected at least {MIN_TOTAL:,}"
