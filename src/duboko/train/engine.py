"""The one training engine every family shares.

It owns the loop, device, precision, optimizer and schedule, gradient clipping, EMA, the
non-finite guard, progress bars and summary lines, history/TensorBoard logging, checkpoints and
exact resume, and torch.distributed (DDP under torchrun). A family's `Task` only provides
batches, the loss of one batch and evaluation (see `duboko.tasks`).
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from duboko import config as C
from duboko.errors import DubokoError
from duboko.io import atomic_write_json
from duboko.tasks import get_task_cls
from duboko.train import checkpoint as ckpt
from duboko.train import distributed as D
from duboko.train import runtime
from duboko.train.optim import build_optimizer, lr_factor, set_lr
from duboko.precision import autocast, resolve_precision
from duboko.train.run import CONFIG, METRICS, pick_device, save_weights, write_history, write_manifest


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of the weights (Polyak averaging): ema ← d·ema + (1-d)·θ.
    Buffers (e.g. BatchNorm statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def _grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per layer (parameters grouped by their module)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(p.grad.detach())
    out = {}
    for layer, grads in groups.items():
        norms = torch._foreach_norm(grads)
        out[layer] = torch.stack(norms).float().pow(2).sum().sqrt().item()
    return out


def apply_gradients(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float = 0.0,
    *,
    scaler: torch.amp.GradScaler | None = None,
    ema: EMA | None = None,
    inspect: Callable[[], None] | None = None,
) -> None:
    """One optimizer update from `loss`: backward (scaled under fp16), gradient clipping, an
    optional look at the gradients (`inspect`, after unscaling and clipping), the step, EMA.
    `fit` and the benchmarks' engine side both train through this."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if inspect is not None:
        inspect()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if ema is not None:
        ema.update(model)


def _fmt_metric(key: str, value: float) -> str:
    if "accuracy" in key or key in ("exact_match", "prompt_accuracy"):
        return f"{key} = {value * 100:.2f}%"
    return f"{key} = {value:.4f}"


