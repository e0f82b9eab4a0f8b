"""`duboko bench inference RUN`: eager PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

For each engine: batch-1 latency (median and 95th percentile over `repeats` calls, after warm-up
calls), batch-64 throughput (images/s or tokens/s) and, for image classifiers, the test accuracy
over the run's test split (measured, not assumed: int8 changes numbers). For language models the
quality column is the top-1 agreement with eager fp32 on the real-text parity inputs.

The graphs are exported (and parity-checked) into a temporary folder; int8 is ONNX Runtime's
dynamic quantisation of that fp32 graph. Every engine gets the same number of threads (torch's).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from duboko.errors import DubokoError
from duboko.export.onnx import (
    setup_for_export,
    export_loaded,
    graph_spec,
    require_onnx,
    run_session,
    session,
)
from duboko.export.quantize import quantize_int8_bytes
from duboko.train.run import load_run

THROUGHPUT_BATCH = 64


def _time_calls(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


@torch.no_grad()
def run_inference_bench(run_dir: str | Path, repeats: int = 50, warmup: int = 5, limit_test: int = 0) -> dict[str, Any]:
    """The JSON record of the benchmark (see the module docstring)."""
    require_onnx()
    if repeats < 1 or warmup < 0 or limit_test < 0:
        raise DubokoError(f"repeats must be >= 1 and warmup, limit_test >= 0; got {repeats}, {warmup}, {limit_test}")
    loaded = load_run(run_dir, device="cpu", setup_task=False)
    setup_for_export(loaded)
    spec = graph_spec(loaded)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="duboko-bench-") as tmp:
        report = export_loaded(loaded, Path(tmp) / "fp32.onnx")
        fp32_bytes = (Path(tmp) / "fp32.onnx").read_bytes()
    int8_bytes = quantize_int8_bytes(fp32_bytes)
    sessions = {"ort_fp32": session(fp32_bytes, threads), "ort_int8": session(int8_bytes, threads)}

    channels_last = loaded.config.train.channels_last and spec.family == "image-classifier"
    if channels_last:
        # As the engine runs it (train.channels_last): weights and inputs both NHWC. Measured: a
        # mix of layouts is the slowest case (oneDNN reorders every call).
        spec.module.to(memory_format=torch.channels_last)

    def eager(*x: torch.Tensor) -> torch.Tensor:
        if channels_last:  # the layout the task's own eval path feeds (and the weights are tuned for)
            x = (x[0].contiguous(memory_format=torch.channels_last),)
        out = spec.module(*x)
        return out[0] if isinstance(out, tuple) else out

    engines: dict[str, Callable[..., torch.Tensor]] = {"eager_fp32": eager}
    for name, sess in sessions.items():
        engines[name] = _ort_call(sess, spec.input_names)

    t = spec.seq_lens[-1]
    one = spec.make_inputs(1, t, True)
    many = spec.make_inputs(THROUGHPUT_BATCH, t, True)
    per_item = max(t, 1)  # tokens per sequence, 1 per image
    unit = "tokens/s" if t else "images/s"
    rows: dict[str, dict[str, Any]] = {}
    reference = eager(*many).argmax(-1)
    for name, fn in engines.items():
        lat = _time_calls(lambda: fn(*one), repeats, warmup)
        thr = _time_calls(lambda: fn(*many), max(3, repeats // 10), max(1, warmup // 2))
        row = {
            "latency_ms_median": 1000 * statistics.median(lat),
            "latency_ms_p95": 1000 * _p95(lat),
            "throughput": THROUGHPUT_BATCH * per_item / statistics.median(thr),
            "agreement_with_eager": float((fn(*many).argmax(-1) == reference).double().mean()),
        }
        if loaded.config.task == "image-classification":
            row["test_accuracy"] = _test_accuracy(loaded, fn, limit_test)
        rows[name] = row
    return {
        "run": str(run_dir), "recipe": loaded.config.recipe, "model": loaded.config.model["name"],
        "family": spec.family, "threads": threads, "throughput_unit": unit, "throughput_batch": THROUGHPUT_BATCH,
        "seq_len": t or None, "repeats": repeats, "parity_max_abs_error": report.max_abs_error,
        "onnx_bytes": {"fp32": len(fp32_bytes), "int8": len(int8_bytes)}, "engines": rows,
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
    }


def _ort_call(sess: Any, names: list[str]) -> Callable[..., torch.Tensor]:
    return lambda *x: run_session(sess, names, x)[0]  # the first output: logits


def _test_accuracy(loaded: Any, fn: Callable[..., torch.Tensor], limit: int) -> float:
    """Top-1 accuracy over the test split, through the task's own preprocessing."""
    images, labels = loaded.task.splits["test"]
    if limit:
        images, labels = images[:limit], labels[:limit]
    correct = 0
    for i in range(0, len(images), 256):
        x = loaded.task.eval_inputs(images[i : i + 256]).float().contiguous()  # (b, C, S, S)
        correct += int((fn(x).argmax(-1) == labels[i : i + 256]).sum())
    return correct / max(1, len(images))


def format_report(result: dict[str, Any]) -> str:
    unit = result["throughput_unit"]
    lines = [f"{result['recipe']} ({result['model']}, {result['family']}), {result['threads']} threads; "
             f"ONNX parity max abs error {result['parity_max_abs_error']:.3g}; "
             f"fp32 {result['onnx_bytes']['fp32'] / 1e6:.2f} MB, int8 {result['onnx_bytes']['int8'] / 1e6:.2f} MB",
             f"{'engine':<11} {'b1 median ms':>12} {'b1 p95 ms':>10} {'b64 ' + unit:>16} {'test acc':>9} {'agree':>7}"]
    for name, r in result["engines"].items():
        acc = f"{r['test_accuracy'] * 100:.2f}%" if "test_accuracy" in r else "-"
        lines.append(f"{name:<11} {r['latency_ms_median']:>12.3f} {r['latency_ms_p95']:>10.3f} {r['throughput']:>16.1f} "
                     f"{acc:>9} {r['agreement_with_eager'] * 100:>6.2f}%")
    return "\n".join(lines)
