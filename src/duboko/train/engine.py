"""The one training engine every family shares: `Trainer`.

It owns the loop, device, precision, optimizer and schedule, gradient clipping and accumulation,
EMA, the non-finite guard, progress bars and summary lines, history/TensorBoard logging,
checkpoints and exact (and elastic) resume, and torch.distributed under torchrun: DDP, or FSDP2
(`train.strategy`). A family's `Task` only provides batches, the loss of one batch and
evaluation (see `duboko.tasks`).

`Trainer` is steppable: `step(*micro_batches)` is one optimizer update, `run_epoch()` one pass with its
validation, history row and checkpoint, `fit()` the whole run. `duboko train` calls `fit`, and
`duboko bench` times `Trainer.step` itself, so a benchmark never measures other code than training.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko import config as C
from duboko.errors import DubokoError
from duboko.evaluate.model_card import write_model_card
from duboko.evaluate.report import write_report
from duboko.io import atomic_write_json
from duboko.registry import get_task
from duboko.seeding import derive_seed, seed_everything
from duboko.tasks import Evaluation, StepOutput, Task
from duboko.train import checkpoint as ckpt
from duboko.train import distributed as D
from duboko.train import runtime
from duboko.train.optim import build_optimizer, lr_factor, set_lr
from duboko.precision import autocast, hardware_features, resolve_precision
from duboko.train.lock import LOCK_FILE, RunLock
from duboko.train.run import (
    CONFIG, MANIFEST, METRICS, OVERWRITTEN_INFIX, move_back, moving_name, pick_device, put_back_set_aside,
    save_weights, verify_resumable, write_history, write_manifest,
)


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


def _grad_norms(model: nn.Module, info: D.DistInfo | None = None) -> dict[str, float]:
    """L2 norm of the gradient per layer (parameters grouped by their module). Under FSDP each
    rank holds a shard of each gradient: the squared norms of the shards are summed over the
    ranks (a collective: every rank calls it)."""
    groups: dict[str, list[torch.Tensor]] = {}
    sharded = False
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.detach()
            if hasattr(grad, "to_local"):  # a DTensor shard
                grad, sharded = grad.to_local(), True
            groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(grad)
    if not groups:
        return {}
    layers = list(groups)
    squares = torch.stack([torch.stack(torch._foreach_norm(groups[k])).float().pow(2).sum() for k in layers])
    if sharded and info is not None and info.enabled:
        torch.distributed.all_reduce(squares)
    return {k: v for k, v in zip(layers, squares.sqrt().tolist())}


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
    `Trainer.step` does the same with `backward` per micro-batch and one `optimizer_update`."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss, scaler)
    optimizer_update(model, optimizer, grad_clip, scaler=scaler, ema=ema, inspect=inspect)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    """Accumulate d loss / d parameters into `.grad` (scaled under fp16)."""
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float = 0.0,
    *,
    scaler: torch.amp.GradScaler | None = None,
    ema: EMA | None = None,
    inspect: Callable[[], None] | None = None,
) -> None:
    """The update from the accumulated gradients: unscale (fp16), clip the global norm (FSDP's
    DTensor gradients included), `inspect`, the optimizer step, EMA."""
    if scaler is not None:
        scaler.unscale_(optimizer)
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


def _fmt_metric(key: str, value: float, percent: bool) -> str:
    return f"{key} = {value * 100:.2f}%" if percent else f"{key} = {value:.4f}"


def summary_line(epoch: float, train: dict[str, float], val: dict[str, float], seconds: float,
                 shown_metric: str = "", percent_metrics: tuple[str, ...] = ("accuracy",)) -> str:
    """`[Epoch 1] loss = 0.1234 | accuracy = 96.54% | val_loss = ... | 12.3s` (the primer's line,
    extended): the training loss, the task's `shown_metric`, then every validation metric."""
    parts = [_fmt_metric("loss", train["loss"], False)]
    if shown_metric and shown_metric in train:
        parts.append(_fmt_metric(shown_metric, train[shown_metric], shown_metric in percent_metrics))
    parts += [_fmt_metric(f"val_{k}", v, k in percent_metrics) for k, v in val.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return f"[Epoch {epoch}] " + " | ".join(parts) + f" | {seconds:.1f}s"


# Files a command may find in a folder it is asked to train into that make it "a run folder":
# anything else in a non-empty folder belongs to the user and is never overwritten.
RUN_FOLDER_MARKS = (CONFIG, MANIFEST, ckpt.STATE_FILE)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Check the run folder before anything is written (the caller holds its lock): resume
    needs a saved state that verifies; a new run needs a new or empty folder, or a run folder
    with overwrite."""
    if resume:
        # Before the state, config or assets are read again: tampered or truncated files are
        # refused (a run killed between a checkpoint and its manifest still resumes).
        verify_resumable(out)
        if is_main:
            # A run killed inside an atomic write leaves its temporary file (`.NAME.XXXX.tmp`, see
            # duboko.io); the file it was replacing is whole, so the leftover is only dead weight.
            for tmp in out.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        return
    if (out / CONFIG).exists() and not overwrite:
        raise DubokoError(
            f"run folder {str(out)!r} already holds a run; resume it (resume=True, `duboko train --resume`), "
            "replace it (overwrite=True, `--overwrite`), or pick another run folder"
        )
    if out.is_dir() and not any((out / mark).exists() for mark in RUN_FOLDER_MARKS):
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise DubokoError(
                f"{str(out)!r} is not empty and not a run folder (it holds {shown}); "
                "a run folder must be new, empty or a previous run: pick another one"
            )


def create_run_dir(out: Path, is_main: bool) -> None:
    """Create the run folder (and its parents) on the main rank; a folder that cannot be created
    or written is one line."""
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DubokoError(f"cannot create run folder {str(out)!r}: {exc.strerror or exc}") from exc
        if not out.is_dir():
            raise DubokoError(f"run folder {str(out)!r} is a file, expected a folder")
        if not os.access(out, os.W_OK):
            raise DubokoError(f"run folder {str(out)!r} is not writable")


def set_aside_old_run(out: Path) -> Path:
    """`--overwrite`: move the old run's files (everything but the lock) into a hidden sibling
    folder, so that the new run starts in an empty folder while the old run stays whole until
    the new one has its first checkpoint (`Trainer.save` deletes it then; `settle_overwrite`
    puts it back if the run stops before). The files go into `.NAME.overwriting-PID`, which is
    renamed `.NAME.overwritten-PID` once all are there: a SIGKILL half-way leaves the name that
    says the run folder still holds old files only (`duboko.train.run.recover_interrupted_overwrite`)."""
    backup = out.parent / f".{out.name}{OVERWRITTEN_INFIX}{os.getpid()}"
    moving = moving_name(backup)
    try:
        moving.mkdir()
    except OSError as exc:
        raise DubokoError(f"cannot set the old run in {str(out)!r} aside for --overwrite: {exc.strerror or exc}") from exc
    try:
        for entry in out.iterdir():
            if entry.name != LOCK_FILE:
                entry.rename(moving / entry.name)
        if backup.exists() or backup.is_symlink():  # a rename onto it would replace an empty folder
            problem = f"{backup} exists"
        else:
            moving.rename(backup)
            return backup
    except OSError as exc:
        problem = exc.strerror or str(exc)
    try:  # the old run goes back where it was; if that fails too, the next lock's recovery does it
        move_back(moving, out)
    except (OSError, DubokoError):
        pass
    raise DubokoError(f"cannot set the old run in {str(out)!r} aside for --overwrite: {problem}")


def settle_overwrite(out: Path, backup: Path) -> str:
    """After an `--overwrite` run stops: with a checkpoint of its own (state and manifest) the
    new run stays and the old one is deleted; without, the old run is put back whole and the
    new run's partial files are removed. Returns what happened, for the user."""
    import shutil

    if (out / ckpt.STATE_FILE).is_file() and (out / MANIFEST).is_file():
        shutil.rmtree(backup, ignore_errors=True)
        return "replaced"
    put_back_set_aside(out, backup, all_new=True)
    return "restored"


def lock_run_dir(out: Path, resume: bool) -> tuple[RunLock | None, bool]:
    """Take the run folder's lock (`duboko.train.lock`) before it is checked or written, so that
    the check and the writes are one writer's; the folder is created for it if needed.
    Returns (lock, whether the folder was created here): a run that fails before writing
    anything removes the empty folder again (a user mistake leaves nothing)."""
    if resume and not out.is_dir():
        return None, False  # prepare_run_dir says what is missing
    created = not out.exists()
    create_run_dir(out, True)
    return RunLock.acquire(out), created


def plan_steps(tcfg: C.TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, epochs) of a run: `train.epochs` passes, cut by `train.max_steps`
    when it is set (with epochs = 0, max_steps alone decides and the epochs follow from it)."""
    if steps_per_epoch < 1:
        raise DubokoError("the training data gives no batch; check data.limit_train and train.batch_size")
    total_steps = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps) if tcfg.epochs else tcfg.max_steps
    epochs = tcfg.epochs if not tcfg.max_steps else min(tcfg.epochs or 10**9, math.ceil(total_steps / steps_per_epoch))
    return total_steps, epochs


@dataclass
class TrainState:
    """Where a run is: saved as JSON in the checkpoint's metadata, restored by `Trainer.resume`."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs finished (the index of the epoch being trained)
    batch: int = 0  # (micro-)batches done inside the current epoch (the task's batch index)
    samples: int = 0  # global samples done inside the current epoch: the world-size-free position
    sums: dict[str, float] = field(default_factory=dict)  # running sums of the epoch's step statistics
    history: list[dict] = field(default_factory=list)  # one row per epoch (history.csv)
    train_seconds: float = 0.0  # time in training passes, all epochs
    epoch_seconds: float = 0.0  # time in the current epoch before its last checkpoint
    skipped_steps: int = 0  # non-finite losses skipped (train.nonfinite = skip)
    grad_sums: dict[str, float] = field(default_factory=dict)  # per-layer gradient norms, summed

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "TrainState":
        names = {f for f in cls.__dataclass_fields__}
        state = cls(**{k: v for k, v in meta.items() if k in names})
        if not (isinstance(state.step, int) and isinstance(state.epoch, int) and isinstance(state.batch, int)
                and min(state.step, state.epoch, state.batch) >= 0):
            raise DubokoError(f"the saved training state is corrupt: step {state.step!r}, epoch {state.epoch!r}, "
                              f"batch {state.batch!r} (expected whole numbers >= 0)")
        return state


class Trainer:
    """One run of one `RunConfig`, steppable.

    `Trainer(cfg, out_dir)` sets everything up (device, process settings, seeding, task and data,
    model, EMA, optimizer, precision, the run folder, or the saved state with `resume=True`);
    `step(batch)` is one optimizer update; `run_epoch()` one epoch with validation, history row and
    checkpoint; `evaluate(split)` the task's metrics; `save()` a checkpoint; `fit()` the whole run.
    With `out_dir=None` nothing is written (benchmarks, notebooks)."""

    def __init__(
        self,
        cfg: C.RunConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        quiet: bool = False,
        stream=None,
        device: str | None = None,
        progress: bool | None = None,
    ):
        self.cfg = cfg
        # Progress bars: None shows them when the stream is a terminal; True always (tqdm.auto:
        # a notebook widget in Jupyter), False never.
        self.progress = progress
        self.out = Path(out_dir) if out_dir is not None else None
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.wall_start = time.perf_counter()
        tcfg = cfg.train
        self.device = pick_device(device or tcfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = D.init_from_env(self.device.type)
        self.is_main = self.dist.is_main
        self.writer = None
        self.lock: RunLock | None = None  # the run folder's, held until close()
        self._created_out = False
        self._overwritten: Path | None = None  # the old run, set aside by --overwrite
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.close()
            raise

    # -- set-up ----------------------------------------------------------------------------------
    def _setup(self, resume: bool, overwrite: bool) -> None:
        cfg, tcfg, out = self.cfg, self.cfg.train, self.out
        if resume and out is None:
            raise DubokoError("resuming needs the run folder (out_dir)")
        runtime.configure(tcfg, self.device)
        task_cls = get_task(cfg.task)
        task_cls.check(cfg)  # a config built by hand, not through config.resolve, is checked too
        C.validate_train(tcfg)
        self.sharded = tcfg.strategy == "fsdp" and self.dist.enabled
        if tcfg.strategy == "fsdp" and tcfg.ema_decay > 0:
            raise DubokoError("train.ema_decay > 0 does not work with train.strategy='fsdp' yet (the EMA would be a "
                              "whole unsharded copy on every rank); set train.ema_decay=0 or train.strategy=ddp")
        # Gradient accumulation: train.batch_size is the batch of one optimizer step; the task
        # serves micro-batches of batch_size / grad_accum_steps (each again split over the ranks),
        # and `step` takes grad_accum_steps consecutive ones. Micro-batch i of a task is global
        # samples [i·b, (i+1)·b) of the epoch's order, so the samples of one step are the same.
        self.accum = tcfg.grad_accum_steps
        self.micro_batch_size = tcfg.batch_size // self.accum
        task_cfg = cfg if self.accum == 1 else dataclasses.replace(
            cfg, train=dataclasses.replace(tcfg, batch_size=self.micro_batch_size))  # shares cfg.model and cfg.data
        if out is not None:
            if self.is_main:
                self.lock, self._created_out = lock_run_dir(out, resume)
            prepare_run_dir(out, resume, overwrite, self.is_main)

        # Same seed on every rank for the model's initial weights (DDP also broadcasts rank 0's).
        seed_everything(tcfg.seed)
        self.task: Task = task_cls(task_cfg, self.device, self.dist.rank, self.dist.world_size)
        # Fine-tuning (train.init_from): a new run sets its task up from the source run's assets
        # (its tokenizer, class names, scalers: what its weights were trained with) and starts
        # from its weights; a resumed one has its own assets and weights (the source is not read).
        init_dir = Path(tcfg.init_from) if tcfg.init_from and not resume else None
        if init_dir is not None:
            from duboko.train.run import load_init_weights, verify_init_source

            digest = verify_init_source(init_dir, cfg)  # before anything in it is parsed
        self.task.setup(out if resume else init_dir)
        model = self.task.build_model().to(self.device)
        if init_dir is not None:
            # Before channels-last, sharding, EMA (a copy of these weights) and the optimizer.
            load_init_weights(init_dir, model)
            self._show(f"Starting from the weights of {init_dir} (manifest sha256 {digest[:12]}…)")
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.precision = resolve_precision(tcfg.precision, self.device)  # "auto": bf16 only where native
        if self.sharded:
            # Before the optimizer: fully_shard swaps every parameter for its DTensor shard.
            D.fully_shard_model(model, self.device, self.precision, tcfg.fsdp_cpu_offload)
        self.model = model
        self._plain: nn.Module | None = None  # rank 0's unsharded copy for rank-0-only work (FSDP)
        self.ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
        self.optimizer = build_optimizer(model, tcfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.batches_per_epoch = self.task.num_train_batches()  # micro-batches
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accum)  # optimizer steps
        self.total_steps, self.epochs = plan_steps(tcfg, self.steps_per_epoch)
        self.state = TrainState()
        if resume:
            self.resume()
        else:
            # Dropout and other training-time randomness differ per rank.
            seed_everything(derive_seed(tcfg.seed, self.dist.rank))
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._grad_sums: dict[str, float] = {}
        self._log_now = False

        self.assets: list[str] = []
        if out is not None:
            create_run_dir(out, self.is_main)
            if overwrite and not resume and self.is_main and (out / CONFIG).exists():
                self._overwritten = set_aside_old_run(out)
            if self.is_main:
                atomic_write_json(out / CONFIG, cfg.to_dict())
                self.assets = list(self.task.save_assets(out) or [])

        train_model: nn.Module = model  # FSDP2: the sharded model itself is what trains
        if self.dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if tcfg.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model
        if out is not None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tb"), purge_step=self.state.step if resume else None)
            except ImportError:
                self.writer = None

    def resume(self) -> None:
        """Restore the run folder's saved state: weights, optimizer moments, EMA, every RNG and
        the position in the data (epoch, global samples), so training continues bit-exactly on the
        same number of ranks, and to float tolerance on another (elastic: the state holds whole
        tensors, which each rank of an FSDP run shards again; the position counts global
        samples, which any world size splits the same way). Either layout: one state.safetensors,
        or its head and shards, read one tensor at a time (each rank keeps only its piece)."""
        tcfg, out = self.cfg.train, self.out
        with ckpt.SavedState(out) as saved:
            meta = saved.meta
            names = set(saved.names())
            own = self.model.state_dict()
            wanted = {f"model/{k}" for k in own}
            missing, extra = sorted(wanted - names), sorted(n for n in names - wanted if n.startswith("model/"))
            if missing or extra:
                detail = (f"missing {', '.join(m[6:] for m in missing[:3])}" if missing else "") + (
                    ("; " if missing else "") + f"unexpected {', '.join(e[6:] for e in extra[:3])}" if extra else "")
                raise DubokoError(f"{out / ckpt.STATE_FILE} does not fit model {self.cfg.model['name']!r}: {detail}")
            try:
                # Each whole tensor is read, cut to this rank's shard and dropped (FSDP), or kept whole.
                self.model.load_state_dict({k: D.shard_like(saved.get(f"model/{k}").to(self.device), own[k]) for k in own})
            except (RuntimeError, KeyError, ValueError) as exc:
                raise DubokoError(f"{out / ckpt.STATE_FILE} does not fit model {self.cfg.model['name']!r}: "
                                  f"{str(exc).splitlines()[0]}") from exc
            params = [p for group in self.optimizer.param_groups for p in group["params"]]

            def optim_value(name: str) -> torch.Tensor:
                value = saved.get(name).to(self.device)
                idx = int(name.split("/")[1])
                return D.shard_like(value, params[idx]) if idx < len(params) and value.dim() > 0 else value

            optim = {n: optim_value(n) for n in sorted(names) if n.startswith("optim/")}
            self.optimizer.load_state_dict(ckpt.optimizer_state_from_flat(self.optimizer, optim, meta["optimizer"]))
            if self.ema is not None and any(n.startswith("ema/") for n in names):
                self.ema.module.load_state_dict({n[4:]: saved.get(n) for n in names if n.startswith("ema/")})
            rng = saved.rng
        rng_key = f"rng/{self.dist.rank}"
        if rng_key in rng:
            torch.set_rng_state(rng[rng_key])
        else:  # saved on fewer ranks: this rank starts a fresh stream of its own
            seed_everything(derive_seed(tcfg.seed, self.dist.rank))
        ckpt.set_py_rng_state(meta["py_rng"])
        if "rng_cuda/0" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["rng_cuda/0"])
        self.state = TrainState.from_meta(meta)
        st = self.state
        if "samples" in meta:
            # The position in global samples (the same for any world size), in this run's
            # micro-batches (batch_size and grad_accum_steps cannot change on resume).
            if st.samples % self.micro_batch_size:
                raise DubokoError(f"the saved position ({st.samples} samples into epoch {st.epoch + 1}) is not a whole "
                                  f"number of micro-batches of {self.micro_batch_size}")
            st.batch = st.samples // self.micro_batch_size
        if not self.is_main:
            # The saved running sums are all ranks' totals: rank 0 carries them on, the others
            # start from zero, so the epoch-end all-reduce counts each sample once for any M.
            st.sums = {k: 0.0 for k in st.sums}
        if self.finished:
            raise DubokoError(
                f"run {str(out)!r} already finished {st.epoch} epoch(s) ({st.step} steps); "
                "raise train.epochs (or train.max_steps) to train further"
            )
        self._show(f"Resuming {out} at epoch {st.epoch + 1}, batch {st.batch} (step {st.step})")

    # -- the loop --------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        st, max_steps = self.state, self.cfg.train.max_steps
        return st.epoch >= self.epochs or bool(max_steps and st.step >= self.total_steps)

    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA's when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def train_batches(self) -> Iterator[Any]:
        """The rest of the current epoch's batches, from the saved position on."""
        return self.task.train_batches(self.state.epoch, start=self.state.batch)

    def _is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach())
        if self.dist.enabled:  # every rank skips or stops together
            flag = finite.float().reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag[0] > 0
        return bool(finite)

    def _inspect_gradients(self) -> None:
        """Per-layer gradient norms, after unscaling and clipping: summed for history.csv
        (train.log_grad_norms) and logged to TensorBoard on logging steps."""
        norms = _grad_norms(self.model, self.dist)
        if self.cfg.train.log_grad_norms:
            for k, v in norms.items():
                self._grad_sums[k] = self._grad_sums.get(k, 0.0) + v
        if self._log_now:
            for k, v in norms.items():
                self.writer.add_scalar(f"grad_norm/{k}", v, self.state.step)

    def step(self, *batches: Any) -> StepOutput | None:
        """One optimizer update on the micro-batches `batches` (one batch without gradient
        accumulation): the scheduled learning rate (it counts optimizer steps), each micro-batch's
        loss under autocast and the non-finite guard, its backward scaled by 1/len(batches) so
        the summed gradient is the mean over the whole batch (micro-batches of equal size), the
        ranks' gradients reduced once, on the last backward (DDP `no_sync`, FSDP
        `set_requires_gradient_sync`), then `optimizer_update` and the running sums. Returns the
        last micro-batch's `StepOutput`, or None for a skipped non-finite step (train.nonfinite = skip)."""
        if not batches:
            raise TypeError("Trainer.step needs at least one batch")
        st, tcfg = self.state, self.cfg.train
        lr = tcfg.lr * lr_factor(tcfg, st.step, self.total_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batches)
        outcomes: list[StepOutput] = []
        for i, batch in enumerate(batches):
            with D.gradient_sync(self.train_model, sync=i == n - 1):
                with autocast(self.device, self.precision):
                    outcome = self.task.training_step(self.train_model, batch)
                loss = outcome.loss
                if not self._is_finite(loss):
                    return self._non_finite(loss, n, i)
                backward(loss / n if n > 1 else loss, self.scaler)
            outcomes.append(outcome)
        log_step = st.step % tcfg.log_every == 0
        self._log_now = self.writer is not None and log_step
        if self.sharded:  # the norms are a collective: every rank computes them on the same steps
            wants_norms = tcfg.log_grad_norms or (log_step and self.out is not None)
        else:
            wants_norms = tcfg.log_grad_norms or self._log_now
        inspect = self._inspect_gradients if wants_norms else None
        optimizer_update(self.model, self.optimizer, tcfg.grad_clip, scaler=self.scaler, ema=self.ema, inspect=inspect)
        sums = self._epoch_sums
        for outcome in outcomes:
            for k, v in outcome.stats.items():
                v = v.detach().double() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=self.device)
                sums[k] = sums[k] + v if k in sums else v
        st.step += 1
        st.batch += n
        if self._log_now:
            self.writer.add_scalar("train/loss", sum(o.loss.item() for o in outcomes) / n, st.step)
            self.writer.add_scalar("train/lr", lr, st.step)
        return outcomes[-1]

    def _non_finite(self, loss: torch.Tensor, n: int, i: int) -> None:
        """A NaN/inf loss in micro-batch i of n: skip the whole update, or stop with one line."""
        st, tcfg = self.state, self.cfg.train
        if tcfg.nonfinite == "skip":
            st.skipped_steps += 1
            st.batch += n
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.out is None:
            kept = "Nothing was saved (no run folder)"
        elif (self.out / ckpt.STATE_FILE).exists():
            kept = f"The last good checkpoint is kept in {self.out}"
        else:
            kept = "No checkpoint was saved before it (train.checkpoint_every=N saves every N steps)"
        raise DubokoError(
            f"the loss became {loss.item()} at step {st.step + 1} (epoch {st.epoch + 1}, batch {st.batch + i + 1}); "
            f"stopped. {kept}. Lower train.lr, set train.grad_clip, or set train.nonfinite=skip"
        )

    def _running(self, sums: dict[str, float]) -> dict[str, float]:
        """Epoch metrics from summed step statistics: loss = loss_sum / count, key = sum / count."""
        count = max(1.0, sums.get("count", 1.0))
        metrics = {"loss": sums.get("loss_sum", float("nan")) / count}
        metrics.update({k: v / count for k, v in sums.items() if k not in ("loss_sum", "count")})
        return metrics

    def _progress_bar(self):
        stream = self.stream
        tty = hasattr(stream, "isatty") and stream.isatty()
        wanted = self.progress if self.progress is not None else (tty and not self.quiet)
        if not (self.is_main and wanted):
            return None
        if tty:
            from tqdm import tqdm
        else:
            from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, initial=math.ceil(self.state.batch / self.accum), leave=False, dynamic_ncols=True, file=stream,
                    desc=f"Epoch {self.state.epoch + 1}/{self.epochs}")

    def _bar_postfix(self, bar) -> None:
        running = self._running({k: v.item() for k, v in self._epoch_sums.items()})
        post = {"loss": f"{running['loss']:.4f}"}
        shown = self.task.shown_metric
        if shown and shown in running:
            value = running[shown]
            post[shown] = f"{value * 100:.2f}%" if shown in self.task.percent_metrics else f"{value:.4f}"
        bar.set_postfix(post)

    def run_epoch(self) -> dict[str, Any]:
        """Train the rest of the current epoch (or up to train.max_steps), validate, log, save;
        returns the epoch's history row."""
        st, tcfg = self.state, self.cfg.train
        epoch = st.epoch
        self.model.train()
        self._epoch_sums = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in st.sums.items()}
        self._grad_sums = dict(st.grad_sums)
        bar = self._progress_bar()
        t_epoch = time.perf_counter()
        reached_max = False
        for group in _micro_groups(self.train_batches(), self.accum):
            if self.step(*group) is None:
                continue
            if bar is not None:
                bar.update(1)
                if st.step % 10 == 0 or st.batch == self.batches_per_epoch:
                    self._bar_postfix(bar)
            if tcfg.checkpoint_every and st.step % tcfg.checkpoint_every == 0:
                now = time.perf_counter()
                st.epoch_seconds += now - t_epoch
                st.train_seconds += now - t_epoch
                t_epoch = now
                self.save(finished_epoch=False)
            if tcfg.max_steps and st.step >= self.total_steps:
                reached_max = True
                break
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t_epoch
        st.train_seconds += seconds
        epoch_seconds = st.epoch_seconds + seconds
        totals = {k: v.item() for k, v in D.all_reduce_sum(self._epoch_sums, self.dist).items()}
        train_metrics = self._running(totals)
        # A run stopped by max_steps inside an epoch keeps its place in it, so that a resume
        # with more steps continues the same epoch; its history row has a fractional epoch.
        partial = reached_max and st.batch < self.batches_per_epoch
        shown_epoch = round(epoch + st.batch / self.batches_per_epoch, 4) if partial else epoch + 1
        row: dict[str, Any] = {"epoch": shown_epoch, "step": st.step}
        row.update({f"train_{k}": v for k, v in train_metrics.items()})
        val: dict[str, float] = {}
        if (epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == self.epochs or reached_max:
            val = self.evaluate("val")
        row.update({f"val_{k}": v for k, v in val.items()})
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["seconds"] = epoch_seconds
        if tcfg.log_grad_norms:
            n_steps = max(1, math.ceil(st.batch / self.accum))
            row.update({f"grad_norm_{k}": v / n_steps for k, v in self._grad_sums.items()})
        plain = self._gathered_model()  # a collective under FSDP
        if self.is_main:
            row.update(self.task.epoch_end(plain, epoch + 1, self.out) or {})
            self.model.train()
        st.history.append(row)
        self._show(summary_line(shown_epoch, train_metrics, val, epoch_seconds, self.task.shown_metric,
                                self.task.percent_metrics))
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"epoch/{k}", v, epoch + 1)
        if partial:
            st.sums = {k: v.item() for k, v in self._epoch_sums.items()}
            st.grad_sums = dict(self._grad_sums)
            st.epoch_seconds = epoch_seconds
        else:
            st.epoch, st.batch, st.sums, st.grad_sums, st.epoch_seconds = epoch + 1, 0, {}, {}, 0.0
        if self.out is not None and self.is_main:
            write_history(self.out, st.history)
            if ckpt.trainer_layout(self) == "full":  # sharded: `save` writes the weights' shards
                save_weights(self.out, plain, self.cfg)
        self.save(finished_epoch=not partial)
        return row

    def _gathered_model(self) -> nn.Module | None:
        """The evaluated weights as a plain module for the main rank's own work (samples,
        model.safetensors, reports). Under FSDP the shards are gathered (every rank must call
        this) into an unsharded copy on rank 0 (None elsewhere); otherwise `eval_model()`."""
        ckpt.trainer_layout(self)  # decided before run_epoch writes (or, sharded, skips) model.safetensors
        if not self.sharded:
            return self.eval_model()
        if self.is_main and self._plain is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                self._plain = self.task.build_model().to(self.device)
        # One tensor at a time into the copy: rank 0 holds the copy plus one whole tensor.
        D.gather_into(self._plain if self.is_main else None, self.model)
        if not self.is_main:
            return None
        return self._plain.eval()

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """The task's metrics on "val" or "test" with the evaluated weights (EMA when on)."""
        was_training = self.model.training
        metrics = self.task.evaluate(self.eval_model(), split)
        if was_training:
            self.model.train()
        return metrics

    def save(self, finished_epoch: bool = False) -> None:
        """Write the training state and the manifest; no-op without a run folder. Inside an epoch
        the running sums (all ranks' totals) are saved with it, so a resume, on any number of
        ranks, continues the epoch. Every rank calls it (it gathers RNG states, the sums and the
        weights). The layout (`train.checkpoint_layout`, see `duboko.train.checkpoint`): "full"
        gathers everything to rank 0, which writes one state.safetensors; "sharded" has each rank
        write the whole tensors it owns (state shards, and at epoch ends the weights'
        model-0000k-of-0000N.safetensors + model.safetensors.index.json), then rank 0 the head."""
        if not finished_epoch and self._epoch_sums:
            totals = D.all_reduce_sum(self._epoch_sums, self.dist)
            self.state.sums = {k: v.item() for k, v in totals.items()}
            self.state.grad_sums = dict(self._grad_sums)
        rank_rng = D.gather_rng(torch.get_rng_state(), self.dist)
        if self.out is None:
            return
        meta = asdict(self.state)
        meta["batch"] = 0 if finished_epoch else self.state.batch
        meta["samples"] = meta["batch"] * self.micro_batch_size
        meta.update(strategy=self.cfg.train.strategy, micro_batch_size=self.micro_batch_size, grad_accum_steps=self.accum)
        layout = ckpt.trainer_layout(self)
        if layout == "sharded":
            # Every rank writes its shards; the weights' at epoch ends (where model.safetensors is due).
            ckpt.save_sharded(self.out, self.dist, model=self.model, optimizer=self.optimizer,
                              ema=self.ema.module if self.ema else None, meta=meta, rank_rng=rank_rng,
                              weights=self.eval_model() if finished_epoch or self.finished else None,
                              model_config=self.cfg.model)
        else:
            model_state = D.full_model_state(self.model)  # collectives under FSDP
            optim_state = D.full_optimizer_state(self.model, self.optimizer)
            if self.is_main:
                ckpt.save_state(self.out, model=model_state, optimizer=optim_state,
                                ema=self.ema.module if self.ema else None, meta=meta, rank_rng=rank_rng)
                ckpt.remove_sharded_leftovers(self.out)
        if self.is_main:
            # The sharded layout's files are assets too, so that any later
            # `write_manifest(out, self.assets)` (finish) still lists them.
            self.assets = [a for a in self.assets if not ckpt.is_layout_file(a)] + ckpt.layout_files(self.out)
            write_manifest(self.out, self.assets)
            if self._overwritten is not None:
                self._commit_overwrite()
        if layout == "sharded":
            D.barrier(self.dist)  # no rank runs ahead of the head and manifest (a resume reads them)

    def _commit_overwrite(self) -> None:
        """`--overwrite`, right after the new run's first checkpoint (state and manifest): the new
        run has replaced the old one, whose set-aside copy goes now. Kept until `close`, it sat
        beside every later checkpoint and the finish, whose files are newer than the manifest
        until the manifest follows: a SIGKILL there left a leftover beside a folder that does not
        verify. After this point a kill leaves a plain killed run (`--resume` finishes it)."""
        import shutil

        backup, self._overwritten = self._overwritten, None
        shutil.rmtree(backup, ignore_errors=True)  # what a kill leaves of it, the next lock removes

    def fit(self) -> dict[str, Any]:
        """Train to the end (train.epochs or train.max_steps); returns the final metrics, which
        are also written to metrics.json."""
        try:
            self._show(self._banner())
            while not self.finished:
                self.run_epoch()
            return self.finish()
        finally:
            self.close()

    def _banner(self) -> str:
        tcfg, dist = self.cfg.train, self.dist
        ranks = f" × {dist.world_size} ranks ({tcfg.strategy})" if dist.enabled else ""
        where = f" -> {self.out}" if self.out is not None else ""
        if self.accum > 1:
            batch = (f"effective batch {tcfg.batch_size} = {self.accum} micro-batches of {self.micro_batch_size} "
                     f"(per rank {math.ceil(self.micro_batch_size / dist.world_size)})")
        else:
            batch = f"batch {tcfg.batch_size} (per rank {math.ceil(tcfg.batch_size / dist.world_size)})"
        shard = f", {self.local_parameters:,} parameters on this rank" if self.sharded else ""
        return (f"{self.cfg.recipe}: {self.cfg.model['name']} ({self.parameters:,} parameters{shard}) on {self.device} ({hardware_features(self.device)}){ranks}, "
                f"{self.precision}, {batch}, lr {tcfg.lr:g}, {self.epochs} epoch(s) × {self.steps_per_epoch} steps{where}")

    @property
    def local_parameters(self) -> int:
        """Parameters this rank holds (its shards under FSDP)."""
        return D.local_parameter_count(self.model)

    def finish(self) -> dict[str, Any]:
        """The final metrics: the last validation row, the task's `final_metrics`, timings and
        the run's facts; written with the manifest, and the task's report printed."""
        st = self.state
        metrics: dict[str, Any] = {}
        # DDP keeps replicas identical by construction; check it (bit-exact digest, all-gathered).
        # FSDP ranks hold different shards by design: each one's count is recorded instead.
        in_sync = D.params_in_sync(self.model, self.dist, self.device) if self.dist.enabled and not self.sharded else None
        per_rank = D.all_gather_int(self.local_parameters, self.dist, self.device)
        plain = self._gathered_model()
        if self.is_main:
            evaluation = self.task.final_metrics(plain, self.out, st.history)
            last = st.history[-1] if st.history else {}
            metrics = {k: v for k, v in last.items() if k.startswith("val_")}
            metrics.update(evaluation.metrics)
            metrics.update({
                "train_seconds": st.train_seconds,
                "wall_seconds": time.perf_counter() - self.wall_start,
                "epochs": st.epoch,
                "steps": st.step,
                "parameters": self.parameters,
                "world_size": self.dist.world_size,
                "global_batch_size": self.cfg.train.batch_size,
                "grad_accum_steps": self.accum,
                "micro_batch_size": self.micro_batch_size,
                "strategy": self.cfg.train.strategy,
                "parameters_per_rank": per_rank,
                "precision": self.precision,
                "skipped_steps": st.skipped_steps,
            })
            if in_sync is not None:
                metrics["ranks_in_sync"] = in_sync
                if not in_sync:
                    print(f"duboko: warning: the {self.dist.world_size} ranks ended with different weights", file=sys.stderr)
            if self.out is not None:
                atomic_write_json(self.out / METRICS, metrics)
                if self.cfg.train.report:  # report.html and MODEL_CARD.md, for people
                    write_report(self.out, plain, self.task)
                    write_model_card(self.out)
                write_manifest(self.out, self.assets)
            if evaluation.report:
                self._show("\n" + evaluation.report)
            if self.out is not None:
                self._show(f"Run folder: {self.out}  (train {st.train_seconds:.1f}s, wall {metrics['wall_seconds']:.1f}s)")
        D.barrier(self.dist)
        return metrics

    def close(self) -> None:
        """Close TensorBoard, release the run folder's lock (removing the folder again if this
        run created it and wrote nothing) and leave the process group (safe to call twice)."""
        try:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        finally:
            if self._overwritten is not None and self.out is not None:
                backup, self._overwritten = self._overwritten, None
                if settle_overwrite(self.out, backup) == "restored":
                    self._show(f"The new run stopped before its first checkpoint: the previous run in {self.out} "
                               "is back as it was (--overwrite replaces it only once the new run has a checkpoint)")
            if self.lock is not None:
                self.lock.release()
                self.lock = None
                if self._created_out and self.out is not None and self.out.is_dir() and not any(self.out.iterdir()):
                    self.out.rmdir()
            D.shutdown(self.dist)

    def _show(self, text: str) -> None:
        if self.is_main and not self.quiet:
            print(text, file=self.stream, flush=True)


def _micro_groups(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of `size` micro-batches (the last group of an epoch may be shorter):
    one optimizer step each."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def fit(
    cfg: C.RunConfig,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    stream=None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train `cfg` into the run folder `out_dir`; returns the final metrics (also in metrics.json)."""
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, quiet=quiet, stream=stream, progress=progress).fit()
