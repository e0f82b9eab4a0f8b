"""One writer per run folder (`duboko.train.lock`): concurrent `train --out same` used to mix two
runs' files in one folder, and `verify` said ok. Now the second writer gets one line naming the
holder (exit 2), stale locks of dead processes on this host are taken over, another host's never."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.train.lock import LOCK_FILE, RunLock

PYTHON = sys.executable
TINY_DIGITS = ["--set", "train.num_threads=1", "--set", "batch_size=32"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **info) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps(info))
    return path


# A racer imports everything first, then waits for the start signal, so that the eight
# processes reach the lock within milliseconds of each other (not seconds of import time apart).
RACER = textwrap.dedent("""
    import os, sys, time
    import duboko.cli.main as cli
    import duboko.train.engine, duboko.tasks.tabular
    go, ready = sys.argv[1], sys.argv[2]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    sys.exit(cli.main(sys.argv[3:]))
""")


def test_eight_racing_trainers_one_wins(tmp_path):
    run = tmp_path / "run"
    go = tmp_path / "go"
    env = {**os.environ, "DUBOKO_DEBUG": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for seed in range(8):
        argv = ["train", "digits", "--out", str(run), "--quiet", *TINY_DIGITS,
                "--set", "max_steps=60", "--set", f"seed={seed}"]
        ready = tmp_path / f"ready-{seed}"
        procs.append(subprocess.Popen([PYTHON, "-c", RACER, str(go), str(ready), *argv], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # Every racer has imported (2 shared cores: several seconds), then all start at once.
    deadline = time.time() + 300
    while time.time() < deadline and not all((tmp_path / f"ready-{i}").exists() or procs[i].poll() is not None
                                             for i in range(8)):
        time.sleep(0.05)
    go.write_text("go")
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = [rc for rc, _, _ in results]
    assert sorted(codes) == [0] + [2] * 7, results
    winner = codes.index(0)
    for seed, (rc, _, err) in enumerate(results):
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert "is in use by another duboko process" in lines[0] and "pid " in lines[0], lines[0]
    assert main(["verify", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == winner
    assert not (run / LOCK_FILE).exists()


def test_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock.acquire(run, command="duboko train digits --out run"):
        assert main(["train", "digits", "--out", str(run), "--quiet", *TINY_DIGITS, "--set", "max_steps=2"]) == 2
        line = _one_error_line(capsys)
        assert f"pid {os.getpid()}" in line and socket.gethostname() in line and "duboko train digits" in line
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing else was written
    assert not (run / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    _write_lock(run, pid=_dead_pid(), host=socket.gethostname(), started="2026-01-01T00:00:00Z")
    assert main(["train", "digits", "--out", str(run), "--quiet", *TINY_DIGITS, "--set", "max_steps=2"]) == 0
    assert not (run / LOCK_FILE).exists()
    assert main(["verify", str(run)]) == 0


def test_reused_pid_is_stale(tmp_path):
    # Our own pid, but a process start time that is not ours: the pid was reused.
    run = tmp_path / "run"
    _write_lock(run, pid=os.getpid(), host=socket.gethostname(), pid_start=1)
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc: process start times are not available here")
    lock = RunLock.acquire(run)
    assert json.loads((run / LOCK_FILE).read_text())["pid_start"] != 1
    lock.release()


def test_another_hosts_lock_is_never_stolen(tmp_path, capsys):
    run = tmp_path / "run"
    path = _write_lock(run, pid=_dead_pid(), host="other-node-7", started="2026-01-01T00:00:00Z")
    before = path.read_bytes()
    assert main(["train", "digits", "--out", str(run), "--quiet", *TINY_DIGITS, "--set", "max_steps=2"]) == 2
    line = _one_error_line(capsys)
    assert "other-node-7" in line and "another host" in line and f"delete {path}" in line
    assert path.read_bytes() == before


def test_a_lock_being_written_is_not_guessed_at(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("")  # created, content not written yet
    with pytest.raises(DubokoError, match="being locked by another duboko process"):
        RunLock.acquire(run)
    old = time.time() - 3600
    os.utime(run / LOCK_FILE, (old, old))  # a leftover: says which file to delete
    with pytest.raises(DubokoError, match="unreadable lock file .*delete that file"):
        RunLock.acquire(run)


def test_lock_released_when_training_fails(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    # Fails after the lock is taken (the data folder does not exist): nothing stays behind.
    assert main(["train", "mnist-mlp", "--out", str(run), "--data-dir", str(tmp_path / "nodata"), "--quiet"]) == 2
    _one_error_line(capsys)
    assert not run.exists()
    # A failure inside a resume keeps the run and releases its lock.
    assert main(["train", "digits", "--out", str(run), "--quiet", *TINY_DIGITS, "--set", "max_steps=2"]) == 0
    assert main(["train", "--resume", str(run), "--quiet", "--set", "max_steps=2"]) == 2
    assert "already finished" in _one_error_line(capsys)
    assert not (run / LOCK_FILE).exists()


def test_eval_writing_pictures_takes_the_lock(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "digits", "--out", str(run), "--quiet", *TINY_DIGITS, "--set", "max_steps=2"]) == 0
    capsys.readouterr()
    _write_lock(run, pid=1, host="other-node-7")
    assert main(["eval", str(run)]) == 2
    assert "in use by another duboko process" in _one_error_line(capsys)
    assert main(["eval", str(run), "--json"]) == 0  # reading only: no lock needed
    (run / LOCK_FILE).unlink()
    assert main(["eval", str(run)]) == 0
    assert not (run / LOCK_FILE).exists()
