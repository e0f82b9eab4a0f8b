"""Numeric precision of training: which autocast to use, and what "auto" means on this hardware.

bf16 autocast keeps float32 master weights and runs matmuls/convolutions in bfloat16. It pays only
where the hardware computes bf16 natively (CUDA GPUs with bf16, CPUs with AVX-512 BF16 or AMX);
elsewhere oneDNN emulates it and it is several times slower than float32 (measured ~10x for MY_NET
on the 2-core AVX2 development machine, docs/benchmarks.md). So "auto" picks bf16 only there.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from duboko.errors import DubokoError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_bf16_native() -> bool:
    """True when oneDNN has native bfloat16 kernels on this CPU (AVX-512 BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def best_precision(device: torch.device) -> str:
    """bf16 where the hardware computes it natively, else fp32 (emulated bf16 is a slow-down)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_native() else "fp32"
    return "fp32"


def hardware_features(device: torch.device) -> str:
    """One line on what the precision choice rests on, for `duboko train`'s banner, e.g.
    "CPU AVX512, native bf16: yes" or "GPU NVIDIA H200, bf16: yes"."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}, bf16: {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    if device.type == "cpu":
        return f"CPU {capability}, native bf16: {'yes' if cpu_bf16_native() else 'no'}"
    return f"{device.type}, CPU {capability}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run really uses: `auto` resolved for `device`, others checked."""
    if precision == "auto":
        return best_precision(device)
    if precision not in PRECISIONS:
        raise DubokoError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise DubokoError(f"train.precision 'fp16' needs a CUDA GPU (device is {device}); use bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type != "cuda":
        raise DubokoError(f"train.precision 'fp16' needs a CUDA GPU (device is {device}); use bf16 or fp32")
    return torch.autocast("cuda", dtype=torch.float16)
