"""MNIST: find the IDX files locally (or download them when asked), check them, load as tensors.

Search order: `--data-dir` (``data_dir``), then ``$DUBOKO_DATA``, then the copy bundled inside the
package, then the user cache (``$XDG_CACHE_HOME/duboko/mnist``). A download from the usual public
mirrors into the cache happens only when asked (``download=True``) or when no local copy exists,
and when offline the error says what was tried.

What the MNIST tasks (image classification, diffusion) share sits on top: `load_split` keeps the
first `limit` images only, and `hold_out_validation` holds a fixed random validation split out of
the training images.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from duboko.data.batching import fixed_split
from duboko.data.idx import read_idx
from duboko.errors import DubokoError
from duboko.io import atomic_write_bytes

MEAN, STD = 0.1307, 0.3081  # train-set pixel statistics in [0, 1]
CLASSES = [str(i) for i in range(10)]
# Seed of the fixed validation split held out of the training images: a constant, so the split is
# the same for every run, rank and train.seed (and validation is comparable across runs).
SPLIT_SEED = 1234

FILES = {
    ("train", "images"): ("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", (60000, 28, 28)),
    ("train", "labels"): ("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", (60000,)),
    ("test", "images"): ("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", (10000, 28, 28)),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", (10000,)),
}
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]


def bundled_dir() -> Path:
    return Path(str(resources.files("duboko") / "data" / "bundled" / "mnist"))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duboko" / "mnist"


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    dirs = []
    if data_dir:
        dirs.append(("data.data_dir", Path(data_dir)))
    if os.environ.get("DUBOKO_DATA"):
        dirs.append(("$DUBOKO_DATA", Path(os.environ["DUBOKO_DATA"]) / "mnist"))
        dirs.append(("$DUBOKO_DATA", Path(os.environ["DUBOKO_DATA"])))
    dirs.append(("bundled copy", bundled_dir()))
    dirs.append(("user cache", cache_dir()))
    return dirs


def locate(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder holding all four MNIST files."""
    if data_dir and not Path(data_dir).is_dir():
        raise DubokoError(f"data directory {str(data_dir)!r} does not exist")
    stems = [v[0] for v in FILES.values()]
    tried = []
    if data_dir and not download:
        # An explicit folder is the user's choice: use it or say what it lacks, never fall back.
        missing = [s for s in stems if not _find(Path(data_dir), s)]
        if missing:
            raise DubokoError(f"data directory {str(data_dir)!r} lacks MNIST files: {', '.join(missing)} (.gz or raw)")
        return Path(data_dir)
    if not download:
        for label, folder in candidate_dirs(data_dir):
            if all(_find(folder, s) for s in stems):
                return folder
            tried.append(f"{label} {folder}")
    return _download(cache_dir(), tried)


def _download(folder: Path, tried: list[str]) -> Path:
    errors = []
    for stem in (v[0] for v in FILES.values()):
        if _find(folder, stem):
            continue
        for mirror in MIRRORS:
            url = f"{mirror}{stem}.gz"
            try:
                with urllib.request.urlopen(url, timeout=20) as response:
                    atomic_write_bytes(folder / f"{stem}.gz", response.read())
                break
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        else:
            raise DubokoError(
                "MNIST not found locally (looked in: " + "; ".join(tried or ["-"]) + ") and the download "
                "failed (" + "; ".join(errors) + "). Set data.data_dir (`--data-dir`) to a folder with the four IDX files."
            )
    return folder


def load_mnist(
    split: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST `split` ("train" or "test") as (uint8 images (N, 28, 28), int64 labels (N,))."""
    if split not in ("train", "test"):
        raise DubokoError(f"unknown MNIST split {split!r}; expected train or test")
    folder = locate(data_dir, download)
    arrays = []
    for kind in ("images", "labels"):
        stem, sha, shape = FILES[(split, kind)]
        arrays.append(read_idx(_find(folder, stem), sha256=sha, expected_shape=shape))
    images, labels = arrays
    if labels.max() > 9:
        raise DubokoError(f"MNIST labels in {folder} hold {int(labels.max())}; expected 0-9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


Split = tuple[torch.Tensor, torch.Tensor]  # (uint8 images (N, 28, 28), int64 labels (N,))


def load_split(
    split: str, data_dir: str | os.PathLike | None = None, download: bool = False, limit: int = 0
) -> Split:
    """MNIST `split` ("train" or "test"), only its first `limit` images when limit > 0 (quick
    runs and tests; 0 keeps all)."""
    if limit < 0:
        raise DubokoError(f"the MNIST image limit must be >= 0 (0: all), got {limit}")
    images, labels = load_mnist(split, data_dir, download)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def hold_out_validation(images: torch.Tensor, labels: torch.Tensor, n_val: int, seed: int = SPLIT_SEED) -> tuple[Split, Split]:
    """((train images, labels), (val images, labels)): `n_val` images held out at random with the
    fixed `seed` (`duboko.data.batching.fixed_split`); train keeps the rest in the split's
    permuted order."""
    train, val = fixed_split(len(images), n_val, seed)
    return (images[train], labels[train]), (images[val], labels[val])
