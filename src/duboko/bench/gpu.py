"""`duboko bench gpu`: the one prepared run for a lent CUDA GPU, recording into one JSON:

1. MY_NET, the primer's recipe (`mnist-cnn`: 5 epochs, batch 64, Adam) trained to the end through
   the engine's `Trainer.step` (bf16 where the GPU has it, channels-last): seconds, images/s, the
   test accuracy after it (target: ≤ 15 s);
2. time to 99.2 % test accuracy (`bench mnist --time-to-accuracy 0.992` with the reference's time
   estimated from interleaved windows, target ≤ 5 s);
3. GPT training tokens/s at the `shakespeare-gpt` config and model FLOPs utilisation,
   MFU = tokens/s × FLOPs per token (6·N + 12·L·T·d, `GPT.flops_per_token`) ÷ the GPU's peak;
4. diffusion DDIM-50 sampling of a 16-image grid (`bench sample`).

Each part is written to `--out` as soon as it ends, so a device lease that runs out mid-way still
leaves the parts that finished. Without CUDA it refuses, unless `--device cpu` asks for a dry run
(with `--quick`: tiny sizes, seconds; this is how the tests check the script).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from duboko import config as C
from duboko.bench import common
from duboko.errors import DubokoError

# Dense bf16 tensor peaks (TFLOP/s, no sparsity) from the vendors' data sheets, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}
PARTS = ("mnist", "accuracy", "gpt", "sample")


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named like `NVIDIA H200` (None when not in the table)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "L40S" before "L4"
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def _mnist_five_epochs(device: str, quick: bool) -> dict[str, Any]:
    from duboko.bench.mnist import duboko_config

    extra = ["data.limit_train=256", "data.limit_test=128", "train.epochs=1"] if quick else []
    cfg = duboko_config("mnist-cnn", extra, torch.device(device), "auto")
    trainer = common.EngineTrainer(cfg, device)
    trainer.run(2)  # warm-up (cuDNN autotuning, allocator), not counted: the run then starts over
    trainer = common.EngineTrainer(cfg, device)
    seconds = images = 0.0
    while not trainer.finished:
        w = trainer.run(trainer.steps_per_epoch)
        seconds += w["seconds"]
        images += w["images"]
    ev = trainer.evaluate()
    return {"recipe": cfg.recipe, "epochs": cfg.train.epochs, "precision": trainer.trainer.precision,
            "train_seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1) if seconds else None,
            "test_accuracy": round(ev["accuracy"], 5), "eval_seconds": round(ev["seconds"], 2),
            "target_seconds": 15.0, "meets_target": seconds <= 15.0 and not quick}


def _time_to_accuracy(device: str, quick: bool) -> dict[str, Any]:
    from duboko.bench import mnist
    from duboko.bench.reference import ReferenceConfig

    target = 0.5 if quick else 0.992
    limits = dict(limit_train=512, limit_test=128) if quick else {}
    overrides = [f"data.{k}={v}" for k, v in limits.items()]
    r = mnist.run_time_to_accuracy(target, overrides=overrides, device=device, reference=ReferenceConfig(**limits),
                                   subprocess=False, progress=False, window=5 if quick else 10)
    d = r["duboko"]
    return {"target_accuracy": target, "reached": d["reached_target"], "time_to_accuracy_s": d["time_to_accuracy_s"],
            "evaluations": d["evaluations"], "reference_time_s": r["reference"]["time_s"],
            "reference_time_source": r["reference"]["time_source"], "speedup": r["speedup_time_to_accuracy"],
            "target_seconds": 5.0,
            "meets_target": bool(d["time_to_accuracy_s"] is not None and d["time_to_accuracy_s"] <= 5.0 and not quick)}


def _gpt(device: str, quick: bool, peak: float | None) -> dict[str, Any]:
    from duboko.bench import recipes

    overrides = ["train.precision=auto"] + (["batch_size=2", "model.n_layer=1"] if quick else [])
    row = recipes.bench_recipe("shakespeare-gpt", overrides, windows=2 if quick else 5, window=2 if quick else 20,
                               warmup=1 if quick else 5, device=device)
    trainer = row.pop("trainer")
    model, seq_len = trainer.model, trainer.cfg.data.seq_len
    flops = model.flops_per_token(seq_len)
    achieved = row["items_per_s"] * flops  # FLOP/s
    row.update({"flops_per_token": flops, "achieved_tflops": round(achieved / 1e12, 3),
                "peak_tflops": peak, "mfu": round(achieved / (peak * 1e12), 4) if peak else None})
    return row


def _sample(device: str, quick: bool) -> dict[str, Any]:
    from duboko.bench import sample

    r = sample.run_sample(recipes=["mnist-diffusion"], images=2 if quick else 16, steps=2 if quick else 50,
                          repeats=1 if quick else 3, device=device)
    return r["models"][0]


def run_gpu(*, device: str = "cuda", quick: bool = False, peak_tflops: float = 0.0, skip: list[str] | None = None,
            out: str | None = None) -> dict[str, Any]:
    from duboko.train.run import pick_device

    dev = torch.device(device) if device == "cpu" else pick_device(device)
    if dev.type != "cuda" and dev.type != "cpu":
        raise DubokoError(f"bench gpu runs on cuda (or cpu for a dry run), got {device!r}")
    skip = list(skip or [])
    for s in skip:
        if s not in PARTS:
            from duboko.errors import unknown_name

            raise unknown_name("part", s, PARTS)
    hw = common.hardware(dev)
    peak = peak_tflops or (gpu_peak_tflops(hw.get("gpu", "")) if dev.type == "cuda" else None)
    result: dict[str, Any] = {"benchmark": "gpu", "hardware": hw, "quick": quick, "dry_run": dev.type != "cuda",
                              "parts": {}, "skipped": skip}
    start = time.perf_counter()
    steps = (("mnist", lambda: _mnist_five_epochs(str(dev), quick)), ("accuracy", lambda: _time_to_accuracy(str(dev), quick)),
             ("gpt", lambda: _gpt(str(dev), quick, peak)), ("sample", lambda: _sample(str(dev), quick)))
    for name, fn in steps:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            result["parts"][name] = fn()
        except DubokoError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others' numbers
            result["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        result["parts"][name]["part_seconds"] = round(time.perf_counter() - t0, 2)
        result["memory"] = common.peak_memory_mb(dev)
        result["wall_seconds"] = round(time.perf_counter() - start, 2)
        if out:
            from duboko.io import atomic_write_json

            atomic_write_json(out, result)
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    return result


def format_report(result: dict[str, Any]) -> str:
    hw, p = result["hardware"], result["parts"]
    lines = [f"hardware: {hw.get('gpu') or hw['cpu']} ({hw['device']}), torch {hw['torch']}"
             + (" | DRY RUN (not a GPU)" if result["dry_run"] else "") + (" | quick sizes" if result["quick"] else "")]
    rows = []

    def add(part: str, what: str, value: str, target: str, ok: Any) -> None:
        if part in p:
            if "error" in p[part]:
                rows.append([what, "error: " + p[part]["error"], target, "-"])
            else:
                rows.append([what, value, target, "yes" if ok else "no"])

    m = p.get("mnist", {})
    add("mnist", "MY_NET 5 epochs (mnist-cnn)", f"{m.get('train_seconds')} s, {m.get('images_per_s')} img/s, "
        f"acc {m.get('test_accuracy')}", "<= 15 s", m.get("meets_target"))
    a = p.get("accuracy", {})
    add("accuracy", f"time to {a.get('target_accuracy')}", f"{a.get('time_to_accuracy_s')} s (x{a.get('speedup')} vs "
        "reference)", "<= 5 s", a.get("meets_target"))
    g = p.get("gpt", {})
    add("gpt", "GPT training (shakespeare-gpt)", f"{g.get('items_per_s')} tokens/s, MFU {g.get('mfu')}", "-", True)
    s = p.get("sample", {})
    add("sample", f"DDIM-{s.get('steps')} grid of {s.get('images')}", f"{s.get('grid_seconds')} s, "
        f"{s.get('images_per_s')} img/s", "-", True)
    lines.append(common.format_table(rows, ["part", "result", "target", "met"]))
    lines.append(f"wall {result.get('wall_seconds', 0):.1f}s")
    return "\n".join(lines)
