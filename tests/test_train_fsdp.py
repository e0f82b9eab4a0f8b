"""FSDP2 (`train.strategy=fsdp`, torch's `fully_shard`) under torchrun on CPU (gloo).

A tiny GPT (2 blocks × 32 wide) trained on 2 ranks with FSDP and in one process with the same
global batch: the task gives both the same global batches (each rank takes every 2nd row), FSDP
reduce-scatters the mean of the two half-batch gradients, which equals the whole batch's, so the
runs differ only by floating-point summation order. Tolerances (measured in the comments, CPU, one
thread per process, 2 epochs = 16 Adam steps, lr 3e-3):
  per-step loss (mean over ranks): 1e-4 relative   (measured ~3e-7)
  final weights:                   1e-4 absolute   (measured ~2e-6)
  parameters per rank:             within 5% of half (measured 14,144 and 14,112 of 28,256)
"""

from __future__ import annotations

import json

import pytest
import torch

from duboko import config as C
from duboko.errors import DubokoError
from duboko.io import load_tensors
from duboko.train import distributed as D
from duboko.tasks.language_model import LanguageModelTask
from duboko.train.run import read_history
from torchrun_launch import TINY_GPT, global_losses, launch

TWO_EPOCHS = TINY_GPT + ["train.epochs=2"]


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_hold_half_the_parameters(tmp_path):
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    ranks = launch(2, tmp_path / "rec-fsdp", fsdp, TWO_EPOCHS + ["train.strategy=fsdp"])
    (single,) = launch(1, tmp_path / "rec-one", one, TWO_EPOCHS)

    # The same 16 global batches, and per step the same loss.
    assert len(single["losses"]) == 16 and len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == 16
    assert global_losses(ranks) == pytest.approx(single["losses"], rel=1e-4)
    # The ranks' rows are disjoint halves of the 1-process batches, in order.
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == sorted(single["seen"])
    assert ranks[0]["seen"][:8] == single["seen"][0:16:2] and ranks[1]["seen"][:8] == single["seen"][1:16:2]

    m2 = json.loads((fsdp / "metrics.json").read_text())
    m1 = json.loads((one / "metrics.json").read_text())
    assert m2["strategy"] == "fsdp" and m2["world_size"] == 2 and "ranks_in_sync" not in m2
    assert m2["steps"] == m1["steps"] == 16
    # Each rank holds about half of the parameters (FSDP2 shards every tensor on dim 0).
    total, per_rank = m2["parameters"], m2["parameters_per_rank"]
    assert total == m1["parameters"] and len(per_rank) == 2 and sum(per_rank) == total
    assert all(abs(n / total - 0.5) < 0.05 for n in per_rank), per_rank
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4)
    h2, h1 = read_history(fsdp), read_history(one)
    for row2, row1 in zip(h2, h1):
        assert row2["train_loss"] == pytest.approx(row1["train_loss"], rel=1e-4)

    # model.safetensors holds the gathered, whole weights: equal to the 1-process run's, and
    # they load into a plain model (as eval/predict load them) that reproduces the val loss.
    w2, w1 = load_tensors(fsdp / "model.safetensors"), load_tensors(one / "model.safetensors")
    assert w2.keys() == w1.keys()
    assert all(w2[k].shape == w1[k].shape for k in w1)
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < 1e-4
    task = LanguageModelTask(C.resolve("shakespeare-gpt", TWO_EPOCHS), torch.device("cpu"))
    task.setup(fsdp)  # the run's tokenizer.json
    model = task.build_model()
    model.load_state_dict(w2)
    assert task.evaluate(model, "val")["loss"] == pytest.approx(m2["val_loss"], rel=1e-6)
    # The checkpoint is whole tensors too (gathered to rank 0), with no shard or pickle beside it.
    from duboko.train import checkpoint as ckpt

    tensors, meta = ckpt.load_state(fsdp, torch.device("cpu"))
    assert meta["world_size"] == 2 and meta["strategy"] == "fsdp"
    assert all(tensors[f"model/{k}"].shape == w1[k].shape for k in w1)
    assert {k.split("/", 2)[2] for k in tensors if k.startswith("optim/")} == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_trains_close_to_fp32(tmp_path):
    """bf16: FSDP's MixedPrecisionPolicy gathers bf16 parameters and reduces fp32 gradients; the
    losses follow the fp32 run to bf16 accuracy (measured max relative difference 1.1e-4 over 8
    steps), and do differ from it (bf16 really computed)."""
    ranks = launch(2, tmp_path / "rec", tmp_path / "bf16", TINY_GPT + ["train.strategy=fsdp", "train.precision=bf16"])
    (ref,) = launch(1, tmp_path / "rec-ref", tmp_path / "ref", TINY_GPT)
    losses = global_losses(ranks)
    assert losses == pytest.approx(ref["losses"], rel=1e-2)
    assert max(abs(a - b) / b for a, b in zip(losses, ref["losses"])) > 1e-6
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["strategy"] == "fsdp"


def test_repeated_blocks_are_the_transformer_layers():
    """FSDP units: every member of a ModuleList (the GPT's blocks), never a list inside a block."""
    from duboko import registry

    model = registry.create_model("gpt-char", vocab_size=65, n_layer=3, n_embd=32, n_head=2, block_size=16)
    blocks = D._repeated_blocks(model)
    assert blocks == list(model.decoder.layers)


def test_fsdp_refuses_ema_and_checks_the_strategy_name():
    with pytest.raises(DubokoError, match="train.strategy"):
        C.resolve("shakespeare-gpt", ["train.strategy=zero3"])
    cfg = C.resolve("shakespeare-gpt", TINY_GPT + ["train.strategy=fsdp", "train.ema_decay=0.9"])
    from duboko.train.engine import Trainer

    with pytest.raises(DubokoError, match="ema_decay"):
        Trainer(cfg, None, quiet=True)
