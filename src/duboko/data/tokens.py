"""Token folders: a corpus tokenized once into flat uint16/uint32 arrays, memory-mapped to train.

`duboko prepare-text CORPUS --out DIR` (see `prepare_tokens`) writes

    DIR/train.bin        the training blocks' tokens, concatenated (raw little-endian uint16/uint32)
    DIR/val.bin          the validation blocks' tokens
    DIR/tokenizer.json   the tokenizer (duboko.data.text)
    DIR/tokens.json      the header: format, tokenizer, dtype, token counts, split, sources, sha256

like nanoGPT's `train.bin`, and the language-model task memory-maps the arrays (`open_token_folder`)
instead of reading the corpus: start-up time and memory do not grow with the corpus.

Same split as the in-memory LM task: the normalized corpus text (`read_corpus`: files joined with
a blank line, CRLF -> LF) is cut into `split_blocks` contiguous blocks of characters with
`block_split`, and each block is tokenized on its own, so no token and no window of validation
text ever reaches training. For the char tokenizer the token ids are exactly those the in-memory
task computes; word/BPE tokenizers are trained on a bounded random sample of the training blocks
(`sample_chars`) instead of all of them, so memory stays bounded.

Streaming: the corpus is read in chunks of `chunk_bytes` and never whole. Tokens never depend on
where a chunk ends: text is only cut inside a whitespace run that is followed by a non-space
character and contains a newline (see `_safe_cut`), where the char/word/GPT-2 byte-level
pre-tokenizers always end a piece. (A line longer than 16 chunks with no such place is cut
anyway; the header counts those `forced_cuts`.)
"""

from __future__ import annotations

import codecs
import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duboko.data.text import (
    TOKENIZER_FILE,
    TOKENIZER_KINDS,
    Tokenizer,
    _expand,
    block_split,
    default_corpus_path,
    load_tokenizer,
    train_tokenizer_from_texts,
)
from duboko.errors import DubokoError, unknown_name
from duboko.io import atomic_write_json, read_json

HEADER_FILE = "tokens.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
FORMAT = "duboko-tokens"
VERSION = 1
MAX_HEADER_BYTES = 16 * 2**20  # the header is small; the source list is the only part that grows
MAX_SOURCES = 100_000  # files listed in the header (a corpus folder of more still works; the list is cut)
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_SAMPLE_CHARS = 32 << 20  # word/BPE tokenizers learn from at most this many training characters
_SAMPLE_SLICE = 1 << 16  # the sample is drawn as slices of this many characters
_BOM = "\ufeff"
_ASCII_SPACE = " \t\n\r\x0b\x0c"


# ---------------------------------------------------------------------------------------------
# Streaming the normalized corpus text.


