"""Gradient accumulation (`train.grad_accum_steps`): 4 micro-batches of 32 make the same update
as one batch of 128, in one process and on 2 ranks (DDP `no_sync`, FSDP
`set_requires_gradient_sync(False)` on all but the last micro-batch).

`train.batch_size` stays the batch of one optimizer step; the task serves micro-batches of
batch_size / grad_accum_steps, whose 4 consecutive ones are exactly the rows of the big batch
(rows i·32 .. i·32+31 of the epoch's window order), and each micro-batch's mean loss is scaled by
1/4, so the accumulated gradient is the big batch's mean gradient. The LR schedule (cosine with
warm-up here) counts optimizer steps. Tolerances (measured, 3 AdamW steps, CPU, one thread):
  weights:     1e-5 absolute in one process, 1e-4 on 2 ranks (measured 8.4e-7; 1.7e-6 DDP and FSDP)
  epoch loss:  1e-5 relative (mean of the 12 micro-batch losses against the big batch's epoch loss;
               measured 5.8e-7 on 2 ranks)
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from duboko import config as C
from duboko.errors import DubokoError
from duboko.io import load_tensors
from duboko.train.engine import Trainer, fit
from duboko.train.run import read_history
from torchrun_launch import TINY_GPT, global_losses, launch

# 6161 tokens: 384 windows of 16, i.e. 3 optimizer steps of 128 (12 micro-batches of 32).
BIG = [a for a in TINY_GPT if not a.startswith(("data.max_train_tokens", "train.batch_size"))] + [
    "data.max_train_tokens=6161", "train.batch_size=128", "train.warmup_steps=1"]


def _weights_diff(a, b) -> float:
    wa, wb = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def big_batch(tmp_path_factory):
    """One process, batch 128, no accumulation: the reference."""
    out = tmp_path_factory.mktemp("big") / "run"
    fit(C.resolve("shakespeare-gpt", BIG), out, quiet=True)
    return out


def test_four_micro_batches_equal_one_big_batch_in_one_process(tmp_path, big_batch):
    out = tmp_path / "accum"
    stream = io.StringIO()
    metrics = fit(C.resolve("shakespeare-gpt", BIG + ["train.grad_accum_steps=4"]), out, stream=stream)
    assert "effective batch 128 = 4 micro-batches of 32" in stream.getvalue()
    ref = json.loads((big_batch / "metrics.json").read_text())
    assert metrics["steps"] == ref["steps"] == 3
    assert metrics["grad_accum_steps"] == 4 and metrics["micro_batch_size"] == 32 and metrics["global_batch_size"] == 128
    (row,), (ref_row,) = read_history(out), read_history(big_batch)
    assert row["lr"] == ref_row["lr"]  # the schedule counted 3 optimizer steps, not 12 micro-batches
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    diff = _weights_diff(out, big_batch)
    assert diff < 1e-5, diff


def test_accumulated_gradient_is_the_big_batch_gradient():
    """One step without the optimizer's normalisation: SGD, lr 1, from the same weights, so the
    weight change is exactly minus the gradient (no Adam to hide a factor of 4)."""
    sgd = ["train.optimizer=sgd", "train.momentum=0", "train.lr=1.0", "train.schedule=constant", "train.max_steps=1"]
    deltas = []
    for accum in (1, 4):
        trainer = Trainer(C.resolve("shakespeare-gpt", BIG + sgd + [f"train.grad_accum_steps={accum}"]), None, quiet=True)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        batches = list(trainer.train_batches())[:accum]
        trainer.step(*batches)
        assert (trainer.state.step, trainer.state.batch) == (1, accum)
        deltas.append({k: trainer.model.state_dict()[k] - before[k] for k in before})
    big, small = deltas
    assert max((big[k] - small[k]).abs().max().item() for k in big) < 1e-6
    assert max(v.abs().max().item() for v in big.values()) > 1e-3  # a real gradient


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_on_two_ranks_equals_one_big_batch(tmp_path, big_batch, strategy):
    ranks = launch(2, tmp_path / "rec", tmp_path / "run", BIG + ["train.grad_accum_steps=4", f"train.strategy={strategy}"])
    losses = global_losses(ranks)  # 12 micro-batches of 32 (16 rows per rank)
    assert len(losses) == 12
    ref_history = read_history(big_batch)[0]
    # The epoch's mean of the micro-batch losses is the big-batch run's epoch loss.
    assert sum(losses) / 12 == pytest.approx(ref_history["train_loss"], rel=1e-5)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["world_size"] == 2 and metrics["strategy"] == strategy
    diff = _weights_diff(tmp_path / "run", big_batch)
    assert diff < 1e-4, diff


def test_grad_accum_steps_is_checked():
    with pytest.raises(DubokoError, match=r"train.batch_size=100 must be divisible by train.grad_accum_steps=3"):
        C.resolve("shakespeare-gpt", ["train.batch_size=100", "train.grad_accum_steps=3"])
    with pytest.raises(DubokoError, match="grad_accum_steps"):
        C.resolve("shakespeare-gpt", ["train.grad_accum_steps=0"])
    # The bare key works like every train field.
    assert C.resolve("shakespeare-gpt", ["grad_accum_steps=4"]).train.grad_accum_steps == 4
