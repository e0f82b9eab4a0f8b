"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; Zalando Research, MIT licence): find the IDX files
locally, or download them when asked, check them like MNIST, load them as tensors.

Same format and sizes as MNIST (60,000 + 10,000 grey 28×28 images, labels 0-9), ten clothing
classes. Not vendored: it is found, in this order, in

    1. ``data_dir`` (``--data-dir``): the user's choice, used (downloaded into when asked) or
       refused, never fallen back from;
    2. ``$DUBOKO_DATA/fashion-mnist``, then ``$DUBOKO_DATA`` itself;
    3. the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
       which puts the four .gz files in /usr/share/datasets/fashion-mnist (``dpkg -L``; when that
       folder is missing, ``dpkg -L dataset-fashion-mnist`` is asked once, lazily, with a timeout);
    4. the user cache (``$DUBOKO_CACHE/fashion-mnist``, else ``~/.cache/duboko/fashion-mnist``).

A download into the user cache happens only when asked (``download=True``, config key
``data.download``); each downloaded archive must match the MD5 that Zalando publishes before it is
kept. Every load checks the SHA-256 of the decoded (decompressed) bytes, the shapes and the label
range, so a re-compressed copy (the Debian package's .gz files differ byte-wise from Zalando's but
decode to the same bytes) is accepted and a corrupt or different one is refused by name.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from duboko.data.idx import read_idx
from duboko.data.image_folder import user_cache_dir
from duboko.errors import DubokoError
from duboko.io import atomic_write_bytes

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530  # train-set pixel statistics in [0, 1] (0.28604, 0.35302 measured)
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # where that package installs the files


class IdxFile(NamedTuple):
    stem: str  # file name without .gz
    sha256: str  # of the decoded (decompressed) bytes: the same for every faithful copy
    md5_gz: str  # of Zalando's published .gz archive: checked on download
    shape: tuple[int, ...]  # the array in the file


