"""MY_NET training step with the primer's op order against duboko's (ReLU after max-pool, in place).

Both sides: channels-last, fused Adam, glibc malloc retained, random 48×48 batches of 64, 2 torch
threads; 12 alternating windows of 4 steps each after 2 warm-up steps. Prints the median
images/s of each side and the median of the per-pair ratios (pairs run back to back).

    flock /tmp/duboko-cpu.lock .venv/bin/python docs/experiments/op_order.py
"""

import statistics
import time

import torch
import torch.nn.functional as F

from duboko.bench.reference import PrimerNet
from duboko.models.cnn import MyNet, MyNetConfig
from duboko.train.runtime import retain_freed_memory
from page_faults import make_step  # same folder


class PrimerOrder(PrimerNet):
    """The primer's forward, with flatten instead of view (view fails on channels-last)."""

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool1(F.relu(self.conv2(x)))
        x = self.pool2(F.relu(self.conv3(x)))
        return self.fc2(self.dropout(F.relu(self.fc1(torch.flatten(x, 1)))))


def main() -> None:
    torch.set_num_threads(2)
    retain_freed_memory()
    steps = {"primer order": make_step(PrimerOrder), "duboko order": make_step(lambda: MyNet(MyNetConfig()))}
    rates = {k: [] for k in steps}
    for rep in range(12):
        order = list(steps.items()) if rep % 2 == 0 else list(reversed(steps.items()))
        for name, step in order:
            t = time.perf_counter()
            for _ in range(4):
                step()
            rates[name].append(64 * 4 / (time.perf_counter() - t))
    for name, r in rates.items():
        print(f"{name}: median {statistics.median(r):.1f} images/s  windows {[round(v) for v in r]}")
    ratios = [d / p for d, p in zip(rates["duboko order"], rates["primer order"])]
    print(f"duboko / primer per pair: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
