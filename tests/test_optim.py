"""`train.optim.lr_factor`: the learning-rate multiplier of each schedule at chosen steps, against
the closed forms written out here (not by calling the code under test twice).

Conventions (src/duboko/train/optim.py): `step` is the 0-based index of the optimizer step about
to be taken, of `total_steps` steps in the run (steps 0 .. total_steps - 1 are taken)."""

from __future__ import annotations

import math

import pytest

from duboko.config import TrainConfig
from duboko.errors import DubokoError
from duboko.train.optim import lr_factor


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def _cosine(progress: float, floor: float = 0.0) -> float:
    """SGDR (Loshchilov & Hutter, eq. 5) as a fraction of the peak: from 1 at progress 0 down to
    `floor` at progress 1."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_constant_is_one_everywhere():
    cfg = _cfg(schedule="constant", warmup_steps=10, min_lr_ratio=0.5)  # both ignored
    assert [lr_factor(cfg, s, 100) for s in (0, 1, 50, 99, 100, 500)] == [1.0] * 6
    assert lr_factor(cfg, 0, 0) == 1.0


def test_cosine_with_warmup():
    warmup, total = 10, 110
    cfg = _cfg(schedule="cosine", warmup_steps=warmup)
    # Linear warm-up: step s (0-based) gets (s + 1) / warmup, so no step runs at lr 0 and the last
    # warm-up step reaches the peak.
    assert lr_factor(cfg, 0, total) == pytest.approx(0.1)
    assert lr_factor(cfg, 4, total) == pytest.approx(0.5)
    assert lr_factor(cfg, warmup - 1, total) == pytest.approx(1.0)
    # Then the decay over the remaining total - warmup = 100 steps: progress (s - warmup) / 100.
    assert lr_factor(cfg, warmup, total) == pytest.approx(1.0)  # progress 0
    assert lr_factor(cfg, warmup + 25, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg, warmup + 50, total) == pytest.approx(0.5)  # mid-way: half the peak
    assert lr_factor(cfg, warmup + 75, total) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    last = total - 1  # progress 99/100: just above the floor
    assert lr_factor(cfg, last, total) == pytest.approx(_cosine(99 / 100))
    assert 0.0 < lr_factor(cfg, last, total) < 1e-3
    # Past the end (progress clipped to 1) it stays at the floor.
    assert lr_factor(cfg, total, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg, total + 40, total) == pytest.approx(0.0, abs=1e-12)


def test_cosine_is_monotone_after_warmup():
    cfg = _cfg(schedule="cosine", warmup_steps=5)
    values = [lr_factor(cfg, s, 60) for s in range(5, 60)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_min_lr_ratio_is_the_floor():
    floor, total = 0.1, 200
    cfg = _cfg(schedule="cosine", warmup_steps=0, min_lr_ratio=floor)
    assert lr_factor(cfg, 0, total) == pytest.approx(1.0)  # no warm-up: the peak at once
    assert lr_factor(cfg, 100, total) == pytest.approx(floor + (1 - floor) * 0.5)  # 0.55
    assert lr_factor(cfg, 150, total) == pytest.approx(_cosine(0.75, floor))
    assert lr_factor(cfg, total - 1, total) == pytest.approx(_cosine(199 / 200, floor))
    assert lr_factor(cfg, total, total) == pytest.approx(floor)
    assert lr_factor(cfg, 10 * total, total) == pytest.approx(floor)
    assert min(lr_factor(cfg, s, total) for s in range(total)) >= floor


def test_cosine_warmup_longer_than_the_run():
    cfg = _cfg(schedule="cosine", warmup_steps=50)
    assert lr_factor(cfg, 9, 10) == pytest.approx(10 / 50)  # still warming up at the last step


def test_onecycle_default_warmup_is_a_quarter():
    total = 100
    cfg = _cfg(schedule="onecycle")
    start, end = 1 / 25, 1 / 25 / 1e4  # lr/25 to begin, lr/(25·1e4) at the end
    warm = 25  # 25% of 100 steps
    assert lr_factor(cfg, 0, total) == pytest.approx(start)
    assert lr_factor(cfg, 10, total) == pytest.approx(start + (1 - start) * 10 / warm)  # linear rise
    assert lr_factor(cfg, warm - 1, total) == pytest.approx(start + (1 - start) * 24 / 25)
    # The peak is at step `warm` (the first step of the decay) and nowhere else.
    values = [lr_factor(cfg, s, total) for s in range(total)]
    assert values.index(max(values)) == warm and max(values) == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:warm], values[1 : warm + 1]))  # rising
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1 :]))  # then falling
    # Cosine decay over the remaining 75 steps, from 1 down to `end`.
    for s in (40, 62, 99):
        progress = (s - warm) / (total - warm)
        assert lr_factor(cfg, s, total) == pytest.approx(end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_factor(cfg, total, total) == pytest.approx(end)


def test_onecycle_warmup_steps_set_the_peak():
    total, warm = 40, 8
    cfg = _cfg(schedule="onecycle", warmup_steps=warm)
    values = [lr_factor(cfg, s, total) for s in range(total)]
    assert values.index(max(values)) == warm
    assert lr_factor(cfg, 4, total) == pytest.approx(1 / 25 + (1 - 1 / 25) * 4 / warm)
    mid = warm + (total - warm) // 2  # half-way through the decay: half the peak (plus end/2)
    assert lr_factor(cfg, mid, total) == pytest.approx(0.5 * (1 + 1 / 25 / 1e4))


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(DubokoError, match="schedule"):
        lr_factor(_cfg(schedule="linear"), 0, 10)
