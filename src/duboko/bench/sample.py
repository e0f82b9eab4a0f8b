"""`duboko bench sample`: diffusion sampling speed as a user feels it — DDIM-50 on a batch of 16,
i.e. the seconds until a 16-image grid is ready, and images/s.

It times what `duboko sample RUN --n 16 --steps 50` does, on the same code path: the model as
`load_run` gives it (built from the registry, eval mode, contiguous memory format; untrained at the
recipe's size by default, since sampling speed does not depend on the weights, or loaded from a
trained run with `--run`), the digits 0-9 in turn as the condition of a conditioned recipe, the
recipe's guidance scale (cond and uncond in one batch of 2·16), `task.generate_batched` at the
run's eval batch size, fp32 and torch's thread count unless asked otherwise. One untimed warm-up
grid, then `repeats` timed grids; the median is reported, with the process's CPU time.

Why the thread count and the machine's load matter (measured, 2-core CPU, see docs/benchmarks.md):
with 2 OpenMP threads and the other core busy, libgomp's default wait policy spins at every
barrier of every op, and a UNet call took 1.6 CPU-s instead of 0.13 (12x, user time, no page
faults) — the 51-56 s grids of the first measurement, against 2.7 s measured by the studio on a
quieter machine. One thread (55 ms of CPU per batch-32 call) or OMP_WAIT_POLICY=PASSIVE (set
before torch loads) does not have that failure mode. The record keeps the policy in force.
"""

from __future__ import annotations

import os
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
    from duboko import registry

    _, raw = C.load_recipe_file(recipe)
    if raw.get("task") != "diffusion":
        raise DubokoError(f"bench sample needs diffusion recipes; {recipe!r} is a {raw.get('task')!r} recipe")
    # Only the sampler's tensors are needed, not the training set: keep the data tiny.
    cfg = C.resolve(recipe, ["data.limit_train=256", *overrides])
    trainer = common.EngineTrainer(cfg, device)  # builds and sets up the task (its schedule, the text encoder's vocabulary)
    # The model as `load_run` builds it for `duboko sample`: from the registry, in eval mode, in the
    # default memory format (the trainer's copy is channels-last when the recipe trains so).
    model_cfg = dict(cfg.model)
    model = registry.build_model(model_cfg.pop("name"), model_cfg).to(trainer.task.device).eval()
    return trainer.task, model, recipe, "untrained (recipe size; speed does not depend on the weights)"


def user_conditions(task, n: int) -> dict[str, Any]:
    """The condition `duboko sample RUN --n n` uses without --label/--prompt: the digits 0-9 in
    turn for a conditioned run (a text run turns them into held-out captions), none otherwise."""
    return {"labels": task.balanced_labels(n)} if getattr(task, "conditioning", "none") != "none" else {}


def bench_one(recipe: str, *, run: str | None = None, overrides: list[str] | None = None, images: int = 16,
              steps: int = 50, repeats: int = 2, precision: str = "fp32", device: str = "cpu",
              threads: int = 0, channels_last: bool = False) -> dict[str, Any]:
    task, model, name, weights = _task_and_model(recipe, run, overrides or [], device)
    if threads:
        torch.set_num_threads(threads)
    model.eval()
    dev = next(model.parameters()).device
    if channels_last:
        model.to(memory_format=torch.channels_last)
    prec = resolve_precision(precision, dev)
    conditioning = getattr(task, "conditioning", None)
    cond = user_conditions(task, images)
    guidance = task.config.data.guidance if cond else 1.0

    def grid() -> tuple[float, float]:
        common.sync(dev)
        cpu_start = time.process_time()
        start = time.perf_counter()
        # `duboko sample`'s call (cli/diffusion.py): batches of data.eval_batch_size, seed 0.
        with autocast(dev, prec):
            task.generate_batched(model, images, sampler="ddim", steps=steps, seed=0, **cond)
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
        "code_path": "task.generate_batched, as `duboko sample --n N --steps S`",
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
               images: int = 16, steps: int = 50, repeats: int = 2, precision: str = "fp32", device: str = "auto",
               threads: int = 0, channels_last: bool = False, target_seconds: float = 5.0) -> dict[str, Any]:
    if not 1 <= images <= MAX_IMAGES or not 1 <= steps <= 1000 or repeats < 1:
        raise DubokoError(f"--images must be in 1..{MAX_IMAGES}, --steps in 1..1000 and --repeats >= 1, "
                          f"got {images}, {steps}, {repeats}")
    from duboko.train.run import pick_device

    dev = pick_device(device)
    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    hw = common.hardware(dev)
    hw["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins at barriers)")
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
    return "\n".join([_hardware_line(result["hardware"]) + f" | OMP_WAIT_POLICY {result['hardware'].get('omp_wait_policy')}",
                      f"DDIM-{s['steps']}, batch {s['images']}, median of {s['repeats']}, the code path of `duboko sample`; "
                      f"weights: {'; '.join(weights)}",
                      common.format_table(rows, header), f"wall {result['wall_seconds']:.1f}s"])
