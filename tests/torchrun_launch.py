"""Launching tests/torchrun_worker.py: one process, or N ranks under torchrun (gloo, CPU).

Shared by tests/test_train_fsdp.py, test_train_elastic.py and test_train_accum.py. Every process
runs with one thread, so float summation orders are fixed and the runs are repeatable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("torchrun_worker.py")

# A GPT small enough for seconds: 2 blocks × 32 wide, 2 heads, context 16, on characters of the
# bundled Shakespeare. 2065 training tokens make 128 windows of 16, i.e. 8 steps of batch 16.
TINY_GPT = [
    "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "data.seq_len=16",
    "data.max_train_tokens=2065", "data.max_eval_tokens=600", "data.sample_tokens=0", "train.report=false",
    "train.num_threads=1", "train.max_steps=0", "train.epochs=1", "train.warmup_steps=2", "train.batch_size=16",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(ranks: int, record: Path, out: Path, args: list[str], resume: bool = False, timeout: int = 300) -> list[dict]:
    """Train (or resume) the run folder `out` on `ranks` processes; returns each rank's record
    (rows seen, micro-batch losses), rank order."""
    worker = [str(WORKER), str(record), str(out), *(["--resume"] if resume else []), *args]
    if ranks == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *worker]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return [json.loads(Path(f"{record}.rank{r}.json").read_text()) for r in range(ranks)]


def global_losses(records: list[dict]) -> list[float]:
    """Per micro-batch loss of the global batch: the mean of the ranks' losses (equal shares)."""
    n = len(records)
    return [sum(r["losses"][i] for r in records) / n for i in range(len(records[0]["losses"]))]
