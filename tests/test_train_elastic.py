"""Elastic resume: a run saved on N ranks resumes on M (DDP and FSDP), with no sample skipped or
seen twice, and the same trajectory as an uninterrupted 1-process run to float tolerance.

Why it holds: the checkpoint keeps whole tensors (FSDP shards are gathered to rank 0 for the
save, and each rank of the resumed run keeps its own shard of them), the running epoch sums as
all ranks' totals, and the position inside the epoch in global samples; the task's global
batches do not depend on the world size (each rank takes every W-th row of one). Bit-exactness is
only promised for the same N; here the summation order changes at the switch. Tolerances
(measured: tiny GPT, 8 AdamW steps of batch 16, switch after step 3, CPU, one thread per rank):
  final weights:              1e-4 absolute (measured 1.7e-6 for 2 -> 1, 4.4e-7 for 1 -> 2)
  epoch train loss, val loss: 1e-4 relative (measured: equal to history.csv's 6 digits; val 2.7e-8)
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from duboko.io import load_tensors
from duboko.train import checkpoint as ckpt
from duboko.train.run import read_history
from torchrun_launch import TINY_GPT, launch

pytestmark = pytest.mark.slow
SWITCH = 3  # optimizer steps before the switch (of 8 in the epoch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-process run: its rows (128 windows of 16 tokens, the whole epoch)."""
    tmp = tmp_path_factory.mktemp("reference")
    (record,) = launch(1, tmp / "rec", tmp / "run", TINY_GPT)
    return tmp / "run", record


@pytest.mark.parametrize("strategy,before,after", [("fsdp", 2, 1), ("fsdp", 1, 2), ("ddp", 1, 2)])
def test_resume_on_another_world_size(tmp_path, reference, strategy, before, after):
    ref_run, ref = reference
    run = tmp_path / "run"
    args = TINY_GPT + [f"train.strategy={strategy}"]
    first = launch(before, tmp_path / "first", run, args + [f"train.max_steps={SWITCH}"])
    saved, meta = ckpt.load_state(run, torch.device("cpu"))
    assert (meta["step"], meta["world_size"], meta["samples"]) == (SWITCH, before, SWITCH * 16)
    second = launch(after, tmp_path / "second", run, ["train.max_steps=0"], resume=True)

    # Every window of the epoch seen exactly once across the switch: the rows of the first ranks'
    # batches before it and the new ranks' after it are, as a multiset, the reference's epoch.
    before_rows = [tuple(row) for r in first for row in r["seen"]]
    after_rows = [tuple(row) for r in second for row in r["seen"]]
    assert len(before_rows) == SWITCH * 16 and len(after_rows) == (8 - SWITCH) * 16
    assert Counter(before_rows + after_rows) == Counter(tuple(row) for row in ref["seen"])
    assert len(ref["seen"]) == 128

    metrics = json.loads((run / "metrics.json").read_text())
    ref_metrics = json.loads((ref_run / "metrics.json").read_text())
    assert metrics["world_size"] == after and metrics["steps"] == ref_metrics["steps"] == 8
    assert metrics["val_loss"] == pytest.approx(ref_metrics["val_loss"], rel=1e-4)
    # The epoch's running loss continues across the switch (all ranks' sums, counted once).
    history, (ref_row,) = read_history(run), read_history(ref_run)
    assert [r["epoch"] for r in history] == [SWITCH / 8, 1]  # the stop's partial row, then the epoch
    row = history[-1]
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-4)
    assert row["train_accuracy"] == pytest.approx(ref_row["train_accuracy"], abs=1e-6)
    w, w_ref = load_tensors(run / "model.safetensors"), load_tensors(ref_run / "model.safetensors")
    assert w.keys() == w_ref.keys()
    diff = max((w[k] - w_ref[k]).abs().max().item() for k in w)
    assert diff < 1e-4, diff
    # ... and the run really trained after the switch (the weights moved from the checkpoint's).
    assert max((w[k] - saved[f"model/{k}"]).abs().max().item() for k in w) > 1e-3