FILES: dict[tuple[str, str], IdxFile] = {
    ("train", "images"): IdxFile("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                                 "8d4fb7e6c68d591d4c3dfef9ec88bf0d", (60000, 28, 28)),
    ("train", "labels"): IdxFile("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                                 "25c81989df183df01b3e8a0aad5dffbe", (60000,)),
    ("test", "images"): IdxFile("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                                "bef4ecab320f06d8554ea6380940ec79", (10000, 28, 28)),
    ("test", "labels"): IdxFile("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                                "bb300cfdad3c16e7a12a480ee83cd310", (10000,)),
}
# Zalando's repository, Keras' copy, Zalando's S3 bucket (plain HTTP: the checksums, not the
# transport, vouch for the bytes).
MIRRORS = [
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
]


def cache_dir(cache_root: str | os.PathLike | None = None) -> Path:
    return user_cache_dir(cache_root) / "fashion-mnist"


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_all(folder: Path) -> bool:
    return all(_find(folder, f.stem) for f in FILES.values())


@functools.lru_cache(maxsize=1)
def debian_dir() -> Path | None:
    """The folder where the Debian package put the files, or None when it is not installed.

    The package's fixed path is checked first (no subprocess); only when it is missing and dpkg
    exists is ``dpkg -L dataset-fashion-mnist`` asked, once, with a timeout."""
    if _has_all(DEBIAN_DIR):
        return DEBIAN_DIR
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return None
    try:
        listing = subprocess.run([dpkg, "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.stdout.splitlines() if listing.returncode == 0 else []:
        if line.strip().endswith(f"{FILES['train', 'images'].stem}.gz"):
            folder = Path(line.strip()).parent
            if _has_all(folder):
                return folder
    return None


def candidate_dirs(data_dir: str | os.PathLike | None = None, cache_root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(label, folder) in search order."""
    dirs = []
    if data_dir:
        dirs.append(("--data-dir", Path(data_dir)))
    if os.environ.get("DUBOKO_DATA"):
        dirs.append(("$DUBOKO_DATA", Path(os.environ["DUBOKO_DATA"]) / "fashion-mnist"))
        dirs.append(("$DUBOKO_DATA", Path(os.environ["DUBOKO_DATA"])))
    debian = debian_dir()
    dirs.append((f"Debian package {DEBIAN_PACKAGE}", debian if debian is not None else DEBIAN_DIR))
    dirs.append(("user cache", cache_dir(cache_root)))
    return dirs


def locate(
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    cache_root: str | os.PathLike | None = None,
) -> Path:
    """The folder holding all four Fashion-MNIST files (.gz or raw); with `download`, the folder
    they were downloaded into (`data_dir`, else the user cache) when no local copy has them."""
    if data_dir:
        # An explicit folder is the user's choice: use it, download into it when asked, or say
        # what it lacks; never fall back to another copy.
        folder = Path(data_dir)
        if _has_all(folder):
            return folder
        if download:
            return download_files(folder)
        if not folder.is_dir():
            raise DubokoError(f"data.data_dir {str(data_dir)!r} does not exist; expected a folder with the four Fashion-MNIST IDX files")
        missing = [f.stem for f in FILES.values() if not _find(folder, f.stem)]
        raise DubokoError(
            f"data.data_dir {str(data_dir)!r} lacks Fashion-MNIST files: {', '.join(missing)} (.gz or raw); "
            "set data.download = true to download them into it"
        )
    tried = []
    for label, folder in candidate_dirs(None, cache_root):
        if _has_all(folder):
            return folder
        tried.append(f"{label} {folder}")
    if not download:
        raise DubokoError(
            "Fashion-MNIST not found (looked in: " + "; ".join(tried) + "). Install it with "
            f"`apt-get install {DEBIAN_PACKAGE}`, pass --data-dir with the four IDX files, or set "
            "data.download = true to download them (with checksums) into the user cache"
        )
    return download_files(cache_dir(cache_root))


def _fetch(url: str, timeout: float = 30.0) -> bytes:
    """The bytes at `url` (replaced in tests: they never reach the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _check_archive(data: bytes, file: IdxFile) -> str:
    """What is wrong with a downloaded archive, or "" when it is the official one (its MD5) or a
    re-compression of it (the SHA-256 of its decoded bytes)."""
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if md5 == file.md5_gz:
        return ""
    try:
        decoded = gzip.decompress(data)
    except (EOFError, OSError, zlib.error):
        return f"not a gzip archive (MD5 {md5}, expected {file.md5_gz})"
    sha = hashlib.sha256(decoded).hexdigest()
    if sha != file.sha256:
        return f"MD5 {md5} (expected {file.md5_gz}) and decoded SHA-256 {sha[:16]}… (expected {file.sha256[:16]}…): a corrupt or different file"
    return ""


def download_files(folder: Path) -> Path:
    """Download the missing files into `folder`, each checked against Zalando's MD5 first."""
    errors = []
    for file in FILES.values():
        if _find(folder, file.stem):
            continue
        for mirror in MIRRORS:
            url = f"{mirror}{file.stem}.gz"
            try:
                data = _fetch(url)
            except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
                continue
            problem = _check_archive(data, file)
            if problem:
                errors.append(f"{url}: {problem}; not kept")
                continue
            atomic_write_bytes(folder / f"{file.stem}.gz", data)
            break
        else:
            raise DubokoError(
                f"could not download Fashion-MNIST's {file.stem}.gz (" + "; ".join(errors) + "). Install it with "
                f"`apt-get install {DEBIAN_PACKAGE}` or pass --data-dir with the four IDX files"
            )
    return folder


def load_fashion_mnist(
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    cache_root: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST `split` ("train" or "test") as (uint8 images (N, 28, 28), int64 labels (N,)).

    Label i is CLASSES[i]."""
    if split not in ("train", "test"):
        raise DubokoError(f"unknown Fashion-MNIST split {split!r}; expected train or test")
    folder = locate(data_dir, download, cache_root)
    arrays = []
    for kind in ("images", "labels"):
        file = FILES[(split, kind)]
        arrays.append(read_idx(_find(folder, file.stem), sha256=file.sha256, expected_shape=file.shape))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DubokoError(
            f"Fashion-MNIST {split} files in {folder} hold images of shape {images.shape} and labels of shape "
            f"{labels.shape}; expected (N, 28, 28) and (N,)"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise DubokoError(f"Fashion-MNIST labels in {folder} hold {int(labels.max())}; expected 0-{len(CLASSES) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
