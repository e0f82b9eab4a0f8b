"""`duboko bench lm` and `duboko bench diffusion`: training throughput of every recipe of a family
through the engine's own `Trainer.step` (`common.EngineTrainer`), plus sampling speed for diffusion (DDPM's
full chain against DDIM's few steps).

Items are what the task counts in its step statistics: tokens for language models, images for
diffusion. Each recipe gets `warmup` untimed steps, then `windows` timed windows of `window` steps;
the reported rate is total items / total seconds, with the spread of the windows beside it.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from duboko import config as C
from duboko.bench import common
from duboko.errors import DubokoError

FAMILIES = {"lm": ("language-model", "tokens"), "diffusion": ("diffusion", "images")}


def family_recipes(family: str) -> list[str]:
    """Bundled recipes whose task is the family's and that train without user data."""
    task, _ = FAMILIES[family]
    names = []
    for name in C.recipe_names():
        _, raw = C.load_recipe_file(name)
        if raw.get("task") != task:
            continue
        data = raw.get("data", {})
        if "path" in data and not data["path"]:  # a "your own text" recipe: needs --set data.path
            continue
        names.append(name)
    return names


def bench_recipe(name: str, overrides: list[str], *, windows: int, window: int, warmup: int, device: str) -> dict[str, Any]:
    cfg = C.resolve(name, overrides)
    trainer = common.EngineTrainer(cfg, device)
    if warmup:
        trainer.run(warmup)
    results = [trainer.run(window) for _ in range(windows)]
    results = [r for r in results if r["steps"]]
    seconds = sum(r["seconds"] for r in results)
    items = sum(r["images"] for r in results)
    rates = [r["images"] / r["seconds"] for r in results if r["seconds"] > 0]
    return {
        "recipe": name,
        "model": cfg.model["name"],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "batch_size": cfg.train.batch_size,
        "precision": cfg.train.precision,
        "items_per_s": round(items / seconds, 1) if seconds else None,
        "steps_per_s": round(sum(r["steps"] for r in results) / seconds, 3) if seconds else None,
        "window_rates": [round(r, 1) for r in rates],
        "spread": round(statistics.pstdev(rates) / statistics.mean(rates), 3) if len(rates) > 1 else 0.0,
        # Recipes run one after another in this process: the resident peak is the process's so far.
        "memory": common.peak_memory_mb(trainer.device),
        "trainer": trainer,
    }


def sampling_speed(trainer: common.EngineTrainer, samples: int, ddpm_steps: int, ddim_steps: int) -> dict[str, Any]:
    """Sampled images/s with DDPM (ancestral, `ddpm_steps`) and DDIM (`ddim_steps`)."""
    task, model = trainer.task, trainer.trainer.eval_model()
    model.eval()
    out = {}
    labels = task.balanced_labels(samples) if getattr(task, "conditioning", None) == "class" else None
    prompts = None
    if getattr(task, "conditioning", None) == "text":
        prompts = [p for p in task._grid_condition(samples).get("prompts", [])][:samples]
    for sampler, steps in (("ddpm", ddpm_steps), ("ddim", ddim_steps)):
        common.sync(trainer.device)
        start = time.perf_counter()
        with torch.no_grad():
            task.generate(model, samples, labels=labels, prompts=prompts, sampler=sampler, steps=steps)
        common.sync(trainer.device)
        seconds = time.perf_counter() - start
        out[sampler] = {"steps": steps, "samples": samples, "seconds": round(seconds, 3),
                        "images_per_s": round(samples / seconds, 2)}
    out["ddim_speedup"] = round(out["ddim"]["images_per_s"] / out["ddpm"]["images_per_s"], 2)
    return out


def run_family(
    family: str,
    *,
    recipes: list[str] | None = None,
    overrides: list[str] | None = None,
    windows: int = 3,
    window: int = 5,
    warmup: int = 1,
    device: str = "auto",
    samples: int = 8,
    ddpm_steps: int = 0,
    ddim_steps: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    if family not in FAMILIES:
        from duboko.errors import unknown_name

        raise unknown_name("benchmark", family, FAMILIES)
    if windows < 1 or window < 1 or warmup < 0:
        raise DubokoError(f"--windows and --window must be >= 1 and --warmup >= 0, got {windows}, {window}, {warmup}")
    from duboko.train.run import pick_device

    dev = pick_device(device)
    task, unit = FAMILIES[family]
    names = recipes or family_recipes(family)
    for name in names:
        _, raw = C.load_recipe_file(name)
        if raw.get("task") != task:
            raise DubokoError(f"recipe {name!r} is a {raw.get('task')!r} recipe, not {task!r}")
    start = time.perf_counter()
    hw = common.hardware(dev)
    default_threads = torch.get_num_threads()
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc=f"bench {family}", leave=False, file=sys.stderr)
    for name in names:
        torch.set_num_threads(default_threads)  # a recipe's train.num_threads must not leak into the next
        row = bench_recipe(name, list(overrides or []), windows=windows, window=window, warmup=warmup,
                           device=str(dev))
        row["torch_threads"] = torch.get_num_threads()
        trainer = row.pop("trainer")
        if family == "diffusion":
            T = trainer.task.config.data.num_train_timesteps
            row["sampling"] = sampling_speed(trainer, samples, ddpm_steps or T, ddim_steps)
        del trainer
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    hw["load_average_end"] = common.hardware(dev).get("load_average")
    torch.set_num_threads(default_threads)
    return {"benchmark": family, "unit": unit, "hardware": hw,
            "settings": {"windows": windows, "window_steps": window, "warmup_steps": warmup, "overrides": overrides or []},
            "recipes": rows, "wall_seconds": round(time.perf_counter() - start, 2)}


def format_report(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    unit = result["unit"]
    rows = []
    for r in result["recipes"]:
        row = [r["recipe"], r["model"], f"{r['parameters']:,}", str(r["batch_size"]), r["precision"],
               str(r.get("torch_threads", "")),
               f"{r['items_per_s']:.1f}", f"±{r['spread'] * 100:.0f}%", f"{r['memory'].get('gpu_peak_mb', r['memory']['rss_peak_mb']):.0f} MB"]
        if "sampling" in r:
            s = r["sampling"]
            row += [f"{s['ddpm']['images_per_s']:.2f} ({s['ddpm']['steps']})", f"{s['ddim']['images_per_s']:.2f} ({s['ddim']['steps']})"]
        rows.append(row)
    header = ["recipe", "model", "params", "batch", "precision", "threads", f"train {unit}/s", "spread", "peak memory"]
    if result["benchmark"] == "diffusion":
        header += ["DDPM img/s (steps)", "DDIM img/s (steps)"]
    head = (f"hardware: {hw.get('gpu') or hw['cpu']} | {hw['cpu_cores']} cores, torch {hw['torch']}, "
            f"{hw['torch_threads']} threads by default, {hw['cpu_capability']} | load average "
            f"{hw.get('load_average')} -> {hw.get('load_average_end')}")
    return "\n".join([head, common.format_table(rows, header), f"wall {result['wall_seconds']:.1f}s"])
