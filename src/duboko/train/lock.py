"""One writer per run folder: an exclusive lock file, `.duboko.lock`, inside the folder.

Two commands writing the same run folder at once mix their files (one run's config.json beside
the other's weights and history, and `verify` says ok), so every command that writes into a run
folder (`train`, `train --resume`, `eval` writing its pictures, ...) holds this lock while it
writes. The lock file is created with `O_CREAT | O_EXCL`, which is atomic on local file systems
and on NFSv3+ (the same primitive as git's `index.lock` and pip's lock files), and holds JSON:
the holder's pid, host name, process start time (Linux boot ticks, to see through pid reuse),
the time the lock was taken and the command.

Stale locks (a holder killed with SIGKILL leaves its lock file behind):
- same host, and that pid is not running (or runs another process since): the lock is stale and
  is taken over, under a second O_EXCL file so that two takers cannot both win;
- another host: never taken over automatically, since duboko cannot see that host's processes
  (a shared file system); the message says which file to delete once nothing there writes it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from duboko.errors import DubokoError

LOCK_FILE = ".duboko.lock"
TAKEOVER_SUFFIX = ".takeover"
# A lock file with no readable content yet is being written by its creator (created, then one
# write); older than this it is a leftover of a crash between the two.
YOUNG_SECONDS = 10.0
MAX_LOCK_BYTES = 4096


def _process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None
    where /proc is not there (macOS) or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _holder_text(info: dict[str, Any]) -> str:
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("started"):
        parts.append(f"since {info['started']}")
    if info.get("command"):
        parts.append(f"`{str(info['command'])[:120]}`")
    return ", ".join(parts)


def _read_info(path: Path) -> dict[str, Any] | None:
    """The lock file's JSON, or None when it is empty or not JSON (being written, or damaged)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        data = os.read(fd, MAX_LOCK_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return info if isinstance(info, dict) else None


class RunLock:
    """The lock of one run folder; `RunLock.acquire(folder)` takes it or raises DubokoError
    naming the holder. `release()` (also on `with` exit) removes it; safe to call twice."""

    def __init__(self, folder: Path, path: Path, info: dict[str, Any]):
        self.folder = folder
        self.path = path
        self.info = info
        self.held = True
        self.recovered: list[str] = []  # what an interrupted --overwrite left, settled on acquire

    @classmethod
    def acquire(cls, folder: str | os.PathLike, command: str | None = None) -> "RunLock":
        folder = Path(folder)
        path = folder / LOCK_FILE
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command if command is not None else " ".join(["duboko", *sys.argv[1:]])[:200],
        }
        taken = cls._create(path, info)
        holder = None
        if not taken:
            holder = _read_info(path)
            taken = cls._is_stale(path, holder) and cls._take_over(path, holder, info)
        if not taken:
            raise DubokoError(cls._busy_message(folder, path, _read_info(path) or holder))
        lock = cls(folder, path, info)
        lock._settle_leftovers()
        return lock

    def _settle_leftovers(self) -> None:
        """Now that no other writer can be at work here: put back (or delete) what an
        `--overwrite` killed with SIGKILL left beside the folder (`recover_interrupted_overwrite`),
        saying so on stderr. A failure releases the lock and is the caller's one-line error."""
        from duboko.train.run import recover_interrupted_overwrite

        try:
            self.recovered = recover_interrupted_overwrite(self.folder)
        except BaseException:
            self.release()
            raise
        for line in self.recovered:
            print(f"duboko: note: {line}", file=sys.stderr)

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _create(path: Path, info: dict[str, Any]) -> bool:
        """Create the lock file with O_EXCL and write `info` into it; False if it exists."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise DubokoError(f"cannot lock run folder {str(path.parent)!r}: {exc.strerror or exc}") from exc
        try:
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _is_stale(path: Path, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return False  # being written right now, or damaged: never guessed at
        if holder.get("host") != socket.gethostname():
            return False  # another machine's processes cannot be seen from here
        pid = holder.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return False
        if not _pid_alive(pid):
            return True
        saved, now = holder.get("pid_start"), _process_start(pid)
        return isinstance(saved, int) and now is not None and now != saved  # the pid was reused

    @classmethod
    def _take_over(cls, path: Path, holder: dict[str, Any], info: dict[str, Any]) -> bool:
        """Replace a stale lock; a second O_EXCL file makes the check-and-replace one writer's."""
        guard = path.with_name(path.name + TAKEOVER_SUFFIX)
        guard_info = {"pid": os.getpid(), "host": info["host"], "pid_start": info["pid_start"]}
        if not cls._create(guard, guard_info):
            # Another process is taking over (or died doing so: then its guard is stale too).
            if not cls._is_stale(guard, _read_info(guard)):
                return False
            guard.unlink(missing_ok=True)
            if not cls._create(guard, guard_info):
                return False
        try:
            if _read_info(path) != holder:  # changed since we looked: someone else took it
                return False
            path.unlink(missing_ok=True)
            return cls._create(path, info)
        finally:
            guard.unlink(missing_ok=True)

    @staticmethod
    def _busy_message(folder: Path, path: Path, holder: dict[str, Any] | None) -> str:
        if holder is None:
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                age = 0.0
            if age < YOUNG_SECONDS:
                return (f"run folder {str(folder)!r} is being locked by another duboko process right now "
                        f"({path}); wait for it to finish")
            return (f"run folder {str(folder)!r} has an unreadable lock file {path}; if no duboko command "
                    "is writing this run folder, delete that file")
        where = _holder_text(holder)
        if holder.get("host") != socket.gethostname():
            return (f"run folder {str(folder)!r} is in use by another duboko process ({where}); it was locked "
                    f"on another host, so duboko never removes the lock itself: if nothing there still "
                    f"writes this run folder, delete {path}")
        return (f"run folder {str(folder)!r} is in use by another duboko process ({where}); wait for it to "
                f"finish, or pick another run folder")

    def release(self) -> None:
        """Remove the lock file if it is still ours (safe to call twice)."""
        if not self.held:
            return
        self.held = False
        if _read_info(self.path) == self.info:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
