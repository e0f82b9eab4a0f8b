"""`duboko bench mnist`: the primer's pipeline against duboko's, side by side, pair by pair.

Two modes:

* throughput (default): both sides train MY_NET with the same recipe (batch 64, Adam 1e-3,
  wd 1e-4, the same augmentation); the reference is the primer's per-sample PIL pipeline in
  float32 eager (`duboko.bench.reference`), duboko is the engine's step on the `mnist-cnn` recipe
  with its fast switches (device-resident uint8 data, batched augmentation, channels-last,
  bf16 where the hardware has it, foreach optimizer). Windows of N batches alternate
  (ref, duboko), (duboko, ref), ... and each back-to-back pair gives one speed ratio.
* time to accuracy (`--time-to-accuracy 0.992`): duboko trains the `mnist-cnn-fast` recipe to the
  end of the first epoch whose test accuracy reaches the target; reference windows are
  interleaved all along so its images/s is measured under the same machine conditions. The
  reference's time for its own 5-epoch recipe is then its measured images/s × 5 × 60,000 images
  (labelled an estimate), or, with `--reference-full`, really trained and evaluated.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from duboko import config as C
from duboko.bench import common
from duboko.bench.reference import ReferenceConfig, ReferenceTrainer
from duboko.errors import DubokoError

# Picklable factories (worker processes are spawned, so they get these by reference).


@dataclasses.dataclass
class _ReferenceFactory:
    cfg: ReferenceConfig
    threads: int = 0

    def __call__(self) -> ReferenceTrainer:
        if self.threads:
            torch.set_num_threads(self.threads)
        return ReferenceTrainer(self.cfg)


@dataclasses.dataclass
class _EngineFactory:
    cfg_dict: dict[str, Any]
    device: str = "auto"

    def __call__(self) -> common.EngineTrainer:
        return common.EngineTrainer(C.resolve(self.cfg_dict), self.device)


PRECISIONS = ("auto", "fp32", "bf16", "recipe")


def _precision(precision: str, device: torch.device) -> list[str]:
    """`--precision`: auto picks bf16 only where the hardware computes it natively (emulated bf16
    is several times slower than fp32 on a CPU without AVX-512 BF16); recipe keeps the recipe's."""
    if precision not in PRECISIONS:
        from duboko.errors import unknown_name

        raise unknown_name("precision", precision, PRECISIONS)
    if precision == "recipe":
        return []
    return [f"train.precision={common.best_precision(device) if precision == 'auto' else precision}"]


def duboko_config(recipe: str, overrides: list[str], device: torch.device, precision: str = "auto",
                  fast_switches: bool = True) -> C.RunConfig:
    """The duboko side's recipe: `recipe` with the fast switches for `device` (channels-last;
    bf16 only where the hardware computes it natively), then the user's `--set` overrides."""
    fast = _precision(precision, device) + (["train.channels_last=true"] if fast_switches else [])
    cfg = C.resolve(recipe, fast + list(overrides))
    if cfg.task != "image-classification" or not str(cfg.model.get("name", "")).startswith("my_net"):
        raise DubokoError(f"bench mnist compares MY_NET image classifiers; recipe {recipe!r} trains "
                          f"{cfg.model.get('name')!r} for task {cfg.task!r}")
    return cfg


def _side_summary(windows: list[dict], memory: dict, extra: dict | None = None) -> dict[str, Any]:
    images = sum(w["images"] for w in windows)
    seconds = sum(w["seconds"] for w in windows)
    return {
        "images_per_s": round(images / seconds, 2) if seconds else None,
        "images": int(images),
        "seconds": round(seconds, 3),
        "train_loss": round(sum(w["loss_sum"] for w in windows) / images, 4) if images else None,
        "windows": [{"seconds": round(w["seconds"], 4), "images": int(w["images"]),
                     "images_per_s": round(w["images"] / w["seconds"], 2) if w["seconds"] else None} for w in windows],
        "memory": memory,
        **(extra or {}),
    }


