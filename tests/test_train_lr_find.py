"""The learning-rate range test: it steps the engine's Trainer, suggests a learning rate near the
recipe's own on mnist-mlp, and leaves the weights as they were."""

from __future__ import annotations

import math

import pytest
import torch

from duboko import config as C
from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.train import engine
from duboko.train.engine import Trainer
from duboko.train.lr_find import _valley, lr_find, suggestions

TINY_MLP = ["data.limit_train=2048", "data.limit_test=100", "train.num_threads=1"]


def test_lr_find_on_mnist_mlp_suggests_near_the_recipe_lr_and_restores_the_weights(monkeypatch):
    cfg = C.resolve("mnist-mlp", TINY_MLP)
    trainer = Trainer(cfg, None, quiet=True)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer_state = trainer.optimizer.state_dict()
    steps = []
    real_step = engine.Trainer.step

    def spy(self, batch):
        steps.append(self.cfg.train.lr)
        out = real_step(self, batch)
        assert self.optimizer.param_groups[0]["lr"] == pytest.approx(steps[-1])  # the lr of the sweep was used
        return out

    monkeypatch.setattr(engine.Trainer, "step", spy)
    result = lr_find(trainer)
    recipe_lr = cfg.train.lr  # 1e-3
    assert steps == pytest.approx(result.lrs[: len(steps)]) and len(steps) >= len(result.lrs)
    assert result.lrs[0] == pytest.approx(1e-7)
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))  # an exponential sweep up
    assert result.stopped_early and result.lrs[-1] < 10  # MLP diverges before lr 10
    for name, lr in (("steepest", result.steepest), ("valley", result.valley)):
        assert lr is not None and recipe_lr / 10 <= lr <= recipe_lr * 10, (name, lr)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert trainer.optimizer.state_dict()["state"].keys() == optimizer_state["state"].keys()
    assert trainer.state.step == 0 and trainer.cfg.train.lr == recipe_lr and trainer.cfg.train.schedule == "cosine"
    trainer.close()


def test_the_smoothed_loss_stops_at_four_times_the_best():
    cfg = C.resolve("mnist-mlp", TINY_MLP + ["data.limit_train=512"])
    result = lr_find(cfg, start_lr=1e-4, end_lr=1e3, num_steps=40, smooth=0.0)  # no smoothing: raw = smoothed
    assert result.losses == pytest.approx(result.raw_losses)
    assert result.stopped_early and result.lrs[-1] < 1e3
    # every kept point but the last is within 4× the best so far; the last one broke the limit,
    # unless the step after it was non-finite (skipped, not recorded)
    assert all(v <= 4 * min(result.losses[: i + 1]) for i, v in enumerate(result.losses[:-1]))


def test_valley_and_steepest_on_a_known_curve():
    lrs = [10 ** (-6 + i * 0.1) for i in range(60)]
    # flat, then a descent between 1e-4 and 1e-2, then a blow-up
    losses = [2.0 if lr < 1e-4 else (2.0 - 0.5 * (math.log10(lr) + 4) if lr < 1e-2 else 1.0 + 10 * (lr - 1e-2)) for lr in lrs]
    steep, valley = suggestions(lrs, losses)
    assert 1e-4 <= steep <= 1e-2 and 1e-4 <= valley <= 1e-2
    assert _valley([1.0, 0.1], [1.0, 0.5]) is None


def test_bad_sweeps_are_refused():
    cfg = C.resolve("mnist-mlp", TINY_MLP)
    with pytest.raises(DubokoError, match="start_lr < end_lr"):
        lr_find(cfg, start_lr=1.0, end_lr=0.1)
    with pytest.raises(DubokoError, match="num_steps"):
        lr_find(cfg, num_steps=1)


def test_lr_find_command_prints_and_plots(tmp_path, capsys):
    out = tmp_path / "lr.png"
    args = ["lr-find", "mnist-mlp", "--out", str(out), "--steps", "60"] + sum((["--set", s] for s in TINY_MLP + ["data.limit_train=1024"]), [])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "suggested lr: steepest" in text and "valley" in text and "(recipe: 0.001)" in text
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert main(["lr-find", "mnist-mlp", "--out", str(tmp_path / "x.png"), "--start-lr", "0"]) == 2
    assert "start_lr" in capsys.readouterr().err
