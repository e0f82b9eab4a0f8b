"""DDP under torchrun on CPU (gloo): 2 ranks end bit-identical and match a 1-process run.

The image-classification task gives every world size the same global batch (each rank takes every
2nd sample of it) and the same augmentation (a pure function of seed, epoch and batch index), and
DDP averages the gradients of the two half-batches, which equals the gradient of the whole batch.
So a 2-rank run and a 1-process run with the same global batch differ only by floating-point
summation order. Tolerances (measured differences in the comment):
  train/val loss: 1e-4 relative        (measured ~1e-7)
  accuracy:       at most 1 sample      (measured 0)
  weights:        1e-4 absolute         (measured 6.6e-6 after 4 Adam steps of lr 1e-3)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from duboko.cli.main import main
from duboko.io import load_tensors
from duboko.train.run import read_history

SMALL = [
    "--set", "data.image_size=16", "--set", "model.image_size=16", "--set", "data.limit_train=256",
    "--set", "data.limit_test=200", "--set", "train.num_threads=1", "--set", "epochs=1",
    "--set", "model.dropout=0", "--set", "batch_size=64",
    # fp32: the recipe's precision "auto" is bf16 on a native-bf16 CPU, whose rounding differs
    # between one process and two ranks by more than the 1e-4 this test holds fp32 to
    "--set", "train.precision=fp32",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "duboko", "train", "mnist-cnn", "--out", str(ddp), "--quiet", *SMALL]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert main(["train", "mnist-cnn", "--out", str(one), "--quiet", *SMALL]) == 0

    m2 = json.loads((ddp / "metrics.json").read_text())
    m1 = json.loads((one / "metrics.json").read_text())
    # Both ranks hold bit-identical weights (SHA-256 all-gathered inside the engine).
    assert m2["world_size"] == 2 and m2["ranks_in_sync"] is True
    assert m1["world_size"] == 1 and "ranks_in_sync" not in m1
    # Same global batch, so the same number of optimizer steps covering the same data.
    assert m2["global_batch_size"] == m1["global_batch_size"] == 64
    assert m2["steps"] == m1["steps"] == 4

    h2, h1 = read_history(ddp)[-1], read_history(one)[-1]
    for key in ("train_loss", "val_loss"):
        assert h2[key] == pytest.approx(h1[key], rel=1e-4), key
    assert abs(h2["train_accuracy"] - h1["train_accuracy"]) <= 1 / 256 + 1e-9
    assert abs(m2["test_accuracy"] - m1["test_accuracy"]) <= 1 / 200 + 1e-9
    assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-4)

    w2, w1 = load_tensors(ddp / "model.safetensors"), load_tensors(one / "model.safetensors")
    assert w2.keys() == w1.keys()
    diff = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    assert diff < 1e-4, diff
    # ... and training really moved the weights away from the seeded initialisation.
    from duboko import registry
    from duboko.train.engine import seed_everything

    seed_everything(0)
    init = registry.create_model("my_net", image_size=16, dropout=0.0).state_dict()
    assert max((w1[k] - init[k]).abs().max().item() for k in w1) > 1e-3


def test_rank_shards_partition_every_global_batch():
    """Without torchrun: the 2 ranks' batches are disjoint, together they are exactly the
    1-process batch (same samples, same augmentation), and the epoch is covered once."""
    from duboko import config as C
    from duboko.tasks.image_classification import ImageClassificationTask

    cfg = C.resolve("mnist-cnn", ["data.image_size=16", "model.image_size=16", "data.limit_train=200",
                                  "data.limit_test=10", "batch_size=64", "seed=3"])
    cpu = torch.device("cpu")
    tasks = [ImageClassificationTask(cfg, cpu, rank, world) for rank, world in ((0, 1), (0, 2), (1, 2))]
    for task in tasks:
        task.setup()
    full, r0, r1 = tasks
    assert full.num_train_batches() == r0.num_train_batches() == r1.num_train_batches() == 4  # ceil(200 / 64)
    for epoch in (0, 1):
        seen = 0
        for (xf, yf), (x0, y0), (x1, y1) in zip(full.train_batches(epoch), r0.train_batches(epoch), r1.train_batches(epoch)):
            assert torch.equal(x0, xf[0::2]) and torch.equal(x1, xf[1::2])
            assert torch.equal(y0, yf[0::2]) and torch.equal(y1, yf[1::2])
            seen += len(y0) + len(y1)
        assert seen == 200
        # Resuming mid-epoch gives the same remaining batches (no replay, no skip).
        rest = list(r1.train_batches(epoch, start=2))
        assert len(rest) == 2 and torch.equal(rest[0][0], list(r1.train_batches(epoch))[2][0])
