"""`duboko bench images`: the image-folder data path, measured.

1. Cache build: how many images per second `image_folder.load_image_folder` decodes (PIL decode,
   channel conversion, resize, uint8 rows into the memory-mapped cache), then the time of a second
   load that finds the cache and decodes nothing.
2. Training images/s of the same model, batch, size, channels and precision, fed from the folder
   cache (`image-folder`) and from MNIST's in-memory tensors (`mnist-cnn`), both through the
   engine's own `Trainer.step` (`bench.common.EngineTrainer`), batch preparation included.

Without `data_dir` the folder is written first, as PNG files of real MNIST test digits (class
folders "0".."9"), into a temporary folder; the cache always goes to a temporary cache root, so a
benchmark neither reads nor leaves a user's cache.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from duboko import config as C
from duboko.bench import common
from duboko.data import image_folder
from duboko.errors import DubokoError


def write_digit_folder(root: Path, num_images: int) -> Path:
    """`num_images` real MNIST test digits as PNG files in ROOT/<digit>/ (the benchmark's folder)."""
    from PIL import Image

    from duboko.data.mnist import load_mnist

    images, labels = load_mnist("test")
    if not 20 <= num_images <= len(images):
        raise DubokoError(f"--images must be from 20 to {len(images)}, got {num_images}")
    for i in range(num_images):
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy()).save(folder / f"{i:05d}.png")
    return root


@contextmanager
def _cache_env(cache_root: Path) -> Iterator[None]:
    """The task's loader finds the cache through $DUBOKO_CACHE: point it at the benchmark's."""
    old = os.environ.get("DUBOKO_CACHE")
    os.environ["DUBOKO_CACHE"] = str(cache_root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DUBOKO_CACHE", None)
        else:
            os.environ["DUBOKO_CACHE"] = old


def _time_training(cfg, device: str, windows: int, window: int, warmup: int) -> dict[str, Any]:
    trainer = common.EngineTrainer(cfg, device)
    if warmup:
        trainer.run(warmup)
    runs = [r for r in (trainer.run(window) for _ in range(windows)) if r["steps"]]
    seconds = sum(r["seconds"] for r in runs)
    rates = [r["images"] / r["seconds"] for r in runs if r["seconds"] > 0]
    return {
        "recipe": cfg.recipe,
        "dataset": cfg.data.dataset,
        "model": cfg.model["name"],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "batch_size": cfg.train.batch_size,
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "precision": trainer.trainer.precision,
        "images_per_s": round(sum(r["images"] for r in runs) / seconds, 1) if seconds else None,
        "window_rates": [round(r, 1) for r in rates],
        "spread": round(statistics.pstdev(rates) / statistics.mean(rates), 3) if len(rates) > 1 else 0.0,
        "steps": sum(r["steps"] for r in runs),
        "device": str(trainer.device),
    }


def run_images(
    *,
    data_dir: str | None = None,
    num_images: int = 2000,
    image_size: int = 64,
    channels: int = 3,
    batch_size: int = 64,
    overrides: list[str] | None = None,
    windows: int = 3,
    window: int = 5,
    warmup: int = 1,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """The benchmark's JSON record (see the module docstring)."""
    for name, value, low in (("--windows", windows, 1), ("--window", window, 1), ("--warmup", warmup, 0),
                             ("--batch-size", batch_size, 1)):
        if value < low:
            raise DubokoError(f"{name} must be >= {low}, got {value}")
    wall = time.perf_counter()
    shared = [f"data.image_size={image_size}", f"model.image_size={image_size}", f"data.channels={channels}",
              f"model.in_channels={channels}", f"train.batch_size={batch_size}", "train.precision=auto",
              *(overrides or [])]
    with tempfile.TemporaryDirectory(prefix="duboko-bench-images-") as tmp:
        tmp_path = Path(tmp)
        source = "user folder" if data_dir else f"{num_images} MNIST test digits as PNG"
        folder = Path(data_dir) if data_dir else write_digit_folder(tmp_path / "digits", num_images)
        cache_root = tmp_path / "cache"
        kw = dict(image_size=image_size, channels=channels, val_fraction=0.2, cache_root=cache_root,
                  progress=progress, num_workers=workers)
        start = time.perf_counter()
        data = image_folder.load_image_folder(folder, **kw)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        again = image_folder.load_image_folder(folder, **kw)
        hit_s = time.perf_counter() - start
        build = {
            "source": source,
            "images": len(data.files),
            "decoded": data.decoded,
            "seconds": round(build_s, 3),
            "images_per_s": round(data.decoded / build_s, 1) if build_s > 0 else None,
            "workers": workers if workers is not None else min(4, os.cpu_count() or 1),
            "cache_mb": round(data.cache_path.stat().st_size / 2**20, 2),
            "cache_hit_seconds": round(hit_s, 4),
            "cache_hit_decoded": again.decoded,
        }
        with _cache_env(cache_root):
            folder_cfg = C.resolve("image-folder", shared, data_dir=str(folder))
            folder_run = _time_training(folder_cfg, device, windows, window, warmup)
        mnist_cfg = C.resolve("mnist-cnn", shared)
        mnist_run = _time_training(mnist_cfg, device, windows, window, warmup)
    rate_f, rate_m = folder_run["images_per_s"], mnist_run["images_per_s"]
    return {
        "benchmark": "images",
        "hardware": common.hardware(torch.device(folder_run["device"])),
        "precision": folder_run["precision"],
        "cache_build": build,
        "training": [folder_run, mnist_run],
        "folder_vs_mnist": round(rate_f / rate_m, 3) if rate_f and rate_m else None,
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }


def format_report(result: dict[str, Any]) -> str:
    b, hw = result["cache_build"], result["hardware"]
    head = (f"hardware: {hw.get('gpu') or hw['cpu']} | {hw['cpu_cores']} cores, torch {hw['torch']}, "
            f"bf16 native: {hw['cpu_bf16_native']} | precision {result['precision']}")
    build = (f"cache build: {b['decoded']} of {b['images']} images ({b['source']}) decoded in {b['seconds']:.2f}s = "
             f"{b['images_per_s']} images/s with {b['workers']} worker(s), {b['cache_mb']} MB; second load "
             f"{b['cache_hit_seconds'] * 1000:.1f} ms, {b['cache_hit_decoded']} decoded")
    rows = [[r["recipe"], "folder cache" if r["dataset"] == "folder" else "MNIST in memory", r["model"],
             f"{r['parameters']:,}", f"{r['image_size']}×{r['image_size']}×{r['channels']}", str(r["batch_size"]),
             r["precision"], f"{r['images_per_s']:.1f}", f"±{r['spread'] * 100:.0f}%"] for r in result["training"]]
    table = common.format_table(rows, ["recipe", "data", "model", "params", "input", "batch", "precision",
                                       "train images/s", "spread"])
    return "\n".join([head, build, table, f"folder / MNIST images/s: {result['folder_vs_mnist']}",
                      f"wall {result['wall_seconds']:.1f}s"])
