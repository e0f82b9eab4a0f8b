"""Image folders: your own pictures as a labelled data set, decoded once into a uint8 cache.

In the manner of Keras' ``image_dataset_from_directory`` and torchvision's ``ImageFolder``, with
PIL, numpy and torch only. Accepted layouts (class = sub-folder name):

    ROOT/<class>/**/*.{png,jpg,jpeg,bmp,gif,webp}         one pool; a seeded split makes "val"
    ROOT/train/<class>/...  +  ROOT/val/<class>/...       the given splits (ROOT/test too)
    ROOT/train/<class>/...  +  ROOT/test/<class>/...
    labels.csv with rows  path,label                      paths relative to the CSV's folder

Extensions are matched case-insensitively; hidden files and folders (a leading ".", e.g. macOS'
"._x.jpg" resource forks) and other files (README.txt) are ignored. Class names are the sorted
class-folder names (or CSV labels), numerically when every name is an integer, so folders 0..10
keep their values as label indices. In a split layout the classes are those of ROOT/train.

Decode once. Every image is decoded, converted to 1 (L) or 3 (RGB) channels, resized to
image_size × image_size (bilinear, like Keras; optionally centre-cropped to a square first) and
written as uint8 rows (N, C, H, W) to a raw file under the user cache
(``$DUBOKO_CACHE``, else ``$XDG_CACHE_HOME/duboko``, else ``~/.cache/duboko``), then read back with
``numpy.memmap``: later epochs and runs read tensors, and data larger than memory streams from
disk. The file name is a hash of the source, the decode settings, a format version and the sorted
file list with each file's size and mtime_ns, so a changed, added or removed file gives another
name and a rebuild. A rebuild copies the rows of unchanged files from the previous cache of the
same source and settings (only new or changed files are decoded again), then deletes that stale
cache. Files are written to a temporary name and renamed into place (a crash never leaves a half
cache); the JSON side file, written last, marks the cache complete.

Bad files (corrupt, truncated, empty, not an image, a decompression bomb, a symlink leading out of
ROOT) are collected over the whole pass and reported in ONE `DubokoError` naming the first few and
the count, unless ``skip_bad_images`` (config key ``data.skip_bad_images``) skips them; the result
then carries their number for metrics.json. An empty class folder, a single class or no images at
all are also one clear error. No traceback reaches the user.

Security: CSV paths must stay inside the CSV's folder (``..`` and absolute paths leading out are
refused), symlinks are never followed out of ROOT (nested symlinked folders are not entered at
all), and the pixel count of every image is bounded before it is decoded (``max_pixels``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from duboko.errors import DubokoError
from duboko.io import atomic_write_json

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
FORMAT_VERSION = 1  # bump when the decoding or the cache layout changes: old caches are ignored
# 2^26 ≈ 67 M pixels (an 8192×8192 image, ~200 MB as RGB) is more than any photo a classifier is
# trained on and below PIL's own warning limit (Image.MAX_IMAGE_PIXELS, ~89 M), so the refusal is
# ours and it happens on the header, before any pixel is decoded.
MAX_PIXELS = 1 << 26
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give
SHOW_BAD = 5  # bad files named in an error message; the rest are counted
_HEADER_NAMES = ({"path", "file", "filename", "filepath", "image"}, {"label", "class", "category", "target"})


# ---------------------------------------------------------------------------------------------
# The result.


@dataclass
class ImageFolderData:
    """A decoded image folder: rows of `images`, `labels` and `files` line up."""

    images: np.ndarray  # (N, C, H, W) uint8, memory-mapped read-only from `cache_path`
    labels: np.ndarray  # (N,) int64 indices into class_names
    class_names: list[str]  # label i is class_names[i]; sorted
    files: list[str]  # (N,) paths relative to the root (or the CSV's folder), '/'-separated
    splits: dict[str, np.ndarray]  # "train", "val" (and "test" with a ROOT/test folder) -> int64 row indices
    skipped: list[tuple[str, str]]  # (file, reason) per bad image skipped with data.skip_bad_images
    cache_path: Path  # the raw uint8 file behind `images` (its metadata is cache_path.with_suffix(".json"))
    decoded: int  # images decoded by this call: 0 when every image came from a cache
    root: Path  # the image folder, or the CSV file
    image_size: int  # H = W of every image
    channels: int  # C: 1 (grey) or 3 (RGB)
    empty_classes: list[str] = field(default_factory=list)  # empty class folders ignored with data.skip_bad_images

    @property
    def num_skipped(self) -> int:
        """Bad image files skipped (goes to metrics.json as data.skipped_images)."""
        return len(self.skipped)

    @property
    def eval_split(self) -> str:
        """The split to validate on: "val" when it has images, else "test" (ROOT/train + ROOT/test)."""
        if len(self.splits.get("val", ())) or "test" not in self.splits:
            return "val"
        return "test"

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One split in memory: uint8 images (n, C, H, W) and int64 labels (n,)."""
        if split not in self.splits:
            raise DubokoError(f"image folder {self.root} has no split {split!r}; it has: {', '.join(self.splits)}")
        return self.batch(self.splits[split])

    def batch(self, indices: np.ndarray | Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `indices` read from the memory-mapped cache: uint8 (b, C, H, W) and int64 (b,).

        Fancy indexing copies the rows out of the read-only map, so the tensors are writable and
        only this batch is in memory."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.images[idx])), torch.from_numpy(self.labels[idx].copy())

    def metrics(self) -> dict[str, int]:
        """Counts for metrics.json."""
        return {"data.skipped_images": self.num_skipped, "data.num_images": len(self.files),
                "data.num_classes": len(self.class_names)}


# ---------------------------------------------------------------------------------------------
# Where the cache lives.


def user_cache_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """duboko's cache folder: `cache_root` if given, else $DUBOKO_CACHE, else
    $XDG_CACHE_HOME/duboko, else ~/.cache/duboko."""
    if cache_root:
        return Path(cache_root)
    if os.environ.get("DUBOKO_CACHE"):
        return Path(os.environ["DUBOKO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duboko"


# ---------------------------------------------------------------------------------------------
# Decoding one image.


class _BadImage(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _sort_names(names: Iterable[str]) -> list[str]:
    names = sorted(set(names))
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)  # 0, 1, ..., 10 rather than 0, 1, 10, 2
    return names


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert to L (1 channel) or RGB (3). Alpha is dropped, as in Keras and torchvision."""
    if im.mode.startswith("I;16"):
        # 16-bit grey (scientific PNGs): PIL's convert("L") clips at 255; keep the top 8 bits.
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")  # a palette's transparency is resolved first (PIL warns otherwise)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _decode_file(path: Path, image_size: int, channels: int, crop_to_aspect_ratio: bool, max_pixels: int) -> np.ndarray:
    """Decode one file to uint8 (C, image_size, image_size); raises _BadImage with the reason."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise _BadImage("empty file (0 bytes)")
            with Image.open(f) as im:  # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    raise _BadImage(
                        f"{w}×{h} = {w * h:,} pixels, more than data.max_pixels = {max_pixels:,} "
                        "(a decompression bomb?)"
                    )
                if w < 1 or h < 1:
                    raise _BadImage(f"image of size {w}×{h}")
                if im.format == "JPEG":
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still gives at least
                    # image_size pixels a side: several times faster for big photos.
                    im.draft("L" if channels == 1 else "RGB", (image_size, image_size))
                im.load()  # decodes: truncated and corrupt data fail here
                out = im
                if im.getexif().get(0x0112, 1) in range(2, 9):  # EXIF orientation (phone photos)
                    out = ImageOps.exif_transpose(im)
                out = _to_mode(out, channels)
                if crop_to_aspect_ratio and out.width != out.height:
                    side = min(out.width, out.height)  # centre square, as Keras' crop_to_aspect_ratio
                    left, top = (out.width - side) // 2, (out.height - side) // 2
                    out = out.crop((left, top, left + side, top + side))
                if out.size != (image_size, image_size):
                    out = out.resize((image_size, image_size), Image.Resampling.BILINEAR)
                array = np.asarray(out, dtype=np.uint8)  # (H, W) or (H, W, 3)
    except _BadImage:
        raise
    except FileNotFoundError as exc:
        raise _BadImage("does not exist") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _BadImage(f"a decompression bomb ({_one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise _BadImage("not an image PIL can read") from exc
    except OSError as exc:
        raise _BadImage(f"truncated or corrupt ({_one_line(exc.strerror or exc)})") from exc
    except Exception as exc:  # noqa: BLE001
        # PIL's format plugins raise many types (SyntaxError, ValueError, struct.error, IndexError,
        # ...) on hostile or broken files; one user file must never crash a run.
        raise _BadImage(f"cannot be decoded ({type(exc).__name__}: {_one_line(exc)})") from exc
    if array.ndim == 2:
        array = array[None]  # (1, H, W)
    else:
        array = array.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return np.ascontiguousarray(array)


def decode_image(
    path: str | os.PathLike,
    *,
    image_size: int,
    channels: int = 3,
    crop_to_aspect_ratio: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """One image decoded exactly as the cache decodes it: uint8 (C, image_size, image_size).

    For `predict` on a single photo; a bad file is a DubokoError naming it."""
    _check_settings(image_size, channels, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode_file(Path(path), image_size, channels, crop_to_aspect_ratio, max_pixels)
    except _BadImage as exc:
        raise DubokoError(f"{path}: {exc}") from None


def _check_settings(image_size: int, channels: int, max_pixels: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096:
        raise DubokoError(f"data.image_size must be an integer from 1 to 4096, got {image_size!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DubokoError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    limit = Image.MAX_IMAGE_PIXELS or 1 << 31  # None: the user switched PIL's check off
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or not 1 <= max_pixels <= limit:
        raise DubokoError(f"data.max_pixels must be an integer from 1 to {limit:,} (PIL's limit), got {max_pixels!r}")


# ---------------------------------------------------------------------------------------------
# Finding the files.


@dataclass(frozen=True)
class _Entry:
    rel: str  # path relative to the root, '/'-separated: the name in the cache key and in errors
    label: str  # class name
    split: str  # "train" | "val" | "test", or "" when the seeded split decides
    path: Path  # the file to open (symlinks resolved)
    size: int  # bytes
    mtime_ns: int  # modification time


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _inside(path: Path, real_root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _subdirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not _hidden(e.name) and e.is_dir())
    except OSError as exc:
        raise DubokoError(f"cannot list {folder}: {exc.strerror or exc}") from exc


def _stat_entry(rel: str, label: str, split: str, path: Path, bad: list[tuple[str, str]]) -> _Entry | None:
    try:
        real = path.resolve()
        st = os.stat(real)
    except (OSError, RuntimeError) as exc:
        bad.append((rel, f"cannot be read ({_one_line(getattr(exc, 'strerror', None) or exc)})"))
        return None
    if not os.path.isfile(real):
        bad.append((rel, "is not a regular file"))
        return None
    return _Entry(rel, label, split, real, st.st_size, st.st_mtime_ns)


def _scan_folder(root: Path) -> tuple[list[_Entry], list[tuple[str, str]], list[str], bool]:
    """(entries, bad files, empty class folders, whether ROOT has train/val|test sub-trees)."""
    real_root = root.resolve()
    top = _subdirs(root)
    split_layout = "train" in top and ("val" in top or "test" in top)
    groups = [(s, root / s, f"{s}/") for s in SPLIT_FOLDERS if s in top] if split_layout else [("", root, "")]
    entries: list[_Entry] = []
    bad: list[tuple[str, str]] = []
    empty: list[str] = []
    for split, base, prefix in groups:
        if not _inside(base, real_root):
            bad.append((prefix, "a symlink to a folder outside the data folder (not followed)"))
            continue
        for label in _subdirs(base):
            class_dir = base / label
            if not _inside(class_dir, real_root):
                bad.append((f"{prefix}{label}/", "a symlink to a folder outside the data folder (not followed)"))
                continue
            found = 0
            # followlinks=False: symlinked sub-folders are not entered, so no walk leaves ROOT.
            for folder, dirs, names in os.walk(class_dir, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not _hidden(d))
                for name in sorted(names):
                    if _hidden(name) or not name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    found += 1
                    path = Path(folder) / name
                    rel = path.relative_to(root).as_posix()
                    if path.is_symlink() and not _inside(path, real_root):
                        bad.append((rel, "a symlink to a file outside the data folder (not followed)"))
                        continue
                    entry = _stat_entry(rel, label, split, path, bad)
                    if entry is not None:
                        entries.append(entry)
            if not found and split in ("", "train"):
                empty.append(f"{prefix}{label}")
    entries.sort(key=lambda e: e.rel)
    return entries, bad, empty, split_layout


def _is_header(row: list[str]) -> bool:
    return len(row) == 2 and row[0].strip().lower() in _HEADER_NAMES[0] and row[1].strip().lower() in _HEADER_NAMES[1]


def _scan_csv(csv_path: Path) -> tuple[list[_Entry], list[tuple[str, str]]]:
    """Entries of a `path,label` CSV (an optional header row such as `path,label` is skipped)."""
    base = csv_path.parent.resolve()
    entries: list[_Entry] = []
    bad: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DubokoError(f"cannot read the CSV {csv_path}: {_one_line(exc)}") from exc
    first = True
    for lineno, row in enumerate(rows, 1):
        if not any(cell.strip() for cell in row):
            continue
        if first and _is_header(row):
            first = False
            continue
        first = False
        if len(row) != 2:
            raise DubokoError(f"{csv_path} line {lineno}: expected 2 columns path,label, got {len(row)}: {row!r}")
        name, label = row[0].strip(), row[1].strip()
        if not name or not label:
            raise DubokoError(f"{csv_path} line {lineno}: empty path or label in {row!r}; expected path,label")
        given = Path(name)
        full = given if given.is_absolute() else base / given
        if not _inside(full, base):
            raise DubokoError(
                f"{csv_path} line {lineno}: path {name!r} leads outside the CSV's folder {base}; "
                "paths must be relative to that folder and stay inside it"
            )
        try:  # the name as written, normalised ("./a/../b.png" -> "b.png")
            rel = Path(os.path.normpath(full)).relative_to(base).as_posix()
        except ValueError:  # an absolute path through a symlinked prefix of the folder
            rel = full.resolve().relative_to(base).as_posix()
        if rel in seen:
            raise DubokoError(f"{csv_path} line {lineno}: {name!r} is listed twice (first on line {seen[rel]})")
        seen[rel] = lineno
        if not full.exists():
            bad.append((rel, "does not exist"))
            continue
        entry = _stat_entry(rel, label, "", full, bad)
        if entry is not None:
            entries.append(entry)
    entries.sort(key=lambda e: e.rel)
    return entries, bad


# ---------------------------------------------------------------------------------------------
# The seeded split.


def _file_hash(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogateescape")).digest()


def split_indices(
    files: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    val_fraction: float,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) int64 row indices, a pure function of the seed and the file names.

    Files are ordered by SHA-256(seed, name) and the first round(val_fraction · n) go to val, per
    class when `stratified` (each class with at least 2 files then gives at least one to val and
    keeps at least one in train). Ordering by a hash of the name, not by a permutation of the row
    numbers, keeps every other file on its side when a file is added or removed."""
    if not 0.0 <= val_fraction < 1.0:
        raise DubokoError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} files but {len(labels)} labels")
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if stratified else [np.arange(len(files))]
    val: list[int] = []
    for group in groups:
        order = sorted(group.tolist(), key=lambda i: _file_hash(seed, files[i]))
        k = math.floor(val_fraction * len(order) + 0.5)
        if stratified and val_fraction > 0 and len(order) >= 2:
            k = min(max(k, 1), len(order) - 1)
        val.extend(order[:k])
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(files), dtype=np.int64), val_idx)
    return train_idx, val_idx


# ---------------------------------------------------------------------------------------------
# The cache.


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _cache_names(source: Path, settings: dict, entries: list[_Entry]) -> tuple[str, str]:
    """(prefix, key): prefix names the source and the decode settings, key adds the file list."""
    prefix = _digest({"source": str(source), "settings": settings, "version": FORMAT_VERSION,
                      "pillow": PIL.__version__})[:16]
    listing = [[e.rel, e.label, e.split, e.size, e.mtime_ns] for e in entries]
    return prefix, _digest({"prefix": prefix, "files": listing})[:32]


def _open_rows(path: Path, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    if n == 0:  # numpy cannot map an empty file
        return np.zeros((0, *shape), dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, *shape))


def _read_cache(meta_path: Path, shape: tuple[int, int, int]) -> tuple[dict, np.ndarray] | None:
    """A complete cache (its metadata and its mapped rows), or None when missing or damaged."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        n = int(meta["rows"])
        data_path = meta_path.with_suffix(".u8")
        if meta.get("version") != FORMAT_VERSION or data_path.stat().st_size != n * math.prod(shape):
            return None
        entries = meta["entries"]
        rows = [e[5] for e in entries if len(e) == 7 and isinstance(e[5], int) and e[5] >= 0]
        if any(len(e) != 7 for e in entries) or rows != list(range(n)):
            return None  # not a cache this code wrote: rebuild rather than trust it
        return meta, _open_rows(data_path, n, shape)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _previous_cache(folder: Path, prefix: str, shape: tuple[int, int, int]) -> tuple[dict, np.ndarray] | None:
    """The newest complete cache of the same source and settings, to copy unchanged rows from."""
    try:
        metas = sorted(folder.glob(f"{prefix}-*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    except OSError:
        return None
    for meta_path in metas:
        found = _read_cache(meta_path, shape)
        if found is not None:
            return found
    return None


def _windowed_map(fn: Callable[[_Entry], object], items: list[_Entry], workers: int) -> Iterator[object]:
    """fn over items in order, `workers` threads, at most 4·workers results in flight (a
    million files never queue a million futures). PIL releases the GIL while it decodes."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="duboko-decode")
    window: deque[Future] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress_bar(total: int, progress: bool | None):
    show = sys.stderr.isatty() if progress is None else progress
    if not show or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="decoding images", unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)


def _build_cache(
    folder: Path,
    prefix: str,
    key: str,
    source: Path,
    settings: dict,
    entries: list[_Entry],
    progress: bool | None,
    workers: int,
) -> tuple[dict, np.ndarray, int]:
    """Decode (or copy from the previous cache) every entry into a new cache; returns its
    metadata, its mapped rows and the number of images decoded."""
    shape = (settings["channels"], settings["image_size"], settings["image_size"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DubokoError(f"cannot create the cache folder {folder}: {exc.strerror or exc}; set $DUBOKO_CACHE to a writable folder") from exc
    previous = _previous_cache(folder, prefix, shape)
    reuse: dict[tuple[str, int, int], tuple[int, str]] = {}
    if previous is not None:
        for rel, _label, _split, size, mtime_ns, row, reason in previous[0]["entries"]:
            reuse[(rel, size, mtime_ns)] = (row, reason)
    todo = [e for e in entries if (e.rel, e.size, e.mtime_ns) not in reuse]

    def decode(e: _Entry) -> np.ndarray | str:
        try:
            return _decode_file(e.path, settings["image_size"], settings["channels"],
                                settings["crop_to_aspect_ratio"], settings["max_pixels"])
        except _BadImage as exc:
            return str(exc)

    data_path = folder / f"{prefix}-{key}.u8"
    meta_entries: list[list] = []
    rows = 0
    bar = _progress_bar(len(todo), progress)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{data_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, warnings.catch_warnings():
            # PIL only warns for images between its two bomb limits; make that an error too.
            # (The filter is process-wide, so it also holds in the decoding threads.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            results = _windowed_map(decode, todo, workers)
            for e in entries:
                old = reuse.get((e.rel, e.size, e.mtime_ns))
                if old is not None:
                    old_row, reason = old
                    got: np.ndarray | str = previous[1][old_row] if old_row >= 0 else reason
                else:
                    got = next(results)
                    if bar is not None:
                        bar.update(1)
                if isinstance(got, str):
                    meta_entries.append([e.rel, e.label, e.split, e.size, e.mtime_ns, -1, got])
                else:
                    f.write(np.ascontiguousarray(got).tobytes())  # one (C, H, W) row
                    meta_entries.append([e.rel, e.label, e.split, e.size, e.mtime_ns, rows, ""])
                    rows += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp gives 0600; the cache is as readable as any file
        os.replace(tmp, data_path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DubokoError(
            f"cannot write the image cache {data_path}: {exc.strerror or exc}; set $DUBOKO_CACHE to a folder with room"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    meta = {"version": FORMAT_VERSION, "source": str(source), "settings": settings, "rows": rows,
            "entries": meta_entries}
    atomic_write_json(data_path.with_suffix(".json"), meta)  # written last: marks the cache complete
    for stale in folder.glob(f"{prefix}-*"):  # older versions of this same source and settings
        if stale.name.split(".")[0] != f"{prefix}-{key}":
            try:
                stale.unlink()
            except OSError:
                pass  # in use elsewhere (Windows) or already gone: harmless, it is never read again
    return meta, _open_rows(data_path, rows, shape), len(todo)


# ---------------------------------------------------------------------------------------------
# The loader.


def _list_bad(bad: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{_one_line(name)} ({reason})" for name, reason in bad[:SHOW_BAD])
    more = f"; and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
    return shown + more


def _bad_files_error(bad: list[tuple[str, str]], src: Path) -> DubokoError:
    return DubokoError(
        f"{len(bad)} bad image file{'s' if len(bad) > 1 else ''} in {src}: {_list_bad(bad)}; "
        "fix or remove them, or set data.skip_bad_images = true to skip them (they are counted in metrics.json)"
    )


def load_image_folder(
    source: str | os.PathLike,
    *,
    image_size: int = 64,
    channels: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
    stratified: bool = True,
    skip_bad_images: bool = False,
    crop_to_aspect_ratio: bool = False,
    max_pixels: int = MAX_PIXELS,
    cache_root: str | os.PathLike | None = None,
    progress: bool | None = None,
    num_workers: int | None = None,
) -> ImageFolderData:
    """Load an image folder (or a `path,label` CSV) through the decode-once cache.

    `val_fraction` and `seed` make the "val" split when the folder has no ROOT/val or ROOT/test;
    `progress` None shows a bar when stderr is a terminal; `num_workers` decoding threads
    (default: up to 4, one per core)."""
    _check_settings(image_size, channels, max_pixels)
    if not 0.0 <= val_fraction < 1.0:
        raise DubokoError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    src = Path(os.path.expanduser(str(source)))
    if src.is_dir():
        entries, bad, empty, split_layout = _scan_folder(src)
        layout = f"{src}/<class>/*.png (or {src}/train/<class>/ and {src}/val/<class>/)"
    elif src.is_file() and src.suffix.lower() == ".csv":
        entries, bad = _scan_csv(src)
        empty, split_layout = [], False
        layout = f"rows path,label in {src}"
    elif src.exists():
        raise DubokoError(f"data.data_dir {str(source)!r} is neither a folder of class folders nor a .csv file")
    else:
        raise DubokoError(f"data.data_dir {str(source)!r} does not exist; expected a folder of class folders or a .csv file")

    if not entries and not bad:
        raise DubokoError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {src}; expected {layout}"
        )
    if empty and not skip_bad_images:
        raise DubokoError(
            f"{len(empty)} empty class folder{'s' if len(empty) > 1 else ''} in {src}: "
            f"{', '.join(empty[:SHOW_BAD])}{' ...' if len(empty) > SHOW_BAD else ''}; "
            "add images or remove the folder, or set data.skip_bad_images = true to ignore it"
        )
    if not entries:  # only unusable files (symlinks out of ROOT, unreadable, missing CSV rows)
        if skip_bad_images:
            raise DubokoError(f"no readable image in {src}: all {len(bad)} files are bad ({_list_bad(bad)})")
        raise _bad_files_error(bad, src)
    train_classes = {e.label for e in entries if e.split in ("", "train")}
    if len(train_classes) < 2:
        found = ", ".join(sorted(train_classes)) or "none"
        raise DubokoError(
            f"found {len(train_classes)} class ({found}) in {src}; a classifier needs at least 2 classes ({layout})"
        )
    strays = sorted({f"{e.split}/{e.label}" for e in entries if e.split in ("val", "test") and e.label not in train_classes})
    if strays:
        raise DubokoError(
            f"class folder{'s' if len(strays) > 1 else ''} {', '.join(strays[:SHOW_BAD])} in {src} "
            f"{'have' if len(strays) > 1 else 'has'} no match in {src}/train; expected the same class names in every split"
        )

    settings = {"image_size": image_size, "channels": channels, "crop_to_aspect_ratio": bool(crop_to_aspect_ratio),
                "max_pixels": max_pixels}
    real_src = src.resolve()
    folder = user_cache_dir(cache_root) / "image-folder"
    prefix, key = _cache_names(real_src, settings, entries)
    shape = (channels, image_size, image_size)
    meta_path = folder / f"{prefix}-{key}.json"
    cached = _read_cache(meta_path, shape)
    if cached is not None:
        meta, rows_array = cached
        decoded = 0
    else:
        workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        meta, rows_array, decoded = _build_cache(folder, prefix, key, real_src, settings, entries, progress, workers)

    bad = bad + [(rel, reason) for rel, _l, _s, _z, _m, row, reason in meta["entries"] if row < 0]
    bad.sort()
    if bad and not skip_bad_images:
        raise _bad_files_error(bad, src)

    kept = [(rel, label, split, row) for rel, label, split, _z, _m, row, _r in meta["entries"] if row >= 0]
    class_names = _sort_names(label for _rel, label, split, _row in kept if split in ("", "train"))
    if len(class_names) < 2:
        raise DubokoError(
            f"{src} has readable images of {len(class_names)} class{'es' if len(class_names) != 1 else ''} "
            f"({', '.join(class_names) or 'none'}) after skipping {len(bad)} bad file(s); a classifier needs at least 2"
        )
    index = {name: i for i, name in enumerate(class_names)}
    skipped = list(bad)
    for rel, label, split, _row in kept:
        if label not in index:  # every training image of this class was bad and skipped
            skipped.append((rel, f"class {label!r} has no readable training image"))
    kept = [k for k in kept if k[1] in index]
    rows = np.array([row for *_rest, row in kept], dtype=np.int64)
    # The cache holds exactly the readable images, in file order, so the map itself is the data
    # set; only when a class was dropped above (rare) are the kept rows copied into memory.
    images = rows_array if len(rows) == len(rows_array) else np.asarray(rows_array[rows])
    files = [rel for rel, *_rest in kept]
    labels = np.array([index[label] for _rel, label, _s, _r in kept], dtype=np.int64)

    if split_layout:
        splits = {s: np.array([i for i, k in enumerate(kept) if k[2] == s], dtype=np.int64)
                  for s in SPLIT_FOLDERS if any(e.split == s for e in entries) or s == "train"}
    else:
        train_idx, val_idx = split_indices(files, labels, val_fraction, seed, stratified)
        splits = {"train": train_idx, "val": val_idx}
    return ImageFolderData(
        images=images, labels=labels, class_names=class_names, files=files, splits=splits,
        skipped=skipped, cache_path=meta_path.with_suffix(".u8"), decoded=decoded, root=src,
        image_size=image_size, channels=channels, empty_classes=list(empty),
    )

