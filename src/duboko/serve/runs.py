"""The run folders a server may show: found by scanning its roots, looked up by name.

A request names a run ("cnn", "sweep/lr-3"); the name is looked up in the table of the last scan,
never joined onto a path, so `../`, absolute paths and the like simply name no run. A folder (or
any file in it) that is a symlink resolving outside its root is not listed, so it cannot be served.

Models load lazily, once per run (`duboko.api.Run`, through `train.run.load_run`: the manifest is
verified before anything is parsed, safetensors only), and each run has one generation slot: a
lock with a bounded queue of waiting requests (the CPU does one thing at a time well anyway).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duboko.errors import DubokoError

# What makes a folder a run folder (train/run.py writes both).
RUN_MARKERS = ("config.json", "manifest.json")
# Bounds of a scan: how deep below a root, and how many runs at most.
MAX_DEPTH = 4
MAX_RUNS = 500
# An unknown name re-scans the roots (a run trained since), at most this often.
RESCAN_SECONDS = 1.0

# The task of a run -> the page's panel for it.
PANELS = {
    "image-classification": "classifier",
    "language-model": "language-model",
    "seq2seq": "seq2seq",
    "diffusion": "diffusion",
    "ldm": "diffusion",  # latent diffusion: the same generate / condition_for interface
    "adversarial": "classifier",  # image classifiers trained adversarially or on poisoned data
    "backdoor": "classifier",
}


class ServeError(Exception):
    """A request the server refuses: `status` (4xx/5xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _stays_inside(folder: Path, real_root: Path) -> bool:
    """The folder and every entry in it resolve inside `real_root` (no symlink out)."""
    if not _inside(folder.resolve(), real_root):
        return False
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    for entry in entries:
        if entry.is_symlink() and not _inside(Path(entry.path).resolve(), real_root):
            return False
    return True


def _is_run(folder: Path) -> bool:
    return all((folder / m).is_file() for m in RUN_MARKERS)


def scan_roots(roots: list[Path]) -> dict[str, Path]:
    """{run name: real folder} for every run folder under `roots` (a root may itself be a run).
    Names are paths relative to their root (the root's own name for a root that is a run);
    a name found under two roots gets the second root's name as a prefix."""
    found: dict[str, Path] = {}
    for root in roots:
        real_root = Path(root).resolve()
        if not real_root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(real_root, followlinks=False):
            here = Path(dirpath)
            depth = len(here.relative_to(real_root).parts)
            # os.walk does not descend into symlinked folders; a link that stays inside is a run too.
            linked = [here / d for d in dirnames if (here / d).is_symlink()]
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink()
                                 and depth < MAX_DEPTH)
            for folder in [here, *linked]:
                if not _is_run(folder) or not _stays_inside(folder, real_root):
                    continue
                rel = folder.relative_to(real_root).as_posix()
                name = real_root.name if rel == "." else rel
                if name in found:
                    name = f"{real_root.name}/{name}"
                if name not in found and len(found) < MAX_RUNS:
                    found[name] = folder.resolve()
            if _is_run(here):
                dirnames[:] = []  # a run's own subfolders (samples/, tb/) hold no runs
    return dict(sorted(found.items()))


@dataclass
class Slot:
    """One run's loaded model and its generation lock with a bounded queue."""

    run: Any  # duboko.api.Run
    max_waiting: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: int = 0
    guard: threading.Lock = field(default_factory=threading.Lock)
    # streamed generations started / stopped by a closed connection; samplings stopped so
    stats: dict = field(default_factory=lambda: {"generations": 0, "cancelled": 0, "samples_cancelled": 0})

    def loaded(self) -> Any:
        """The run's LoadedRun (config, task, model), loaded and verified on first use."""
        with self.load_lock:
            return self.run._load()

    def _join_queue(self) -> None:
        """Count one more waiting request, or refuse it (503) when the queue is full."""
        with self.guard:
            if self.waiting >= self.max_waiting:
                raise ServeError(503, f"this model is busy: {self.waiting} requests already wait (at most "
                                      f"{self.max_waiting}); try again shortly")
            self.waiting += 1

    def _leave_queue(self) -> None:
        with self.guard:
            self.waiting -= 1

    def acquire(self, timeout: float) -> None:
        """Wait for this run's model (one generation at a time); a full queue or a wait past
        `timeout` seconds is a 503 with the reason."""
        self._join_queue()
        try:
            if not self.lock.acquire(timeout=timeout):
                raise ServeError(503, f"this model was busy for {timeout:g} s; try again shortly")
        finally:
            self._leave_queue()

    async def acquire_async(self, timeout: float) -> None:
        """`acquire` without holding a worker thread while waiting (the event loop polls the
        lock), so that requests queued for busy models never starve the thread pool."""
        import asyncio

        self._join_queue()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not self.lock.acquire(blocking=False):
                if loop.time() > deadline:
                    raise ServeError(503, f"this model was busy for {timeout:g} s; try again shortly")
                await asyncio.sleep(0.01)
        finally:
            self._leave_queue()

    def release(self) -> None:
        self.lock.release()


class RunIndex:
    """The roots, their runs by name (re-scanned on request) and the loaded models."""

    def __init__(self, roots: list[str | Path], device: str = "cpu", max_waiting: int = 4):
        self.roots = [Path(r) for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise DubokoError(f"{str(root)!r} is not a folder (expected a folder of run folders, e.g. runs/)")
        self.device = device
        self.max_waiting = max_waiting
        self._runs: dict[str, Path] = {}
        self._scanned = 0.0  # time.monotonic() of the last scan
        self._slots: dict[Path, Slot] = {}  # by real folder
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, Path]:
        runs = scan_roots(self.roots)
        with self._lock:
            self._runs = runs
            self._scanned = time.monotonic()
        return runs

    def path(self, name: Any) -> Path:
        """The folder of the run called `name`, from the table (never joined from the request)."""
        if not isinstance(name, str) or not name:
            raise ServeError(400, "give the run's name as a non-empty string (see GET /api/runs)")
        with self._lock:
            path = self._runs.get(name)
        if path is None and time.monotonic() - self._scanned > RESCAN_SECONDS:  # a run trained since?
            path = self.scan().get(name)
        if path is None:
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise ServeError(404, f"no run named {shown!r} under the served folders (see GET /api/runs)")
        return path

    def slot(self, name: str) -> Slot:
        """The run's slot, one per folder (two names of one folder share its model and lock)."""
        path = self.path(name)
        with self._lock:
            slot = self._slots.get(path)
            if slot is None:
                from duboko.api import Run

                slot = self._slots[path] = Slot(Run(path, device=self.device), self.max_waiting)
        return slot
