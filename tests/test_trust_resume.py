"""Exact resume after SIGKILL: a run killed 5 times (inside training steps and inside checkpoint
writes) and resumed each time with `duboko train --resume RUN` ends bit-identical on CPU to an
uninterrupted run.

Each interrupted process runs the real CLI under a small wrapper (written below) that sends
SIGKILL to its own process at a precise moment chosen by a seeded RNG:
  step    inside the training step of optimizer step T (after the forward pass, before the update)
  write   inside the atomic write of state.safetensors at the first checkpoint at/after step T:
          the temporary file holds only a random fraction of the bytes when the process dies
  rename  right after state.safetensors was renamed into place, before manifest.json is rewritten
  weights inside the write of model.safetensors at the first epoch end at/after step T
A self-inflicted SIGKILL is the same signal an OOM killer or `kill -9` sends: no handler, no
cleanup, no flush. Killing from the outside at a wall-clock time would mostly land in interpreter
start-up; the wrapper makes the 5 moments land where they matter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duboko.cli.main import main
from duboko.io import load_tensors
from duboko.train import checkpoint as ckpt
from duboko.train.run import read_history

EPOCHS, STEPS_PER_EPOCH, CKPT_EVERY = 2, 16, 3
TOTAL = EPOCHS * STEPS_PER_EPOCH
SMALL = [
    "--set", "data.image_size=16", "--set", "model.image_size=16", "--set", "data.limit_train=256",
    "--set", "data.limit_test=100", "--set", "train.num_threads=1", "--set", f"epochs={EPOCHS}",
    "--set", "batch_size=16", "--set", f"train.checkpoint_every={CKPT_EVERY}",
    # dropout stays on (0.5): its RNG stream must also be restored exactly.
]

WRAPPER = r'''
import os, signal, sys
from pathlib import Path

kind, at, frac, step0 = os.environ["FAULT_KIND"], int(os.environ["FAULT_AT"]), float(os.environ["FAULT_FRAC"]), int(os.environ["FAULT_STEP0"])
calls = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

from duboko.tasks.image_classification import ImageClassificationTask
_step = ImageClassificationTask.training_step
def training_step(self, model, batch):
    global calls
    calls += 1
    out = _step(self, model, batch)
    if kind == "step" and step0 + calls == at:
        die()  # after the forward pass of step `at`, before backward and the optimizer update
    return out
ImageClassificationTask.training_step = training_step

_target = {"write": "state.safetensors", "weights": "model.safetensors"}.get(kind)
_fsync, _replace = os.fsync, os.replace
def fsync(fd):
    # Called by duboko.io.atomic_write_bytes after writing the temporary file, before the rename.
    name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
    if _target and step0 + calls >= at and name.startswith(f".{_target}."):
        size = os.fstat(fd).st_size
        os.ftruncate(fd, int(size * frac))  # the bytes written so far when the kill lands
        die()
    return _fsync(fd)
def replace(src, dst):
    _replace(src, dst)
    if kind == "rename" and step0 + calls >= at and Path(dst).name == "state.safetensors":
        die()  # new state in place, manifest.json not yet rewritten
os.fsync, os.replace = fsync, replace

from duboko.cli.main import main
sys.exit(main(sys.argv[1:]))
'''


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _saved_step(run: Path) -> int:
    if not (run / ckpt.STATE_FILE).exists():
        return 0
    return int(ckpt.load_state(run, torch.device("cpu"))[1]["step"])


@pytest.mark.slow
def test_sigkill_five_times_then_resume_is_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    wrapper = tmp_path / "fault_wrapper.py"
    wrapper.write_text(WRAPPER)

    # The uninterrupted reference (in this process: same code, same thread count).
    assert main(["train", "mnist-cnn", "--out", str(ref), "--quiet", *SMALL]) == 0
    assert json.loads((ref / "metrics.json").read_text())["steps"] == TOTAL

    rng = random.Random(20261127)
    kinds = ["step", "step", "write", "rename", "weights"]
    rng.shuffle(kinds)
    log = []
    mid_epoch_resumes = 0
    for i, kind in enumerate(kinds):
        step0 = _saved_step(run)
        # The first kill comes after the first checkpoint (before it there is nothing to resume).
        low = max(step0 + 1, CKPT_EVERY + 1 if i == 0 else 1)
        at = rng.randint(low, min(TOTAL - 1, low + 8))
        frac = round(rng.uniform(0.05, 0.95), 3)
        args = ["train", "--resume", str(run)] if i else ["train", "mnist-cnn", "--out", str(run), *SMALL]
        env = _env(FAULT_KIND=kind, FAULT_AT=str(at), FAULT_FRAC=str(frac), FAULT_STEP0=str(step0))
        proc = subprocess.run([sys.executable, str(wrapper), *args, "--quiet"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (kind, at, proc.returncode, proc.stderr[-2000:])
        # The checkpoint in place is always whole: it loads, and it never goes backwards (nor, for a
        # kill inside step `at`, holds that step).
        tensors, meta = ckpt.load_state(run, torch.device("cpu"))
        assert step0 <= meta["step"] <= (at - 1 if kind == "step" else TOTAL)
        if 0 < meta["batch"] < STEPS_PER_EPOCH:
            mid_epoch_resumes += 1
        log.append((kind, at, frac, meta["step"]))

    print("kills (kind, step, fraction written, step resumed from):", log)
    assert mid_epoch_resumes >= 2, log  # resume really continues inside an epoch
    proc = subprocess.run([sys.executable, "-m", "duboko", "train", "--resume", str(run), "--quiet"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Final weights and the whole training state are bit-identical to the uninterrupted run.
    a, b = load_tensors(ref / "model.safetensors"), load_tensors(run / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), log
    sa, sb = ckpt.load_state(ref, torch.device("cpu"))[0], ckpt.load_state(run, torch.device("cpu"))[0]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("rng")), log
    ma, mb = json.loads((ref / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert mb["steps"] == ma["steps"] == TOTAL and mb["epochs"] == EPOCHS
    assert mb["test_loss"] == ma["test_loss"] and mb["test_accuracy"] == ma["test_accuracy"]
    # Per-epoch history (running train loss over the epoch, restored from the checkpoints) matches.
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_history(run)) == strip(read_history(ref))
    # Temporary files of the killed writes were cleaned up by the resume.
    assert not list(run.glob(".*.tmp")), sorted(p.name for p in run.iterdir())
    # The manifest was rewritten at the end, so the resumed folder verifies.
    assert main(["verify", str(run)]) == 0


@pytest.mark.slow
def test_kill_before_first_checkpoint_then_resume_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    wrapper = tmp_path / "fault_wrapper.py"
    wrapper.write_text(WRAPPER)
    env = _env(FAULT_KIND="step", FAULT_AT="1", FAULT_FRAC="0.5", FAULT_STEP0="0")
    proc = subprocess.run([sys.executable, str(wrapper), "train", "mnist-cnn", "--out", str(run), "--quiet", *SMALL],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("duboko: error: cannot resume") and "state.safetensors" in err[0]


class Crash(BaseException):
    """An in-process crash (not an Exception, so nothing on the way catches it)."""


def test_crash_and_resume_restores_ema_schedule_and_clipping(tmp_path, monkeypatch):
    """In-process complement of the SIGKILL test with more state to restore: EMA weights, a
    step-dependent cosine schedule with warm-up, gradient clipping and dropout. The run crashes
    twice (mid-epoch 1 and mid-epoch 2) and is resumed; everything ends bit-identical."""
    from duboko.tasks.image_classification import ImageClassificationTask

    args = [
        "--set", "data.image_size=16", "--set", "model.image_size=16", "--set", "data.limit_train=128",
        "--set", "data.limit_test=50", "--set", "train.num_threads=1", "--set", "epochs=2", "--set", "batch_size=16",
        "--set", "train.checkpoint_every=3", "--set", "train.ema_decay=0.9", "--set", "train.schedule=cosine",
        "--set", "train.warmup_steps=4", "--set", "train.grad_clip=0.5", "--quiet",
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", "mnist-cnn", "--out", str(ref), *args]) == 0

    original = ImageClassificationTask.training_step
    for crash_at, argv in ((5, ["train", "mnist-cnn", "--out", str(run), *args]), (13, ["train", "--resume", str(run), "--quiet"])):
        calls = {"n": _saved_step(run)}

        def step(self, model, batch, crash_at=crash_at, calls=calls):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash()
            return original(self, model, batch)

        monkeypatch.setattr(ImageClassificationTask, "training_step", step)
        with pytest.raises(Crash):
            main(argv)
        assert 0 < _saved_step(run) < crash_at
    monkeypatch.setattr(ImageClassificationTask, "training_step", original)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0

    sa, sb = ckpt.load_state(ref, torch.device("cpu"))[0], ckpt.load_state(run, torch.device("cpu"))[0]
    assert any(k.startswith("ema/") for k in sa) and sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("rng"))
    a, b = load_tensors(ref / "model.safetensors"), load_tensors(run / "model.safetensors")  # EMA weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_history(run)) == strip(read_history(ref))
