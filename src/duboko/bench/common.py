"""Shared benchmark machinery: the hardware record, peak memory, duboko's engine step in windows,
and side-by-side runs of two trainers in worker processes, pair by pair.

Why pairs: on a shared machine the speed of the cores drifts from second to second (other jobs,
turbo, thermal limits). Timing side A for a while and then side B lets that drift land on one side
only. Here each side trains in short windows of N steps, the windows alternate A, B, B, A, A, B, ...
and each pair's ratio is taken from two windows that ran back to back, so slow patches of the
machine hit both sides of a ratio alike.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from duboko.precision import best_precision, cpu_bf16_native  # noqa: F401 (re-exported)
from duboko.errors import DubokoError

# ---------------------------------------------------------------------------------------------
# Hardware and memory.


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")(),
        "cpu_bf16_native": cpu_bf16_native(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                     "gpu_bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda})
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and of its finished children, e.g. DataLoader
    workers), and peak GPU memory allocated on CUDA."""
    kb = 1024.0  # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1.0 / (kb * kb) if sys.platform == "darwin" else 1.0 / kb
    out = {
        "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
        "children_rss_peak_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1),
    }
    if device.type == "cuda":
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# duboko's side: the engine's training step, steppable in windows.


class EngineTrainer:
    """`duboko train`'s own `Trainer`, without a run folder, stepped in windows of N steps so a
    benchmark can time them between the reference's windows. Each timed step is
    `Trainer.step` — the code `duboko train` runs — on the task's own batches; run folders,
    checkpoints and TensorBoard are left out (they happen once per epoch in `fit`, not per step)."""

    name = "duboko"

    def __init__(self, cfg, device: str = "auto"):
        from duboko.train.engine import Trainer

        self.cfg = cfg
        self.trainer = Trainer(cfg, None, quiet=True, device=None if device == "auto" else device)
        self.device = self.trainer.device
        self.task = self.trainer.task
        self.model = self.trainer.model
        self.steps_per_epoch = self.trainer.steps_per_epoch
        self.total_steps = self.trainer.total_steps
        self.epoch = 0
        self.batch_in_epoch = 0
        self._it = None

    @property
    def step(self) -> int:
        return self.trainer.state.step

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def _next_batch(self):
        if self.batch_in_epoch >= self.steps_per_epoch:  # the epoch's generator is spent
            self._it = None
            self.epoch += 1
            self.batch_in_epoch = 0
        if self._it is None:
            self._it = iter(self.task.train_batches(self.epoch, 0))
        self.batch_in_epoch += 1
        return next(self._it)

    def run(self, n_batches: int, stop_at_epoch_end: bool = False) -> dict[str, float]:
        """Train up to `n_batches` steps (fewer when the schedule ends, or at an epoch's end when
        `stop_at_epoch_end`); data preparation is included in the time."""
        self.model.train()
        sums: dict[str, torch.Tensor | float] = {}
        n = 0
        sync(self.device)
        start = time.perf_counter()
        for _ in range(n_batches):
            if self.finished:
                break
            if stop_at_epoch_end and n and self.batch_in_epoch >= self.steps_per_epoch:
                break
            out = self.trainer.step(self._next_batch())
            n += 1
            if out is None:  # a skipped non-finite step (train.nonfinite = skip)
                continue
            for k, v in out.stats.items():
                v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                sums[k] = sums[k] + v if k in sums else v
        totals = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in sums.items()}
        sync(self.device)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "steps": n, "images": totals.get("count", 0.0),
                "loss_sum": totals.get("loss_sum", 0.0), "correct": totals.get("accuracy", 0.0),
                "epoch_end": self.batch_in_epoch >= self.steps_per_epoch, "finished": self.finished}

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """The task's own evaluation (EMA weights when EMA is on, as `fit` reports)."""
        sync(self.device)
        start = time.perf_counter()
        metrics = self.trainer.evaluate(split)
        sync(self.device)
        images = len(self.task.splits[split][0]) if hasattr(self.task, "splits") else 0
        return {**metrics, "seconds": time.perf_counter() - start, "images": images}


# ---------------------------------------------------------------------------------------------
# Worker processes: each side lives in its own process, so its peak memory is its own and
# neither side's allocator or thread pool state leaks into the other's timings.


def _worker(conn, factory: Callable[[], Any]) -> None:
    try:
        trainer = factory()
        conn.send(("ready", {"device": str(getattr(trainer, "device", "cpu"))}))
        while True:
            cmd, args = conn.recv()
            if cmd == "stop":
                break
            try:
                if cmd == "run":
                    result = trainer.run(*args)
                elif cmd == "evaluate":
                    result = trainer.evaluate()
                elif cmd == "memory":
                    result = peak_memory_mb(getattr(trainer, "device", torch.device("cpu")))
                elif cmd == "state":
                    result = {k: getattr(trainer, k, None) for k in ("step", "epoch", "steps", "images_seen", "finished")}
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", result))
            except DubokoError as exc:
                conn.send(("user_error", str(exc)))
            except Exception:  # noqa: BLE001 - passed back to the parent with its traceback
                conn.send(("error", traceback.format_exc()))
    except DubokoError as exc:
        conn.send(("user_error", str(exc)))
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Side:
    """One side of a benchmark: a trainer, in a worker process or (for tests) in this process."""

    def __init__(self, name: str, factory: Callable[[], Any], subprocess: bool = True):
        self.name = name
        self.subprocess = subprocess
        if subprocess:
            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_worker, args=(child, factory), daemon=True)
            self.proc.start()
            child.close()
            self._answer()
        else:
            self.trainer = factory()

    def _answer(self):
        try:
            status, payload = self.conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"the {self.name} benchmark worker died (exit code {self.proc.exitcode})") from exc
        if status == "user_error":
            raise DubokoError(payload)
        if status == "error":
            raise RuntimeError(f"the {self.name} benchmark worker failed:\n{payload}")
        return payload

    def call(self, cmd: str, *args):
        if not self.subprocess:
            if cmd == "run":
                return self.trainer.run(*args)
            if cmd == "evaluate":
                return self.trainer.evaluate()
            if cmd == "memory":
                return peak_memory_mb(getattr(self.trainer, "device", torch.device("cpu")))
            if cmd == "state":
                return {k: getattr(self.trainer, k, None) for k in ("step", "epoch", "steps", "images_seen", "finished")}
            raise ValueError(cmd)
        self.conn.send((cmd, args))
        return self._answer()

    def close(self) -> None:
        if self.subprocess:
            try:
                self.conn.send(("stop", ()))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Summaries.


def rate(windows: list[dict], key: str = "images") -> float:
    seconds = sum(w["seconds"] for w in windows)
    return sum(w[key] for w in windows) / seconds if seconds > 0 else float("nan")


def pair_ratios(a: list[dict], b: list[dict], key: str = "images") -> list[float]:
    """Per-pair speed ratio b/a (items per second), pairing the i-th windows of each side."""
    out = []
    for wa, wb in zip(a, b):
        if wa["seconds"] > 0 and wb["seconds"] > 0 and wa[key] > 0:
            out.append((wb[key] / wb["seconds"]) / (wa[key] / wa["seconds"]))
    return out


def ratio_summary(ratios: list[float]) -> dict[str, float]:
    if not ratios:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "geomean": float("nan")}
    return {
        "median": round(statistics.median(ratios), 3),
        "geomean": round(math.exp(sum(math.log(r) for r in ratios) / len(ratios)), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
