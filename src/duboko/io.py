"""Atomic, safe file I/O used everywhere a file is written or a checkpoint is read.

Every write goes to a temporary file in the destination folder, is flushed and fsynced, then
renamed over the destination: a crash mid-write leaves the previous file whole. Tensors are stored
as safetensors (no pickle, no code execution on load).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
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


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DubokoError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DubokoError(f"{path} is not readable JSON: {exc}") from exc


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
    """A file's bytes; a missing file, a folder or an unreadable file is one clear DubokoError
    (`label`, e.g. "text file ", prefixes the path in the message)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DubokoError(f"{label}{path} does not exist") from exc
    except IsADirectoryError as exc:
        raise DubokoError(f"{label}{path} is a folder, expected a file") from exc
    except OSError as exc:
        raise DubokoError(f"cannot read {label}{path}: {exc.strerror or exc}") from exc


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load safetensors; anything else (a pickle, a truncated file) is refused with a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    data = read_file_bytes(path)
    if data[:2] == b"\x80\x02" or data[:1] == b"\x80" or data[:2] == b"PK":
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
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
