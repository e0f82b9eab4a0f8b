"""Atomic, safe file I/O used everywhere a file is written or a checkpoint is read.

Every write goes to a temporary file in the destination folder, is flushed and fsynced, then
renamed over the destination: a crash mid-write leaves the previous file whole. Tensors are stored
as safetensors (no pickle, no code execution on load).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch

from duboko.errors import DubokoError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0600


# A folder holding these is a run folder (see duboko.train.run and duboko.train.lock).
_RUN_FOLDER_MARKS = ("manifest.json", ".duboko.lock")


def check_no_symlink_in_run_folder(path: str | os.PathLike) -> None:
    """Refuse a write whose path goes through a symlinked sub-folder of a run folder (`run/plots`
    -> `/elsewhere`): writes into a run stay inside it. The nearest enclosing run folder (one
    holding manifest.json or its lock) is found without resolving links; the run folder itself
    may be reached through a link (the user's choice), and a link in place of the file itself
    is replaced, not followed (os.replace)."""
    parts = Path(os.path.abspath(path)).parent
    below: list[Path] = []
    for folder in [parts, *parts.parents]:
        if any(os.path.lexists(folder / mark) for mark in _RUN_FOLDER_MARKS) and not folder.is_symlink():
            for sub in below:
                if sub.is_symlink():
                    raise DubokoError(f"refusing to write {path}: {sub} is a symlink inside run folder {folder}, "
                                      "and writes never follow links out of a run folder")
            return
        below.append(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    check_no_symlink_in_run_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DubokoError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DubokoError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# Run folders' JSON files (config, metrics, manifest, tokenizers) are far below this; a bigger
# file is not one of ours, and reading it whole could exhaust memory (`/dev/zero` never ends).
MAX_JSON_BYTES = 64 * 2**20
MAX_CSV_BYTES = 64 * 2**20  # history.csv: one short row per epoch
MAX_TENSOR_BYTES = 64 * 2**30  # weights: the largest model duboko imports is far below


def read_regular_file(path: str | os.PathLike, max_bytes: int, label: str = "") -> bytes:
    """The bytes of a regular file of at most `max_bytes`: a folder, a FIFO, a device
    (`/dev/zero`) or a bigger file is one DubokoError, never a hang or a MemoryError. The file is
    opened non-blocking (a FIFO without a writer would block `open`) and checked with fstat on
    the open descriptor, so a swap between the check and the read changes nothing."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise DubokoError(f"{label}{path} does not exist") from exc
    except IsADirectoryError as exc:
        raise DubokoError(f"{label}{path} is a folder, expected a file") from exc
    except OSError as exc:
        raise DubokoError(f"cannot read {label}{path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise DubokoError(f"{label}{path} is a folder, expected a file")
        if not stat.S_ISREG(info.st_mode):
            raise DubokoError(f"{label}{path} is not a regular file (a device, FIFO or socket); expected a file")
        if info.st_size > max_bytes:
            raise DubokoError(f"{label}{path} is {info.st_size:,} bytes; expected at most {max_bytes:,}")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > max_bytes:  # grew while being read
                raise DubokoError(f"{label}{path} is over {max_bytes:,} bytes; expected at most {max_bytes:,}")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise DubokoError(f"cannot read {label}{path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def parse_json(text: str | bytes, where: str) -> Any:
    """`json.loads` with its failures as one DubokoError naming `where`; a deeply nested
    document (200,000 `[`) raises RecursionError inside the C scanner, caught here too."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise DubokoError(f"{where} is nested too deeply to be duboko's JSON") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise DubokoError(f"{where} is not readable JSON: {exc}") from exc


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, bounded: regular files of at most `max_bytes` only (see `read_regular_file`)."""
    path = Path(path)
    data = read_regular_file(path, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DubokoError(f"{path} is not readable JSON: {exc}") from exc
    return parse_json(text, str(path))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    from safetensors.torch import save

    flat: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        # Tied weights (one tensor under two names) are stored twice: safetensors refuses shared
        # storage, and loading copies both into the one parameter anyway.
        flat[k] = v.clone() if key in seen and v.numel() else v
        seen.add(key)
    atomic_write_bytes(path, save(flat, metadata=metadata))


def read_file_bytes(path: str | os.PathLike, label: str = "") -> bytes:
    """A regular file's bytes (data sets, corpora, weights: up to MAX_TENSOR_BYTES); a missing
    file, a folder, a FIFO or an unreadable file is one clear DubokoError (`label`, e.g.
    "text file ", prefixes the path in the message)."""
    return read_regular_file(path, MAX_TENSOR_BYTES, label)


# Images given to a model are decoded, then resized to its input: a picture far larger than the
# input is wasted work at best and a decompression bomb at worst (a 950 KB TIFF can claim
# gigapixels). Up to (PIXEL_SCALE · side)² pixels for a model of `side`-pixel inputs, never
# less than MIN_IMAGE_PIXELS (a 16-megapixel phone photo of a digit is fine for a 28-pixel
# model) nor more than MAX_IMAGE_PIXELS.
PIXEL_SCALE = 128
MIN_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_PIXELS = 8192 * 8192


def image_pixel_cap(side: int) -> int:
    """The most pixels `predict` decodes for a model whose inputs are side × side."""
    return min(MAX_IMAGE_PIXELS, max(MIN_IMAGE_PIXELS, (PIXEL_SCALE * max(1, int(side))) ** 2))


def check_image_pixels(path: str | os.PathLike, side: int) -> None:
    """Read only the image's header and refuse one with more pixels than `image_pixel_cap(side)`
    (the message gives the size, the cap and how to fix it). A file PIL cannot identify is left
    to the decoder, which says so in its own words."""
    from PIL import Image, UnidentifiedImageError

    cap = image_pixel_cap(side)
    try:
        with Image.open(path) as img:  # lazy: parses the header, decodes nothing
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return
    if width * height > cap:
        raise DubokoError(
            f"image {str(path)!r} is {width}x{height} = {width * height:,} pixels; at most {cap:,} for a model of "
            f"{side}x{side} inputs: resize it first"
        )


def looks_like_pickle(head: bytes) -> bool:
    """True for the start of a pickle (protocol 2+: 0x80) or a torch.save zip ("PK"). A
    safetensors file starts with its header length (8 bytes, little-endian) and then "{": its
    first byte is 0x80 whenever that length is 128 mod 256, so "{" at offset 8 rules it out."""
    if head[8:9] == b"{":
        return False
    return head[:1] == b"\x80" or head[:2] == b"PK"


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load safetensors; anything else (a pickle, a truncated file) is refused with a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    data = read_regular_file(path, MAX_TENSOR_BYTES)  # a FIFO or device named *.safetensors: one line
    if looks_like_pickle(data):
        raise DubokoError(
            f"{path} looks like a pickle or a torch.save zip, which duboko never loads (it can run "
            "code); convert it to safetensors with `duboko import-weights` first"
        )
    try:
        tensors = load(data)
    except (SafetensorError, Exception) as exc:  # safetensors raises several types for bad data
        raise DubokoError(f"{path} is not a valid safetensors file ({exc})") from exc
    return {k: v.to(device) for k, v in tensors.items()}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_csv_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header, numbers parsed (int, else float, else the text);
    [] when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = read_regular_file(path, MAX_CSV_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DubokoError(f"{path} is not UTF-8 CSV: {exc}") from exc
    try:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text, newline=""))]
    except csv.Error as exc:
        raise DubokoError(f"{path} is not readable CSV: {exc}") from exc


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
