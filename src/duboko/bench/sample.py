"""`duboko bench sample`: diffusion sampling speed as a user feels it — DDIM-50 on a batch of 16,
i.e. the seconds until a 16-image grid is ready, and images/s.

Each recipe's UNet is built at the recipe's size (untrained by default: sampling speed does not
depend on the weights; the record says so) or loaded from a trained run with `--run`. Sampling
calls the task's own `generate` (the diffusion pipeline, with classifier-free guidance for
conditioned recipes at the recipe's guidance scale), under the precision asked for (`auto`: bf16
autocast only where the hardware computes it natively). One untimed warm-up call, then `repeats`
timed grids; the median is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from duboko import config as C
from duboko.bench import common
from duboko.bench.generate import _hardware_line
from duboko.errors import DubokoError
from duboko.precision import autocast, resolve_precision

DEFAULT_RECIPES = ("mnist-diffusion", "mnist-diffusion-class")
MAX_IMAGES = 1024


def _task_and_model(recipe: str, run: str | None, overrides: list[str], device: str):
    if run:
        from duboko.train.verify import load_run_of

        loaded = load_run_of(run, ("diffusion",), device)
        return loaded.task, loaded.model, loaded.config.recipe, f"trained ({run})"
    _, raw = C.load_recipe_file(recipe)
    if raw.get("task") != "diffusion":
        raise DubokoError(f"bench sample needs diffusion recipes; {recipe!r} is a {raw.get('task')!r} recipe")
    # Only the sampler's tensors are needed, not the training set: keep the data tiny.
    cfg = C.resolve(recipe, ["data.limit_train=256", *overrides])
    trainer = common.EngineTrainer(cfg, device)
    return trainer.task, trainer.trainer.eval_model(), recipe, "untrained (recipe size; speed does not depend on the weights)"


def bench_one(recipe: str, *, run: str | None = None, overrides: list[str] | None = None, images: int = 16,
              steps: int = 50, repeats: int = 2, precision: str = "auto", device: str = "cpu",
              threads: int = 0, channels_last: bool = False) -> dict[str, Any]:
    task, model, name, weights = _task_and_model(recipe, run, overrides or [], device)
    if threads:
        torch.set_num_threads(threads)
    model.eval()
    dev = next(model.parameters()).device
    if channels_last:
        model.to(memory_format=torch.channels_last)
    prec = resolve_precision(precision, dev)
    cond: dict[str, Any] = {}
    conditioning = getattr(task, "conditioning", None)
    if conditioning in ("class", "text"):
        cond = task._grid_condition(images)
        if "prompts" in cond:
            cond["prompts"] = cond["prompts"][:images]
    guidance = task.config.data.guidance if conditioning in ("class", "text") else 1.0

    def grid() -> tuple[float, float]:
        common.sync(dev)
        cpu_start = time.process_time()
        start = time.perf_counter()
        with torch.no_grad(), autocast(dev, prec):
            task.generate(model, images, sampler="ddim", steps=steps, seed=0, **cond)
        common.sync(dev)
        return time.perf_counter() - start, time.process_time() - cpu_start

    grid()  # warm-up: allocator, oneDNN primitive caches
    timed = [grid() for _ in range(repeats)]
    seconds = [t for t, _ in timed]
    median = statistics.median(seconds)
    cpu = statistics.median(c for _, c in timed)
    return {
        "recipe": name,
        "model": task.config.model["name"] if hasattr(task.config, "model") else type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": weights,
        "conditioning": conditioning or "none",
        "guidance": guidance,
        "precision": prec,
        "channels_last": channels_last,
        "sampler": "ddim",
        "steps": steps,
        "images": images,
        "grid_seconds": round(median, 3),
        "grid_seconds_runs": [round(s, 3) for s in seconds],
        "images_per_s": round(images / median, 2),
        "model_calls_per_s": round(steps / median, 1),
        # CPU time of the process (all threads) per grid: on a shared machine the wall-clock
        # seconds depend on the neighbours; cpu_seconds / threads is the grid on free cores.
        "cpu_seconds": round(cpu, 3),
        "grid_seconds_free_cores": round(cpu / torch.get_num_threads(), 3) if dev.type == "cpu" else None,
    }


def run_sample(*, recipes: list[str] | None = None, runs: list[str] | None = None, overrides: list[str] | None = None,
               images: int = 16, steps: int = 50, repeats: int = 2, precision: str = "auto", device: str = "auto",
               threads: int = 0, channels_last: bool = False, target_seconds: float = 5.0) -> dict[str, Any]:
    if not 1 <= images <= MAX_IMAGES or not 1 <= steps <= 1000 or repeats < 1:
        raise DubokoError(f"--images must be in 1..{MAX_IMAGES}, --steps in 1..1000 and --repeats >= 1, "
                          f"got {images}, {steps}, {repeats}")
    from duboko.train.run import pick_device

    dev = pick_device(device)
    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    hw = common.hardware(dev)
    rows = []
    try:
        targets = [(None, r) for r in runs] if runs else [(r, None) for r in (recipes or DEFAULT_RECIPES)]
        for recipe, run in targets:
            torch.set_num_threads(threads or default_threads)
            row = bench_one(recipe or "", run=run, overrides=overrides, images=images, steps=steps, repeats=repeats,
                            precision=precision, device=str(dev), threads=threads, channels_last=channels_last)
            row["torch_threads"] = torch.get_num_threads()
            row["meets_target"] = row["grid_seconds"] <= target_seconds
            rows.append(row)
    finally:
        torch.set_num_threads(default_threads)
    hw["load_average_end"] = common.hardware(dev).get("load_average")
    return {"benchmark": "sample", "unit": "images", "hardware": hw, "target_grid_seconds": target_seconds,
            "settings": {"images": images, "steps": steps, "repeats": repeats, "precision": precision,
                         "overrides": overrides or []},
            "models": rows, "wall_seconds": round(time.perf_counter() - start, 2)}


def format_report(result: dict[str, Any]) -> str:
    rows = []
    for r in result["models"]:
        rows.append([r["recipe"], f"{r['parameters']:,}", r["conditioning"], f"{r['guidance']:g}", r["precision"],
                     str(r["torch_threads"]), f"{r['grid_seconds']:.2f}",
                     "-" if r["grid_seconds_free_cores"] is None else f"{r['grid_seconds_free_cores']:.2f}",
                     f"{r['images_per_s']:.1f}",
                     "yes" if r["meets_target"] else "NO"])
    s = result["settings"]
    header = ["recipe", "params", "condition", "guidance", "precision", "threads", f"{s['images']}-image grid s",
              "CPU s / threads",
              "images/s", f"<= {result['target_grid_seconds']:g} s"]
    weights = sorted({r["weights"] for r in result["models"]})
    return "\n".join([_hardware_line(result["hardware"]),
                      f"DDIM-{s['steps']}, batch {s['images']}, median of {s['repeats']}; weights: {'; '.join(weights)}",
                      common.format_table(rows, header), f"wall {result['wall_seconds']:.1f}s"])
