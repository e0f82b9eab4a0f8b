"""The learning-rate range test (Smith, 2017, "Cyclical Learning Rates for Training Neural
Networks", sec. 3.3; fastai's `lr_find`), stepped through the one engine.

The learning rate grows exponentially from `start_lr` to `end_lr` over `num_steps` optimizer
updates, each one `Trainer.step(batch)` (so the loss, precision, clipping and optimizer are those
of `duboko train`). The loss is smoothed with a bias-corrected exponential moving average and the
sweep stops once it exceeds `diverge` × the best smoothed loss. The model, EMA, optimizer and
training state are restored afterwards: the range test leaves the weights as they were.

Two suggestions, as fastai gives them (skipping the first and last few points, which are noise):
- steepest: where the smoothed loss falls fastest against log(lr);
- valley: the middle of the longest stretch of decreasing loss (fastai's `valley`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from duboko import config as C
from duboko.errors import DubokoError
from duboko.train.engine import Trainer

SKIP_START, SKIP_END = 10, 5  # noisy ends of the curve, left out of the suggestions (fastai's defaults)
MAX_STEPS = 1000


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    raw_losses: list[float]
    steepest: float | None  # suggested learning rates (None: too few points)
    valley: float | None
    stopped_early: bool  # the loss diverged before end_lr


def _steepest(lrs: list[float], losses: list[float]) -> float | None:
    """The lr where d(loss)/d(log lr) is most negative (central differences)."""
    if len(losses) < 3:
        return None
    logs = [math.log(v) for v in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(losses) - 1)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def _valley(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's valley: the longest decreasing run of the loss (longest decreasing subsequence,
    O(n²)), then a point 1/2 of the way into it."""
    n = len(losses)
    if n < 3:
        return None
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return lrs[max_start + int(sections) + int(sections / 2)]


def suggestions(lrs: list[float], losses: list[float]) -> tuple[float | None, float | None]:
    """(steepest, valley) on the curve without its noisy ends."""
    if len(losses) > SKIP_START + SKIP_END + 3:
        lrs, losses = lrs[SKIP_START:-SKIP_END], losses[SKIP_START:-SKIP_END]
    return _steepest(lrs, losses), _valley(lrs, losses)


def _batches(trainer: Trainer):
    """The task's training batches, epoch after epoch, for as long as the sweep asks."""
    epoch = 0
    while True:
        empty = True
        for batch in trainer.task.train_batches(epoch, start=0):
            empty = False
            yield batch
        if empty:
            raise DubokoError("the training data gives no batch; check data.limit_train and train.batch_size")
        epoch += 1


def lr_find(
    source: C.RunConfig | Trainer,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smooth: float = 0.98,
    diverge: float = 4.0,
) -> LRFindResult:
    """Run the range test on a resolved config (a `Trainer(cfg, None, quiet=True)` is built) or on
    an existing `Trainer`, whose weights, optimizer, EMA and state are restored at the end."""
    if not 0 < start_lr < end_lr:
        raise DubokoError(f"the sweep needs 0 < start_lr < end_lr, got start_lr={start_lr:g}, end_lr={end_lr:g}")
    if not 2 <= num_steps <= MAX_STEPS:
        raise DubokoError(f"num_steps must be between 2 and {MAX_STEPS}, got {num_steps}")
    if not 0 <= smooth < 1:
        raise DubokoError(f"smooth must be in [0, 1), got {smooth}")
    if diverge <= 1:
        raise DubokoError(f"diverge must be > 1, got {diverge}")
    trainer = source if isinstance(source, Trainer) else Trainer(source, None, quiet=True)
    tcfg = trainer.cfg.train
    saved_cfg = (tcfg.lr, tcfg.schedule, tcfg.nonfinite)
    saved_model = copy.deepcopy(trainer.model.state_dict())
    saved_optim = copy.deepcopy(trainer.optimizer.state_dict())
    saved_ema = copy.deepcopy(trainer.ema.module.state_dict()) if trainer.ema is not None else None
    saved_state = copy.deepcopy(trainer.state)
    saved_rng = torch.get_rng_state()
    # `Trainer.step` sets the optimizer's lr to train.lr × the schedule's factor; a constant
    # schedule makes that factor 1, so train.lr is the lr of the step. A diverging step is skipped
    # (train.nonfinite = skip) and ends the sweep instead of raising.
    tcfg.schedule, tcfg.nonfinite = "constant", "skip"
    ratio = (end_lr / start_lr) ** (1 / (num_steps - 1))
    lrs: list[float] = []
    raw: list[float] = []
    smoothed: list[float] = []
    best, average, stopped = math.inf, 0.0, False
    try:
        trainer.model.train()
        batches = _batches(trainer)
        for i in range(num_steps):
            lr = start_lr * ratio**i
            tcfg.lr = lr
            outcome = trainer.step(next(batches))
            if outcome is None:  # non-finite loss: diverged
                stopped = True
                break
            loss = float(outcome.loss.detach())
            average = smooth * average + (1 - smooth) * loss
            value = average / (1 - smooth ** (i + 1))  # bias-corrected EMA
            lrs.append(lr)
            raw.append(loss)
            smoothed.append(value)
            best = min(best, value)
            if value > diverge * best or not math.isfinite(value):
                stopped = True
                break
    finally:
        tcfg.lr, tcfg.schedule, tcfg.nonfinite = saved_cfg
        trainer.model.load_state_dict(saved_model)
        trainer.optimizer.load_state_dict(saved_optim)
        if saved_ema is not None:
            trainer.ema.module.load_state_dict(saved_ema)
        trainer.state = saved_state
        trainer._epoch_sums = {}
        torch.set_rng_state(saved_rng)
        if trainer is not source:
            trainer.close()
    steepest, valley = suggestions(lrs, smoothed)
    return LRFindResult(lrs, smoothed, raw, steepest, valley, stopped)


def plot_lr_find(result: LRFindResult, path: str | Path, title: str = "") -> None:
    """Smoothed loss against the learning rate (log axis), with both suggestions marked."""
    from duboko.evaluate.plots import figure

    with figure(path, size=(6.4, 4.2), title=title or "learning-rate range test") as (fig, axes):
        ax = axes[0][0]
        ax.plot(result.lrs, result.raw_losses, color="0.75", lw=0.8, label="loss")
        ax.plot(result.lrs, result.losses, color="C0", label="smoothed loss")
        index = {lr: i for i, lr in enumerate(result.lrs)}
        for name, lr, colour in (("steepest", result.steepest, "C3"), ("valley", result.valley, "C2")):
            if lr is not None:
                ax.plot([lr], [result.losses[index[lr]]], "o", color=colour, ms=8, label=f"{name} {lr:.2e}")
        if result.losses:  # the smoothed curve sets the scale; raw spikes past it are cut off
            low, high = min(result.losses + result.raw_losses), max(result.losses)
            margin = 0.05 * (high - low) + 1e-6
            ax.set_ylim(low - margin, high + margin)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend()


def describe(result: LRFindResult, recipe_lr: float) -> str:
    """The lines `duboko lr-find` prints."""
    def fmt(v: float | None) -> str:
        return "n/a (too few points)" if v is None else f"{v:.2e}"

    end = f"stopped at lr {result.lrs[-1]:.2e} (loss above the limit)" if result.stopped_early else \
        f"reached lr {result.lrs[-1]:.2e}" if result.lrs else "no step"
    return (f"swept {len(result.lrs)} steps, {end}\n"
            f"suggested lr: steepest {fmt(result.steepest)}, valley {fmt(result.valley)} (recipe: {recipe_lr:g})")
