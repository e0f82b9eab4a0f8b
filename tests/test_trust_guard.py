"""Numerical guard: an absurd learning rate (SGD, lr 1e6) makes the loss non-finite within a few
steps. With train.nonfinite=stop (the default) the run stops with one line naming the step and
keeps the last checkpoint loadable (and finite); with nonfinite=skip it finishes and counts the
skipped steps in metrics.json."""

from __future__ import annotations

import json

import torch

from duboko.cli.main import main
from duboko.train import checkpoint as ckpt

BAD = [
    "--set", "data.image_size=16", "--set", "model.image_size=16", "--set", "data.limit_train=128",
    "--set", "data.limit_test=50", "--set", "train.num_threads=1", "--set", "epochs=1", "--set", "batch_size=16",
    "--set", "optimizer=sgd", "--set", "lr=1e6", "--set", "checkpoint_every=1",
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "mnist-cnn", "--out", str(run), "--quiet", *BAD]) == 2
    line = _one_error_line(capsys)
    assert "the loss became nan" in line or "the loss became inf" in line, line
    step = int(line.split(" at step ")[1].split()[0])
    assert step >= 2  # the first step is finite: lr 1e6 needs one update to blow the weights up
    # The last checkpoint is whole, loads, holds finite weights, and is the step before the bad one.
    tensors, meta = ckpt.load_state(run, torch.device("cpu"))
    assert meta["step"] == step - 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("model/", "optim/")))
    # Resuming it is deterministic: the same step fails again, with the same one-line message.
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert f" at step {step} " in _one_error_line(capsys)


def test_nonfinite_skip_counts_skipped_steps(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "mnist-cnn", "--out", str(run), "--quiet", *BAD, "--set", "train.nonfinite=skip"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    batches = 128 // 16
    assert metrics["skipped_steps"] > 0
    # Every batch was either an optimizer step or a counted skip.
    assert metrics["steps"] + metrics["skipped_steps"] == batches
    from duboko.io import load_tensors

    weights = load_tensors(run / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())  # skipped steps never touched the weights


def test_a_sane_run_skips_nothing(tmp_path):
    run = tmp_path / "run"
    sane = [a if a != "lr=1e6" else "lr=0.01" for a in BAD]
    assert main(["train", "mnist-cnn", "--out", str(run), "--quiet", *sane, "--set", "train.nonfinite=skip"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 0 and metrics["steps"] == 128 // 16


def test_without_any_checkpoint_the_message_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    no_ckpt = [a if a != "checkpoint_every=1" else "checkpoint_every=0" for a in BAD]
    assert main(["train", "mnist-cnn", "--out", str(run), "--quiet", *no_ckpt]) == 2
    line = _one_error_line(capsys)
    assert " at step " in line and "No checkpoint was saved" in line
    assert not (run / "state.safetensors").exists()
