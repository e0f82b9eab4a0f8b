"""Minor page faults, system CPU time and wall time per MY_NET training step (batch 64,
channels-last, fused Adam), with glibc's default malloc or with freed memory retained
(`duboko.train.runtime.retain_freed_memory`). Run each mode in its own process:

    flock /tmp/duboko-cpu.lock .venv/bin/python docs/experiments/page_faults.py default
    flock /tmp/duboko-cpu.lock .venv/bin/python docs/experiments/page_faults.py retain
"""

import resource
import sys
import time

import torch
import torch.nn.functional as F

from duboko.models.cnn import MyNet, MyNetConfig
from duboko.train.runtime import retain_freed_memory


def make_step(build, warmup: int = 2):
    """A training step of the model `build()` makes: channels-last, fused Adam, one fixed random
    batch of 64 (48×48 RGB); run `warmup` times before it is returned."""
    torch.manual_seed(0)
    model = build().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    return step


def main(mode: str) -> None:
    if mode not in ("default", "retain"):
        raise SystemExit(f"mode must be 'default' or 'retain', got {mode!r}")
    torch.set_num_threads(2)
    if mode == "retain" and not retain_freed_memory():
        raise SystemExit("retaining freed memory needs glibc on Linux")
    step = make_step(lambda: MyNet(MyNetConfig()), warmup=3)
    n = 10
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        step()
    seconds, after = (time.perf_counter() - start) / n, resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / n
    print(f"{mode}: {faults:,.0f} minor page faults per step ({faults * 4096 / 1e6:.0f} MB of fresh pages), "
          f"system CPU {(after.ru_stime - before.ru_stime) / n * 1000:.0f} ms, {seconds * 1000:.0f} ms per step, "
          f"{64 / seconds:.1f} images/s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "retain")
