"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math

import torch
from torch import nn

from duboko.config import TrainConfig
from duboko.errors import DubokoError, unknown_name

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "onecycle")


def _kernels(cfg: TrainConfig, device: torch.device) -> dict[str, bool]:
    """`train.optimizer_impl` as torch's keyword: fused (one kernel over all parameters), foreach
    (one op per step of the update, over all tensors at once) or loop (per parameter)."""
    has_fused = device.type in ("cuda", "cpu") and cfg.optimizer in ("adam", "adamw", "sgd")
    impl = cfg.optimizer_impl
    if impl == "auto":
        # On MY_NET's CPU step fused Adam took ~9 ms against ~60 ms for foreach's chain of
        # whole-tensor ops (torch.profiler; docs/benchmarks.md).
        impl = "fused" if has_fused else "foreach"
    if impl == "fused" and not has_fused:
        raise DubokoError(f"train.optimizer_impl='fused' needs adam, adamw or sgd on cpu or cuda, "
                          f"got optimizer {cfg.optimizer!r} on {device.type!r}; use 'auto' or 'foreach'")
    return {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam, AdamW or RMSprop; foreach/fused kernels where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    fast = _kernels(cfg, device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, **fast)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fast)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fast)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum if cfg.momentum else 0.0,
                                   weight_decay=cfg.weight_decay, **fast)
    raise unknown_name("optimizer", cfg.optimizer, OPTIMIZERS)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The multiplier of cfg.lr at optimizer step `step` (0-based) of `total_steps`."""
    total = max(1, total_steps)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        # Linear warm-up, then cosine decay to min_lr_ratio (Loshchilov & Hutter, SGDR, eq. 5).
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "onecycle":
        # Smith's one-cycle: rise from lr/25 to lr over the first 25% (or warmup_steps), then
        # cosine down to lr/1e4 (torch's OneCycleLR defaults, without momentum cycling).
        warm = cfg.warmup_steps or max(1, int(0.25 * total))
        start, end = 1 / 25, 1 / 25 / 1e4
        if step < warm:
            return start + (1 - start) * step / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    raise unknown_name("schedule", cfg.schedule, SCHEDULES)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