def _bar(total: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def run_throughput(
    *,
    pairs: int = 6,
    window: int = 10,
    warmup: int = 2,
    recipe: str = "mnist-cnn",
    overrides: list[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    reference: ReferenceConfig | None = None,
    evaluate: bool = False,
    subprocess: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Same-recipe images/s of the reference and duboko, in `pairs` alternating windows of
    `window` batches each, after `warmup` untimed batches per side."""
    if pairs < 1 or window < 1 or warmup < 0:
        raise DubokoError(f"--pairs and --window must be >= 1 and --warmup >= 0, got {pairs}, {window}, {warmup}")
    from duboko.train.run import pick_device

    dev = pick_device(device)
    cfg = duboko_config(recipe, overrides or [], dev, precision)
    ref_cfg = dataclasses.replace(reference or ReferenceConfig(), device=str(dev))  # both sides on one device
    if ref_cfg.batch_size != cfg.train.batch_size:
        print(f"note: batch sizes differ (reference {ref_cfg.batch_size}, duboko {cfg.train.batch_size}); "
              "images/s still compare", file=sys.stderr)
    start = time.perf_counter()
    hw = common.hardware(dev)
    sides = {}
    try:
        sides["reference"] = common.Side("reference", _ReferenceFactory(ref_cfg), subprocess)
        sides["duboko"] = common.Side("duboko", _EngineFactory(cfg.to_dict(), str(dev)), subprocess)
        if warmup:
            for side in sides.values():
                side.call("run", warmup)
        windows: dict[str, list[dict]] = {"reference": [], "duboko": []}
        bar = _bar(pairs, "bench mnist (pairs)", progress)
        for i in range(pairs):
            order = ("reference", "duboko") if i % 2 == 0 else ("duboko", "reference")
            for name in order:
                windows[name].append(sides[name].call("run", window))
            if bar is not None:
                r = windows["reference"][-1]
                d = windows["duboko"][-1]
                bar.set_postfix(ref=f"{r['images'] / r['seconds']:.0f}/s", duboko=f"{d['images'] / d['seconds']:.0f}/s")
                bar.update(1)
        if bar is not None:
            bar.close()
        accuracy = {}
        if evaluate:
            for name, side in sides.items():
                accuracy[name] = side.call("evaluate")
        memory = {name: side.call("memory") for name, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()
    ratios = common.pair_ratios(windows["reference"], windows["duboko"])
    ref_rate, dub_rate = common.rate(windows["reference"]), common.rate(windows["duboko"])
    result = {
        "benchmark": "mnist",
        "mode": "throughput",
        "hardware": hw,
        "settings": {
            "pairs": pairs, "window_batches": window, "warmup_batches": warmup, "subprocess": subprocess,
            "reference": dataclasses.asdict(ref_cfg),
            "duboko": {"recipe": cfg.recipe, "train": dataclasses.asdict(cfg.train), "data": dataclasses.asdict(cfg.data)},
        },
        "reference": _side_summary(windows["reference"], memory["reference"]),
        "duboko": _side_summary(windows["duboko"], memory["duboko"]),
        "speedup": round(dub_rate / ref_rate, 3) if ref_rate else None,
        "speedup_pairs": common.ratio_summary(ratios),
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    if evaluate:
        for name in ("reference", "duboko"):
            acc = accuracy[name]
            steps = warmup + pairs * window
            result[name]["test_accuracy"] = round(acc["accuracy"], 5)
            result[name]["test_loss"] = round(acc["loss"], 5)
            result[name]["test_after_steps"] = steps
        result["accuracy_gap_pp"] = round((result["duboko"]["test_accuracy"] - result["reference"]["test_accuracy"]) * 100, 3)
    result["hardware"]["load_average_end"] = common.hardware(dev).get("load_average")
    return result


def run_time_to_accuracy(
    target: float,
    *,
    fast_recipe: str = "mnist-cnn-fast",
    overrides: list[str] | None = None,
    window: int = 10,
    reference_every: int = 3,
    reference_epochs: int = 5,
    reference_full: bool = False,
    warmup: int = 2,
    device: str = "auto",
    precision: str = "auto",
    reference: ReferenceConfig | None = None,
    run_to_end: bool = False,
    subprocess: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Time for duboko's fast recipe to reach `target` test accuracy (checked at epoch ends,
    evaluation time reported apart), with the reference's images/s measured in windows
    interleaved through the same run."""
    if not 0.0 < target < 1.0:
        raise DubokoError(f"--time-to-accuracy expects a fraction like 0.992, got {target}")
    if window < 1 or reference_every < 1 or reference_epochs < 1:
        raise DubokoError("--window, --reference-every and --reference-epochs must be >= 1")
    from duboko.train.run import pick_device

    dev = pick_device(device)
    cfg = duboko_config(fast_recipe, overrides or [], dev, precision, fast_switches=False)
    ref_cfg = dataclasses.replace(reference or ReferenceConfig(), device=str(dev))  # both sides on one device
    start = time.perf_counter()
    hw = common.hardware(dev)
    sides: dict[str, common.Side] = {}
    evals: list[dict] = []
    ref_evals: list[dict] = []
    windows: dict[str, list[dict]] = {"reference": [], "duboko": []}
    try:
        sides["reference"] = common.Side("reference", _ReferenceFactory(ref_cfg), subprocess)
        sides["duboko"] = common.Side("duboko", _EngineFactory(cfg.to_dict(), str(dev)), subprocess)
        if reference_full:
            warmup = 0  # every reference step counts towards its measured time
        if warmup:
            sides["reference"].call("run", warmup)
        total_ref_steps = None
        dub_train_s = dub_eval_s = 0.0
        reached = None
        i = 0
        bar = _bar(0, "bench mnist (time to accuracy)", progress)
        duboko_done = False
        ref_steps = warmup
        while True:
            if not duboko_done:
                w = sides["duboko"].call("run", window, True)
                windows["duboko"].append(w)
                dub_train_s += w["seconds"]
                if w["epoch_end"] or w["finished"]:
                    state = sides["duboko"].call("state")
                    ev = sides["duboko"].call("evaluate")
                    dub_eval_s += ev["seconds"]
                    evals.append({"epoch": len(evals) + 1, "step": state["step"], "accuracy": round(ev["accuracy"], 5),
                                  "loss": round(ev["loss"], 5), "train_seconds": round(dub_train_s, 2),
                                  "eval_seconds": round(dub_eval_s, 2)})
                    if not progress:  # a line per evaluation, so a long run shows where it is
                        e = evals[-1]
                        print(f"duboko epoch {e['epoch']}: test accuracy {e['accuracy'] * 100:.2f}% after "
                              f"{e['train_seconds']:.1f}s of training (+{e['eval_seconds']:.1f}s evaluating)",
                              file=sys.stderr, flush=True)
                    if reached is None and ev["accuracy"] >= target:
                        reached = evals[-1]
                    if w["finished"] or (reached is not None and not run_to_end):
                        duboko_done = True
            if i % reference_every == 0 or (reference_full and duboko_done):
                if reference_full and total_ref_steps is None:
                    total_ref_steps = reference_epochs * _steps_per_epoch(sides["reference"], ref_cfg)
                n = window if total_ref_steps is None else min(window, total_ref_steps - ref_steps)
                if n > 0:
                    rw = sides["reference"].call("run", n)
                    windows["reference"].append(rw)
                    ref_steps += n
                    if reference_full and (ref_steps % _steps_per_epoch(sides["reference"], ref_cfg) == 0 or ref_steps >= total_ref_steps):
                        ev = sides["reference"].call("evaluate")
                        ref_evals.append({"epoch": len(ref_evals) + 1, "accuracy": round(ev["accuracy"], 5),
                                          "train_seconds": round(sum(x["seconds"] for x in windows["reference"]), 2)})
            i += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=len(evals), acc=f"{evals[-1]['accuracy'] * 100:.2f}%" if evals else "-")
            ref_done = not reference_full or (total_ref_steps is not None and ref_steps >= total_ref_steps)
            if duboko_done and ref_done:
                break
        if bar is not None:
            bar.close()
        memory = {k: s.call("memory") for k, s in sides.items()}
    finally:
        for s in sides.values():
            s.close()
    ref_rate = common.rate(windows["reference"])
    train_images = _train_images(ref_cfg)
    ref_time_est = reference_epochs * train_images / ref_rate if ref_rate else None
    ref_time = ref_evals[-1]["train_seconds"] if reference_full and ref_evals else ref_time_est
    dub_time = reached["train_seconds"] if reached else None
    result = {
        "benchmark": "mnist",
        "mode": "time_to_accuracy",
        "target_accuracy": target,
        "hardware": hw,
        "settings": {
            "window_batches": window, "reference_every": reference_every, "reference_epochs": reference_epochs,
            "reference_full": reference_full, "subprocess": subprocess,
            "reference": dataclasses.asdict(ref_cfg),
            "duboko": {"recipe": cfg.recipe, "model": cfg.model, "train": dataclasses.asdict(cfg.train),
                       "data": dataclasses.asdict(cfg.data)},
        },
        "duboko": {
            **_side_summary(windows["duboko"], memory["duboko"]),
            "evaluations": evals,
            "reached_target": reached is not None,
            "time_to_accuracy_s": dub_time,
            "time_to_accuracy_with_eval_s": round(reached["train_seconds"] + reached["eval_seconds"], 2) if reached else None,
            "final_test_accuracy": evals[-1]["accuracy"] if evals else None,
        },
        "reference": {
            **_side_summary(windows["reference"], memory["reference"]),
            "epochs": reference_epochs,
            "train_images": train_images,
            "time_s": round(ref_time, 1) if ref_time else None,
            "time_source": ("measured: trained for all epochs in interleaved windows" if reference_full and ref_evals else
                            f"estimated: {reference_epochs} epochs × {train_images} images ÷ the images/s measured in "
                            "this run's interleaved windows"),
            "evaluations": ref_evals,
            "final_test_accuracy": ref_evals[-1]["accuracy"] if ref_evals else None,
        },
        "speedup_time_to_accuracy": round(ref_time / dub_time, 2) if (ref_time and dub_time) else None,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    result["hardware"]["load_average_end"] = common.hardware(dev).get("load_average")
    return result


def _train_images(ref_cfg: ReferenceConfig) -> int:
    return ref_cfg.limit_train or 60000


def _steps_per_epoch(side: common.Side, ref_cfg: ReferenceConfig) -> int:
    return -(-_train_images(ref_cfg) // ref_cfg.batch_size)


# ---------------------------------------------------------------------------------------------
# Reports.


def format_report(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    head = (f"hardware: {hw.get('gpu') or hw['cpu']} | {hw['cpu_cores']} cores, torch {hw['torch']}, "
            f"{hw['torch_threads']} threads, {hw['cpu_capability']}, native bf16 on CPU: {hw['cpu_bf16_native']}"
            + (f", GPU bf16: {hw['gpu_bf16']}" if "gpu_bf16" in hw else "")
            + f" | load average {hw.get('load_average')} -> {hw.get('load_average_end')}")
    ref, dub = result["reference"], result["duboko"]

    def mem(side: dict) -> str:
        m = side["memory"]
        return f"{m.get('gpu_peak_mb', m['rss_peak_mb']):.0f} MB"

    if result["mode"] == "throughput":
        s = result["settings"]["duboko"]["train"]
        rows = [
            ["reference (PIL per sample, fp32 eager)", f"{ref['images_per_s']:.1f}", "1.00", mem(ref)],
            [f"duboko ({result['settings']['duboko']['recipe']}, {s['precision']}"
             f"{', channels-last' if s['channels_last'] else ''}"
             f"{', malloc retained' if s.get('retain_cpu_memory') and hw['device'] == 'cpu' else ''})",
             f"{dub['images_per_s']:.1f}",
             f"{result['speedup']:.2f}", mem(dub)],
        ]
        table = common.format_table(rows, ["pipeline", "images/s", "speed-up", "peak memory"])
        sp = result["speedup_pairs"]
        lines = [head, table,
                 f"pair ratios over {result['settings']['pairs']} pairs of {result['settings']['window_batches']} batches: "
                 f"median {sp['median']:.2f}, geomean {sp['geomean']:.2f}, range {sp['min']:.2f}-{sp['max']:.2f}"]
        if "accuracy_gap_pp" in result:
            lines.append(f"test accuracy after {ref['test_after_steps']} steps each: reference {ref['test_accuracy'] * 100:.2f}%, "
                         f"duboko {dub['test_accuracy'] * 100:.2f}% (gap {result['accuracy_gap_pp']:+.2f} pp)")
        lines.append(f"wall {result['wall_seconds']:.1f}s")
        return "\n".join(lines)
    rows = []
    for ev in dub["evaluations"]:
        rows.append([f"duboko epoch {ev['epoch']}", f"{ev['accuracy'] * 100:.2f}%", f"{ev['train_seconds']:.1f}",
                     f"{ev['train_seconds'] + ev['eval_seconds']:.1f}"])
    for ev in ref["evaluations"]:
        rows.append([f"reference epoch {ev['epoch']}", f"{ev['accuracy'] * 100:.2f}%", f"{ev['train_seconds']:.1f}", "-"])
    table = common.format_table(rows, ["run", "test accuracy", "train s", "train+eval s"])
    tta = dub["time_to_accuracy_s"]
    lines = [
        head, table,
        f"images/s: reference {ref['images_per_s']:.1f} (interleaved windows), duboko {dub['images_per_s']:.1f}; "
        f"peak memory reference {mem(ref)}, duboko {mem(dub)}",
        f"duboko {result['settings']['duboko']['recipe']}: "
        + (f"reached {result['target_accuracy'] * 100:.2f}% in {tta:.1f}s of training" if tta is not None
           else f"did NOT reach {result['target_accuracy'] * 100:.2f}% (final {dub['final_test_accuracy'] * 100:.2f}%)"),
        f"reference {ref['epochs']} epochs: {ref['time_s']:.0f}s ({ref['time_source']})" if ref["time_s"] else "reference: no time",
    ]
    if result["speedup_time_to_accuracy"]:
        lines.append(f"time-to-accuracy speed-up: {result['speedup_time_to_accuracy']:.2f}x")
    lines.append(f"wall {result['wall_seconds']:.1f}s")
    return "\n".join(lines)


def plot_windows(result: dict[str, Any], path: str) -> None:
    """Images/s of every window, both sides, in run order: drift shows as both lines moving."""
    from duboko.evaluate.plots import figure

    with figure(path, size=(7, 3.5), dpi=110) as (_, axes):
        ax = axes[0][0]
        for name, color in (("reference", "tab:gray"), ("duboko", "tab:blue")):
            rates = [w["images_per_s"] for w in result[name]["windows"]]
            ax.plot(range(1, len(rates) + 1), rates, "o-", color=color, label=f"{name} ({result[name]['images_per_s']:.0f}/s)")
        ax.set_xlabel("window")
        ax.set_ylabel("images/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"bench mnist ({result['mode']}) on {result['hardware'].get('gpu') or result['hardware']['cpu']}")
        ax.legend()
