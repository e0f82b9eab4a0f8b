"""Process-wide settings the engine owns: CPU threads, the CPU memory allocator, CUDA math modes.

Both `engine.fit` and the benchmarks' engine side call `configure`, so a benchmark measures the
same process a `duboko train` runs in. Models never touch these (they are plain `nn.Module`s).
"""

from __future__ import annotations

import ctypes
import platform

import torch

from duboko.config import TrainConfig

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_retaining = False


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    Why: glibc serves large blocks (above a threshold that tops out at 32 MiB) with their own
    `mmap` and unmaps them on `free`, and trims the heap's free top back to the OS. A CPU training
    step allocates and frees the same large activations and gradients every time (MY_NET at batch
    64: 38 MB per 64×64×48×48 activation), so every step maps fresh pages and pays a page fault and
    a zero-fill per 4 KiB page. With mmap off and trimming off, freed blocks are reused as they are.
    Measured on the 2-core development VM: ~1.3× on MY_NET's training step (docs/benchmarks.md).
    PyTorch's CPU performance guide gets the same effect by preloading jemalloc or tcmalloc.

    The cost: the process keeps its peak heap for its lifetime (what a GPU caching allocator does).
    Returns whether the setting is in force (False off glibc, e.g. macOS, Windows, musl).
    """
    global _retaining
    if _retaining:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1 and ok
    except (OSError, AttributeError):
        return False
    _retaining = ok
    return ok


def configure(tcfg: TrainConfig, device: torch.device) -> dict[str, object]:
    """Apply `tcfg`'s process settings for training on `device`; returns what was applied."""
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    applied: dict[str, object] = {"torch_threads": torch.get_num_threads()}
    if device.type == "cpu" and tcfg.retain_cpu_memory:
        applied["retain_cpu_memory"] = retain_freed_memory()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return applied
