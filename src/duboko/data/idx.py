"""Reader for the IDX format of the MNIST files (gzip-compressed or raw).

Layout (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, one uint32 per dimension, then the data. Every malformed file (truncated, wrong magic,
wrong size, bad gzip stream, wrong checksum) raises `DubokoError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from duboko.errors import DubokoError
from duboko.io import read_file_bytes

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_bytes(path: str | os.PathLike) -> bytes:
    """The decoded bytes of an IDX file, decompressing gzip when the file is gzip."""
    path = Path(path)
    raw = read_file_bytes(path)
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DubokoError(f"{path} is a truncated or corrupt gzip file ({exc})") from exc
    return raw


def parse(data: bytes, name: str = "<bytes>", expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Parse decoded IDX bytes into an array, checking the header against the payload size."""
    if len(data) < 4:
        raise DubokoError(f"{name} is not an IDX file: only {len(data)} bytes")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES or not 1 <= ndim <= 4:
        raise DubokoError(
            f"{name} is not an IDX file: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000 then a type code and 1-4 dimensions, e.g. 0x00000803)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DubokoError(f"{name} is truncated: header needs {header} bytes, file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[code])
    need = math.prod(shape) * dtype.itemsize  # Python ints: no int64 overflow for huge headers
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**40:
        # numpy refuses such shapes even when one dimension is 0 (the payload is then empty).
        raise DubokoError(f"{name} has an implausible shape {shape} in its header; a corrupt file?")
    have = len(data) - header
    if have != need:
        raise DubokoError(
            f"{name} is {'truncated' if have < need else 'too long'}: header says shape {shape} "
            f"({need} bytes of data), file has {have}"
        )
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise DubokoError(f"{name} has shape {tuple(shape)}, expected {tuple(expected_shape)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(
    path: str | os.PathLike,
    sha256: str | None = None,
    expected_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Read and validate one IDX file; `sha256` is of the decoded (decompressed) bytes."""
    data = read_bytes(path)
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise DubokoError(
                f"{path} has the wrong checksum: SHA-256 of its decoded bytes is {got[:16]}…, "
                f"expected {sha256[:16]}… (a corrupt or different file)"
            )
    return parse(data, str(path), expected_shape)