def _iter_file_text(path: Path, chunk_bytes: int) -> Iterator[str]:
    """The text of one file as `read_corpus` normalizes it (BOM and surrounding newlines stripped,
    CRLF -> LF, one "\\n" at the end), in pieces; nothing is held beyond one chunk."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DubokoError(f"text file {path} cannot be read ({exc.strerror})") from exc
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    head = True  # still stripping the leading BOMs, then the leading newlines
    bom_done = False
    held_newlines = 0  # trailing "\n"s are emitted only when more text follows them
    carry_cr = ""  # a "\r" at a chunk end may start a "\r\n"
    seen_content = False
    with f:
        while True:
            data = f.read(chunk_bytes)
            if consumed == 0 and data and b"\x00" in data[: 1 << 16]:
                raise DubokoError(f"text file {path} looks binary (it contains NUL bytes); expected UTF-8 text")
            pending = len(decoder.getstate()[0])  # bytes of a character begun in the last chunk
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise DubokoError(
                    f"text file {path} is not UTF-8 text (bad byte at offset {consumed - pending + exc.start}); "
                    "expected a UTF-8 .txt file"
                ) from None
            consumed += len(data)
            if not seen_content and text.strip(_ASCII_SPACE):
                seen_content = True
            text = carry_cr + text
            carry_cr = ""
            if data and text.endswith("\r"):
                text, carry_cr = text[:-1], "\r"
            text = text.replace("\r\n", "\n")
            if head:
                if not bom_done:
                    stripped = text.lstrip(_BOM)
                    if stripped or not data:
                        bom_done = True
                    text = stripped
                if bom_done:
                    text = text.lstrip("\n")
                    if text:
                        head = False
            if text:
                body = text.rstrip("\n")
                if body:
                    yield "\n" * held_newlines + body
                    held_newlines = 0
                held_newlines += len(text) - len(body)
            if not data:
                break
    if not seen_content:
        raise DubokoError(f"text file {path} is empty; expected UTF-8 text to train on")
    yield "\n"


def iter_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[str]:
    """The text of `read_corpus(paths)`, in pieces of about `chunk_bytes`: "".join(...) equals it."""
    for i, path in enumerate(_corpus_files(paths)):
        if i:
            yield "\n"
        yield from _iter_file_text(path, chunk_bytes)


def _corpus_files(paths) -> list[Path]:
    if paths is None or (isinstance(paths, str) and not paths.strip()):
        return [default_corpus_path()]
    files = _expand(paths)
    for p in files:
        if not p.is_file():
            raise DubokoError(f"text file {p} is not a regular file")
    return files


# ---------------------------------------------------------------------------------------------
# Where text may be cut without changing its tokens.


def _safe_cut(text: str, lo: int) -> int:
    """The last position p > lo where text[:p] and text[p:] tokenize to the same pieces as text, or -1.

    Take a maximal whitespace run W (k characters) that contains a newline and is followed by a
    non-space character. Every pre-tokenizer here (char; the word pattern; GPT-2's byte-level
    regex) splits W followed by a non-space into W[:k-1] and W[k-1] (the last may join the next
    word as " word"), and ends the piece before W at W's start. So cutting before W's last
    character (k >= 2), or after W when W is a single "\\n", gives the same pieces on both sides.
    """
    end = len(text)
    i = text.rfind("\n", lo, end)
    while i > lo:
        j = i
        while j < end and text[j].isspace():
            j += 1
        s = i
        while s > 0 and text[s - 1].isspace():
            s -= 1
        if j < end:  # the run is followed by a (known) non-space character
            cut = j - 1 if j - s >= 2 else j
            if cut > lo:
                return cut
        i = text.rfind("\n", lo, s)
    return -1


@dataclass
class _Segment:
    split: str  # "train" | "val"
    text: str


def _segments(pieces: Iterator[str], train_ranges: list[tuple[int, int]], val_ranges: list[tuple[int, int]],
              chunk_chars: int, stats: dict[str, int]) -> Iterator[_Segment]:
    """Cut the text stream at every block edge (blocks are tokenized on their own, as the
    in-memory task does) and, inside a block, at safe places about every `chunk_chars`."""
    edges = sorted([(a, b, "train") for a, b in train_ranges] + [(a, b, "val") for a, b in val_ranges])
    max_chars = 16 * chunk_chars
    block = 0
    pos = 0  # character position of the start of `buf` in the whole text
    buf = ""
    for piece in pieces:
        while piece:
            a, b, split = edges[block]
            room = b - (pos + len(buf))
            take, piece = piece[:room], piece[room:]
            buf += take
            while len(buf) >= chunk_chars:
                cut = _safe_cut(buf, chunk_chars // 2)
                if cut < 0:
                    if len(buf) < max_chars:
                        break
                    cut = len(buf)
                    stats["forced_cuts"] += 1
                yield _Segment(split, buf[:cut])
                pos += cut
                buf = buf[cut:]
            if pos + len(buf) == b:  # a block ends: a hard cut
                if buf:
                    yield _Segment(split, buf)
                pos, buf = b, ""
                block += 1
                if block == len(edges):
                    return


# ---------------------------------------------------------------------------------------------
# Preparing a token folder.


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


class _Reservoir:
    """A uniform random sample of k text slices of the stream (Vitter's algorithm R), with their
    character offsets, so slices in validation blocks can be dropped once the split is known."""

    def __init__(self, k: int, seed: int):
        self.k = k
        self.items: list[tuple[int, str]] = []
        self.seen = 0
        self.partial = ""  # the text after the last full slice
        self.rng = random.Random(seed)

    def add(self, start: int, text: str) -> None:
        """Add the stream's next piece (starting at character `start`). Slices are cut at fixed
        multiples of _SAMPLE_SLICE of the whole text, so the sample does not depend on how the
        stream was chunked."""
        text = self.partial + text
        start -= len(self.partial)
        n_full = (len(text) // _SAMPLE_SLICE) * _SAMPLE_SLICE
        for o in range(0, n_full, _SAMPLE_SLICE):
            self._offer((start + o, text[o: o + _SAMPLE_SLICE]))
        self.partial = text[n_full:]

    def finish(self) -> None:
        if self.partial:
            self._offer((self.seen * _SAMPLE_SLICE, self.partial))
            self.partial = ""

    def _offer(self, item: tuple[int, str]) -> None:
        if len(self.items) < self.k:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.k:
                self.items[j] = item
        self.seen += 1

    def train_texts(self, train_ranges: list[tuple[int, int]]) -> list[str]:
        """The sampled slices clipped to the training blocks, in corpus order."""
        out = []
        for start, text in sorted(self.items):
            end = start + len(text)
            for a, b in train_ranges:
                lo, hi = max(a, start), min(b, end)
                if lo < hi:
                    out.append(text[lo - start: hi - start])
        return out


def prepare_tokens(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
    out: str | os.PathLike,
    tokenizer: str = "bpe",
    vocab_size: int = 0,
    min_freq: int = 1,
    val_fraction: float = 0.1,
    split_blocks: int = 10,
    split_seed: int = 0,
    sample_chars: int = DEFAULT_SAMPLE_CHARS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus (file(s)/folder(s), as `read_corpus` takes) into the token folder `out`.

    Two streaming passes: the first counts characters (the split needs the total), collects the
    char vocabulary and a bounded sample of text for word/BPE training; the second tokenizes
    and appends to train.bin / val.bin. `progress(stage, done_bytes, total_bytes)` is called as
    it goes. Returns the header (also written to out/tokens.json, last, so a folder with a
    header is complete). Memory: O(chunk_bytes + sample_chars + vocabulary), not the corpus.
    """
    if tokenizer not in TOKENIZER_KINDS:
        raise unknown_name("tokenizer", tokenizer, TOKENIZER_KINDS)
    if not 0.0 < val_fraction < 1.0:
        raise DubokoError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    if chunk_bytes < 1024:
        raise DubokoError(f"chunk_bytes must be >= 1024, got {chunk_bytes!r}")
    if sample_chars < _SAMPLE_SLICE and tokenizer != "char":
        raise DubokoError(f"sample_chars must be >= {_SAMPLE_SLICE}, got {sample_chars!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DubokoError(f"--out {out} exists and is not a folder")
    if (out / HEADER_FILE).exists() and not overwrite:
        raise DubokoError(f"{out} already holds a token folder; pass --overwrite to replace it")
    files = _corpus_files(paths)
    sources = []
    for p in files:
        st = p.stat()
        sources.append({"path": str(p.resolve()), "bytes": st.st_size, "mtime": st.st_mtime})
    total_bytes = sum(s["bytes"] for s in sources)
    started = time.perf_counter()

    # Pass 1: characters, the char vocabulary, a sample for word/BPE.
    n_chars = 0
    chars: set[str] = set()
    reservoir = _Reservoir(max(1, sample_chars // _SAMPLE_SLICE), split_seed)
    done = 0
    for piece in iter_corpus(files, chunk_bytes):
        if tokenizer == "char":
            chars.update(piece)
        else:
            reservoir.add(n_chars, piece)
        n_chars += len(piece)
        done += len(piece)  # characters: a progress estimate against the byte total
        if progress:
            progress("scan", min(done, total_bytes), total_bytes)
    reservoir.finish()
    if progress:
        progress("scan", total_bytes, total_bytes)
    train_r, val_r = block_split(n_chars, val_fraction, split_blocks, split_seed)
    if tokenizer == "char":
        tok = train_tokenizer_from_texts("char", ["".join(sorted(chars))])
    else:
        sample = reservoir.train_texts(train_r)
        tok = train_tokenizer_from_texts(tokenizer, sample, vocab_size, min_freq)
    del reservoir
    dtype = _dtype_for(tok.vocab_size)
    np_dtype = DTYPES[dtype]

    # Pass 2: tokens.
    out.mkdir(parents=True, exist_ok=True)
    stats = {"forced_cuts": 0}
    writers = {s: _BinWriter(out / name) for s, name in (("train", TRAIN_FILE), ("val", VAL_FILE))}
    done = 0
    try:
        pending: list[str] = []
        pending_split = ""

        def flush() -> None:
            if pending:
                for ids in tok.encode_many(pending):
                    writers[pending_split].write(np.asarray(ids, dtype=np.int64).astype(np_dtype))
                pending.clear()

        # Hugging Face `Encoding`s hold ~310 bytes per token until converted (measured: 1 MiB of
        # text -> 0.5M tokens -> 160 MB; batches of 8 MiB took BPE prepare-text of 100 MB to a
        # 1.3 GB peak RSS). So BPE encodes batches of 1 MiB, as 4 segments run in parallel.
        seg_chars = chunk_bytes // 4 if tok.kind == "bpe" else chunk_bytes
        batch_chars = chunk_bytes if tok.kind == "bpe" else 4 * chunk_bytes
        pending_chars = 0
        for seg in _segments(iter_corpus(files, chunk_bytes), train_r, val_r, seg_chars, stats):
            if seg.split != pending_split or pending_chars >= batch_chars:
                flush()
                pending_chars = 0
                pending_split = seg.split
            pending.append(seg.text)
            pending_chars += len(seg.text)
            done += len(seg.text)
            if progress:
                progress("tokenize", min(done, total_bytes), total_bytes)
        flush()
        if progress:
            progress("tokenize", total_bytes, total_bytes)
        results = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    tok.save(out / TOKENIZER_FILE)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "created_by": "duboko prepare-text",
        "tokenizer": {
            "kind": tok.kind, "vocab_size": tok.vocab_size, "file": TOKENIZER_FILE,
            "trained_on_chars": n_chars if tokenizer == "char" else sum(map(len, sample)),
        },
        "dtype": dtype,
        "characters": n_chars,
        "split": {
            "val_fraction": val_fraction, "split_blocks": split_blocks, "split_seed": split_seed,
            "train_ranges": [list(r) for r in train_r], "val_ranges": [list(r) for r in val_r],
        },
        "train": {"file": TRAIN_FILE, "tokens": results["train"][0], "sha256": results["train"][1]},
        "val": {"file": VAL_FILE, "tokens": results["val"][0], "sha256": results["val"][1]},
        "forced_cuts": stats["forced_cuts"],
        "sources": sources[:MAX_SOURCES],
        "source_count": len(sources),
        "source_bytes": total_bytes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(out / HEADER_FILE, header)
    return header


class _BinWriter:
    """Appends arrays to FILE.tmp with a running sha256; `finish` renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, arr: np.ndarray) -> None:
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.count += int(arr.size)

    def finish(self) -> tuple[int, str]:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.count, self.sha.hexdigest()

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Opening a token folder.


@dataclass
class TokenFolder:
    path: Path
    header: dict[str, Any]
    tokenizer: Tokenizer
    train: np.ndarray  # (N_train,) read-only np.memmap, uint16 or uint32
    val: np.ndarray  # (N_val,)


def is_token_folder(path: str | os.PathLike) -> bool:
    return bool(path) and (Path(path) / HEADER_FILE).is_file()


def _field(header: dict, path: Path, *keys: str, kind: type | tuple = int) -> Any:
    value: Any = header
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            raise DubokoError(f"token header {path / HEADER_FILE} has no {'.'.join(keys)}; "
                              "re-create the folder with `duboko prepare-text`")
        value = value[k]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DubokoError(f"token header {path / HEADER_FILE}: {'.'.join(keys)} = {value!r} is not a valid value")
    return value


def open_token_folder(path: str | os.PathLike, verify: bool = False) -> TokenFolder:
    """Validate a token folder's header against its files and memory-map the arrays (read-only).

    Checked without reading the arrays: format and version, dtype, that each file holds exactly
    `tokens` values of that dtype, and that the tokenizer has the header's vocabulary size (and
    that it fits the dtype); the first and last MiB of tokens are range-checked. `verify=True`
    also recomputes both sha256 sums (reads everything: seconds per GB)."""
    path = Path(path)
    if not path.is_dir():
        raise DubokoError(f"token folder {path} does not exist; create it with `duboko prepare-text CORPUS --out {path}`")
    if not (path / HEADER_FILE).is_file():
        raise DubokoError(f"{path} has no {HEADER_FILE}; it is not a token folder from `duboko prepare-text`")
    header = read_json(path / HEADER_FILE, max_bytes=MAX_HEADER_BYTES)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DubokoError(f"{path / HEADER_FILE} is not a duboko token header (format must be {FORMAT!r})")
    version = _field(header, path, "version")
    if version != VERSION:
        raise DubokoError(f"{path / HEADER_FILE} has version {version}; this duboko reads version {VERSION}")
    dtype = _field(header, path, "dtype", kind=str)
    if dtype not in DTYPES:
        raise DubokoError(f"{path / HEADER_FILE}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    vocab = _field(header, path, "tokenizer", "vocab_size")
    tok_file = _field(header, path, "tokenizer", "file", kind=str)
    if Path(tok_file).name != tok_file:
        raise DubokoError(f"{path / HEADER_FILE}: tokenizer.file {tok_file!r} must be a file name inside the folder")
    if not (path / tok_file).is_file():
        raise DubokoError(f"token folder {path} has no {tok_file} (its tokenizer)")
    tokenizer = load_tokenizer(path / tok_file)
    if tokenizer.vocab_size != vocab:
        raise DubokoError(
            f"{path / tok_file} has {tokenizer.vocab_size} tokens but {HEADER_FILE} says {vocab}; "
            "the folder is inconsistent: re-create it with `duboko prepare-text`"
        )
    if vocab > np.iinfo(DTYPES[dtype]).max + 1:
        raise DubokoError(f"{path / HEADER_FILE}: {vocab} tokens do not fit dtype {dtype}")
    arrays = {}
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    for split in ("train", "val"):
        name = _field(header, path, split, "file", kind=str)
        count = _field(header, path, split, "tokens")
        if Path(name).name != name:
            raise DubokoError(f"{path / HEADER_FILE}: {split}.file {name!r} must be a file name inside the folder")
        f = path / name
        if not f.is_file():
            raise DubokoError(f"token folder {path} has no {name}")
        size = f.stat().st_size
        if count < 0 or size != count * itemsize:
            raise DubokoError(
                f"{f} has {size} bytes but {HEADER_FILE} says {count} {dtype} tokens ({count * itemsize} bytes); "
                "the file is truncated or was changed"
            )
        if count == 0:
            raise DubokoError(f"{f} holds no tokens")
        arr = np.memmap(f, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"), mode="r", shape=(count,))
        edge = 1 << 19
        for part in (arr[:edge], arr[-edge:]):
            top = int(part.max())
            if top >= vocab:
                raise DubokoError(f"{f} holds token id {top}, outside the tokenizer's {vocab} tokens; the file is corrupt")
        if verify:
            digest = _sha256(f)
            expected = _field(header, path, split, "sha256", kind=str)
            if digest != expected:
                raise DubokoError(f"{f} has sha256 {digest}, the header says {expected}: the file was changed")
        arrays[split] = arr
    return TokenFolder(path, header, tokenizer, arrays["train"], arrays["val"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gather(ids: Any, index: Any) -> Any:
    """ids[index] as an int64 torch tensor, for a torch tensor or a (memory-mapped) numpy array."""
    import torch

    if torch.is_tensor(ids):
        return ids[index]
    return torch.from_numpy(np.asarray(ids[index.numpy()], dtype=np.int64))


def feistel_permutation(index: Any, n: int, keys: Sequence[int]) -> Any:
    """A pseudo-random permutation of [0, n), evaluated at `index` (int64 tensor) in O(1) memory:
    a balanced Feistel network on the next even number of bits, with cycle walking (values >= n
    are mapped again until they land in range; Black & Rogaway 2002). For token files, whose
    window counts are too large for a stored `randperm`."""
    import torch

    bits = max(2, math.ceil(math.log2(max(n, 2))))
    bits += bits % 2
    half = bits // 2
    mask = (1 << half) - 1

    def once(x: torch.Tensor) -> torch.Tensor:
        left, right = x >> half, x & mask
        for k in keys:
            # A cheap integer hash of (right, k): multiply-xorshift, wrapped to `half` bits.
            h = (right * 0x9E3779B1 + int(k)) & 0xFFFFFFFF
            h = ((h ^ (h >> 15)) * 0x85EBCA6B) & 0xFFFFFFFF
            h = h ^ (h >> 13)
            left, right = right, (left ^ h) & mask
        return (left << half) | right

    x = once(index.to(torch.int64))
    while True:
        out = x >= n
        if not bool(out.any()):
            return x
        x = torch.where(out, once(x), x)