def summary_line(epoch: int, train: dict[str, float], val: dict[str, float], seconds: float) -> str:
    """`[Epoch 1] loss = 0.1234 | accuracy = 96.54% | val_loss = ... | 12.3s` (the primer's line, extended)."""
    parts = [_fmt_metric("loss", train["loss"])]
    if "accuracy" in train:
        parts.append(_fmt_metric("accuracy", train["accuracy"]))
    parts += [_fmt_metric(f"val_{k}", v) for k, v in val.items() if isinstance(v, (int, float))]
    return f"[Epoch {epoch}] " + " | ".join(parts) + f" | {seconds:.1f}s"


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    if resume:
        if not (out / ckpt.STATE_FILE).exists():
            raise DubokoError(f"cannot resume: {out / ckpt.STATE_FILE} does not exist")
        if is_main:
            # A run killed inside an atomic write leaves its temporary file (`.NAME.XXXX.tmp`, see
            # duboko.io); the file it was replacing is whole, so the leftover is only dead weight.
            for tmp in out.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        return
    if (out / CONFIG).exists() and not overwrite:
        raise DubokoError(
            f"run folder {str(out)!r} already holds a run; use --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )


def create_run_dir(out: Path, is_main: bool) -> None:
    """Created only once the config, data and model are known good: a user mistake leaves nothing."""
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DubokoError(f"cannot create run folder {str(out)!r}: {exc.strerror or exc}") from exc
        if not os.access(out, os.W_OK):
            raise DubokoError(f"run folder {str(out)!r} is not writable")


def fit(
    cfg: C.RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    stream=None,
) -> dict[str, Any]:
    """Train `cfg` into the run folder `out_dir`; returns the final metrics (also in metrics.json)."""
    stream = stream or sys.stdout
    out = Path(out_dir)
    tcfg = cfg.train
    wall_start = time.perf_counter()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(tcfg.device, local_rank)
    info = D.init_from_env(device.type)
    runtime.configure(tcfg, device)
    is_main = info.is_main
    show = (lambda text: print(text, file=stream, flush=True)) if is_main and not quiet else (lambda text: None)
    try:
        prepare_run_dir(out, resume, overwrite, is_main)

        # Same seed on every rank for the model's initial weights (DDP also broadcasts rank 0's).
        seed_everything(tcfg.seed)
        task = get_task_cls(cfg.task)(cfg, device, info.rank, info.world_size)
        task.setup(out if resume else None)
        model = task.build_model().to(device)
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
        optimizer = build_optimizer(model, tcfg, device)
        precision = resolve_precision(tcfg.precision, device)  # "auto": bf16 only where native
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

        steps_per_epoch = task.num_train_batches()
        if steps_per_epoch < 1:
            raise DubokoError("the training data gives no batch; check data.limit_train and train.batch_size")
        total_steps = tcfg.epochs * steps_per_epoch
        if tcfg.max_steps:
            total_steps = min(total_steps, tcfg.max_steps) if tcfg.epochs else tcfg.max_steps
        epochs = tcfg.epochs if not tcfg.max_steps else min(tcfg.epochs or 10**9, math.ceil(total_steps / steps_per_epoch))

        st: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "sums": {}, "history": [], "train_seconds": 0.0,
                              "epoch_seconds": 0.0, "skipped_steps": 0, "grad_sums": {}}
        if resume:
            tensors, meta = ckpt.load_state(out, device)
            model.load_state_dict(ckpt.sub_state(tensors, "model"))
            ckpt.optimizer_from_flat(optimizer, {k: v.to(device) for k, v in tensors.items() if k.startswith("optim/")}, meta["optimizer"])
            if ema is not None and any(k.startswith("ema/") for k in tensors):
                ema.module.load_state_dict(ckpt.sub_state(tensors, "ema"))
            rng_key = f"rng/{info.rank}"
            if rng_key in tensors:
                torch.set_rng_state(tensors[rng_key])
            else:
                seed_everything(tcfg.seed + info.rank)
            ckpt.set_py_rng_state(meta["py_rng"])
            if "rng_cuda/0" in tensors and device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng_cuda/0"])
            st.update({k: meta[k] for k in st if k in meta})
            if st["epoch"] >= epochs or (tcfg.max_steps and st["step"] >= total_steps):
                raise DubokoError(
                    f"run {str(out)!r} already finished {st['epoch']} epoch(s) ({st['step']} steps); "
                    "raise --set epochs=N (or max_steps) to train further"
                )
            show(f"Resuming {out} at epoch {st['epoch'] + 1}, batch {st['batch']} (step {st['step']})")
        else:
            # Dropout and other training-time randomness differ per rank.
            seed_everything(tcfg.seed + info.rank)

        create_run_dir(out, is_main)
        if is_main:
            atomic_write_json(out / CONFIG, cfg.to_dict())
            task.save_assets(out)

        train_model: nn.Module = model
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if tcfg.compile:
            train_model = torch.compile(train_model)

        n_params = sum(p.numel() for p in model.parameters())
        show(
            f"{cfg.recipe}: {cfg.model['name']} ({n_params:,} parameters) on {device}"
            f"{f' × {info.world_size} ranks' if info.enabled else ''}, {precision}, "
            f"batch {tcfg.batch_size} (per rank {math.ceil(tcfg.batch_size / info.world_size)}), "
            f"lr {tcfg.lr:g}, {epochs} epoch(s) × {steps_per_epoch} steps -> {out}"
        )

        writer = None
        if is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tb"), purge_step=st["step"] if resume else None)
            except ImportError:
                writer = None

        def save_checkpoint(finished_epoch: bool) -> None:
            rank_rng = D.gather_rng(torch.get_rng_state(), info)
            if not is_main:
                return
            meta = {k: st[k] for k in st}
            if finished_epoch:
                meta["batch"] = 0
            ckpt.save_state(out, model=model, optimizer=optimizer, ema=ema.module if ema else None, meta=meta, rank_rng=rank_rng)
            write_manifest(out)

        def eval_model() -> nn.Module:
            return ema.module if ema is not None else model

        use_bar = is_main and not quiet and stream.isatty() if hasattr(stream, "isatty") else False
        reached_max = False
        for epoch in range(st["epoch"], epochs):
            st["epoch"] = epoch
            model.train()
            sums: dict[str, torch.Tensor] = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in st["sums"].items()}
            grad_sums: dict[str, float] = dict(st["grad_sums"])
            bar = None
            if use_bar:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, initial=st["batch"], desc=f"Epoch {epoch + 1}/{epochs}", leave=False,
                           dynamic_ncols=True, file=stream)
            t_epoch = time.perf_counter()
            for batch in task.train_batches(epoch, start=st["batch"]):
                lr = tcfg.lr * lr_factor(tcfg, st["step"], total_steps)
                set_lr(optimizer, lr)
                with autocast(device, precision):
                    outcome = task.training_step(train_model, batch)
                loss = outcome.loss
                finite = torch.isfinite(loss.detach())
                if info.enabled:
                    flag = finite.float().reshape(1)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                    finite = flag[0] > 0
                if not bool(finite):
                    if tcfg.nonfinite == "skip":
                        st["skipped_steps"] += 1
                        optimizer.zero_grad(set_to_none=True)
                        st["batch"] += 1
                        continue
                    kept = (f"The last good checkpoint is kept in {out}" if (out / ckpt.STATE_FILE).exists()
                            else "No checkpoint was saved before it (train.checkpoint_every=N saves every N steps)")
                    raise DubokoError(
                        f"the loss became {loss.item()} at step {st['step'] + 1} (epoch {epoch + 1}, batch {st['batch'] + 1}); "
                        f"stopped. {kept}. Lower train.lr, set train.grad_clip, or set train.nonfinite=skip"
                    )
                log_now = writer is not None and (st["step"] % tcfg.log_every == 0)

                def log_grads() -> None:
                    norms = _grad_norms(model)
                    if tcfg.log_grad_norms:
                        for k, v in norms.items():
                            grad_sums[k] = grad_sums.get(k, 0.0) + v
                    if log_now:
                        for k, v in norms.items():
                            writer.add_scalar(f"grad_norm/{k}", v, st["step"])

                apply_gradients(loss, model, optimizer, tcfg.grad_clip, scaler=scaler, ema=ema,
                                inspect=log_grads if tcfg.log_grad_norms or log_now else None)
                for k, v in outcome.stats.items():
                    v = v.detach().double() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=device)
                    sums[k] = sums[k] + v if k in sums else v
                st["step"] += 1
                st["batch"] += 1
                if log_now:
                    writer.add_scalar("train/loss", loss.item(), st["step"])
                    writer.add_scalar("train/lr", lr, st["step"])
                if bar is not None:
                    bar.update(1)
                    if st["batch"] % 10 == 0 or st["batch"] == steps_per_epoch:
                        count = max(1.0, sums["count"].item())
                        post = {"loss": f"{sums['loss_sum'].item() / count:.4f}"}
                        if "correct" in sums:
                            post["acc"] = f"{sums['correct'].item() / count * 100:.2f}%"
                        bar.set_postfix(post)
                if tcfg.checkpoint_every and st["step"] % tcfg.checkpoint_every == 0:
                    st["sums"] = {k: v.item() for k, v in sums.items()}
                    st["grad_sums"] = grad_sums
                    st["epoch_seconds"] += time.perf_counter() - t_epoch
                    st["train_seconds"] += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    save_checkpoint(finished_epoch=False)
                if tcfg.max_steps and st["step"] >= total_steps:
                    reached_max = True
                    break
            if bar is not None:
                bar.close()
            seconds = time.perf_counter() - t_epoch
            st["train_seconds"] += seconds
            epoch_seconds = st["epoch_seconds"] + seconds
            totals = {k: v.item() for k, v in D.all_reduce_sum(sums, info).items()}
            count = max(1.0, totals.get("count", 1.0))
            train_metrics = {"loss": totals.get("loss_sum", float("nan")) / count}
            if "correct" in totals:
                train_metrics["accuracy"] = totals["correct"] / count
            # A run stopped by max_steps inside an epoch keeps its place in it, so that a resume
            # with more steps continues the same epoch; its history row has a fractional epoch.
            partial = reached_max and st["batch"] < steps_per_epoch
            shown_epoch = round(epoch + st["batch"] / steps_per_epoch, 4) if partial else epoch + 1
            row: dict[str, Any] = {"epoch": shown_epoch, "step": st["step"]}
            row.update({f"train_{k}": v for k, v in train_metrics.items()})
            val: dict[str, float] = {}
            if (epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == epochs or reached_max:
                val = task.evaluate(eval_model(), "val")
                model.train()
            row.update({f"val_{k}": v for k, v in val.items()})
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = epoch_seconds
            if tcfg.log_grad_norms:
                n_steps = max(1, st["batch"])
                row.update({f"grad_norm_{k}": v / n_steps for k, v in grad_sums.items()})
            if is_main:
                row.update(task.epoch_end(eval_model(), epoch + 1, out) or {})
                model.train()
            st["history"].append(row)
            show(summary_line(shown_epoch, train_metrics, val, epoch_seconds))
            if writer is not None:
                for k, v in row.items():
                    if k not in ("epoch", "step") and isinstance(v, (int, float)):
                        writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            if partial:
                st.update({"sums": {k: v.item() for k, v in sums.items()}, "grad_sums": grad_sums, "epoch_seconds": epoch_seconds})
            else:
                st.update({"epoch": epoch + 1, "batch": 0, "sums": {}, "grad_sums": {}, "epoch_seconds": 0.0})
            if is_main:
                write_history(out, st["history"])
                save_weights(out, eval_model(), cfg)
            save_checkpoint(finished_epoch=not partial)
            if reached_max:
                break

        final: dict[str, Any] = {}
        # DDP keeps replicas identical by construction; check it (bit-exact digest, all-gathered).
        in_sync = D.params_in_sync(model, info, device) if info.enabled else None
        if is_main:
            final = task.final_metrics(eval_model(), out, st["history"]) or {}
            text = final.pop("report_text", None)
            last = st["history"][-1] if st["history"] else {}
            metrics = {k: v for k, v in last.items() if k.startswith("val_")}
            metrics.update(final)
            metrics.update({
                "train_seconds": st["train_seconds"],
                "wall_seconds": time.perf_counter() - wall_start,
                "epochs": st["epoch"],
                "steps": st["step"],
                "parameters": n_params,
                "world_size": info.world_size,
                "global_batch_size": tcfg.batch_size,
                "precision": precision,
                "skipped_steps": st["skipped_steps"],
            })
            if in_sync is not None:
                metrics["ranks_in_sync"] = in_sync
                if not in_sync:
                    print(f"duboko: warning: the {info.world_size} ranks ended with different weights", file=sys.stderr)
            atomic_write_json(out / METRICS, metrics)
            write_manifest(out)
            if text:
                show("\n" + text)
            show(f"Run folder: {out}  (train {st['train_seconds']:.1f}s, wall {metrics['wall_seconds']:.1f}s)")
            final = metrics
        if writer is not None:
            writer.close()
        D.barrier(info)
        return final
    finally:
        D.shutdown(info)
