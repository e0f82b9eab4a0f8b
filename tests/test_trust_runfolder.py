"""Run folders trusted only once checked (issue 21): the manifest must list every file a load
reads, is checked before config.json is parsed and on `--resume` too; a corrupt saved state or an
unsafe resume override is one line; `--out` never writes into a folder of the user's files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from duboko.cli.main import main
from duboko.io import atomic_write_json, load_tensors, save_tensors
from duboko.train.lock import LOCK_FILE

TINY = ["--set", "train.num_threads=1", "--set", "batch_size=32", "--set", "max_steps=4", "--quiet"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust_runfolder") / "run"
    assert main(["train", "digits", "--out", str(run), *TINY]) == 0
    return run


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _manifest(run: Path) -> dict[str, str]:
    return json.loads((run / "manifest.json").read_text())["sha256"]


def _set_manifest(run: Path, listed: dict[str, str]) -> None:
    atomic_write_json(run / "manifest.json", {"sha256": listed})


def _rehash(run: Path, name: str) -> None:
    listed = _manifest(run)
    listed[name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    _set_manifest(run, listed)


def test_assets_are_listed(run):
    assert "tabular.json" in _manifest(run)


def test_an_empty_manifest_is_refused(run, capsys):
    _set_manifest(run, {})
    assert main(["eval", str(run), "--json"]) == 2
    line = _one_error_line(capsys)
    assert "does not list config.json, model.safetensors" in line


def test_an_unlisted_asset_is_refused(run, capsys):
    listed = _manifest(run)
    del listed["tabular.json"]
    _set_manifest(run, listed)
    assert main(["eval", str(run), "--json"]) == 2
    assert "tabular.json, not listed in manifest.json" in _one_error_line(capsys)
    assert main(["verify", str(run)]) == 2
    assert "tabular.json" in _one_error_line(capsys)


def test_edited_scaler_is_refused(run, capsys):
    assets = json.loads((run / "tabular.json").read_text())
    assets["x_scaler"]["mean"][0] += 1.0
    (run / "tabular.json").write_text(json.dumps(assets))
    assert main(["eval", str(run), "--json"]) == 2
    assert "tabular.json does not match its SHA-256" in _one_error_line(capsys)


def test_config_is_verified_before_it_is_parsed(run, capsys):
    (run / "config.json").write_text("{ not json")
    assert main(["eval", str(run), "--json"]) == 2
    line = _one_error_line(capsys)
    assert "config.json does not match its SHA-256" in line and "not readable JSON" not in line


def test_resume_verifies_the_assets(run, capsys):
    assets = json.loads((run / "tabular.json").read_text())
    assets["x_scaler"]["mean"][0] += 1.0
    (run / "tabular.json").write_text(json.dumps(assets))
    assert main(["train", "--resume", str(run), "--set", "max_steps=8", "--quiet"]) == 2
    assert "tabular.json does not match its SHA-256" in _one_error_line(capsys)
    assert not (run / LOCK_FILE).exists()


def test_resume_verifies_the_state(run, capsys):
    state = bytearray((run / "state.safetensors").read_bytes())
    state[-10] ^= 0x01
    (run / "state.safetensors").write_bytes(bytes(state))
    # As old as the manifest, so it is not the checkpoint of a run killed before its manifest.
    import os

    manifest_stat = (run / "manifest.json").stat()
    os.utime(run / "state.safetensors", ns=(manifest_stat.st_atime_ns, manifest_stat.st_mtime_ns - 10**9))
    assert main(["train", "--resume", str(run), "--set", "max_steps=8", "--quiet"]) == 2
    assert "state.safetensors does not match its SHA-256" in _one_error_line(capsys)


def test_a_negative_saved_step_does_not_resume(run, capsys):
    from safetensors import safe_open

    path = run / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = json.loads(meta["duboko_state"])
    state["step"] = -5
    meta["duboko_state"] = json.dumps(state)
    save_tensors(load_tensors(path), path, metadata=meta)
    _rehash(run, "state.safetensors")  # a consistent folder: the manifest alone cannot see this
    assert main(["train", "--resume", str(run), "--set", "max_steps=8", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "saved training state is corrupt: step -5" in line


def test_resume_refuses_a_model_change(run, capsys):
    assert main(["train", "--resume", str(run), "--set", "hidden_sizes=[32,32]", "--quiet"]) == 2
    assert "hidden_sizes" in _one_error_line(capsys)


def test_out_into_a_folder_of_user_files_is_refused(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "notes.txt", "z.csv"):
        (folder / name).write_text(name)
    before = {p.name: p.read_text() for p in folder.iterdir()}
    assert main(["train", "digits", "--out", str(folder), *TINY]) == 2
    line = _one_error_line(capsys)
    assert "not empty and not a run folder" in line and "a.jpg, b.jpg, notes.txt and 1 more" in line
    assert {p.name: p.read_text() for p in folder.iterdir()} == before


def test_out_into_an_empty_folder_works(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert main(["train", "digits", "--out", str(folder), *TINY]) == 0
    assert main(["verify", str(folder)]) == 0


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "tb" not in p.parts}


def test_overwrite_that_fails_before_a_checkpoint_keeps_the_old_run(run, capsys):
    before = _tree(run)
    # lr=1e6: the loss is non-finite at the first steps, before any checkpoint of the new run.
    assert main(["train", "digits", "--out", str(run), "--overwrite", *TINY, "--set", "lr=1e30",
                 "--set", "seed=5"]) == 2
    line = _one_error_line(capsys)
    assert "No checkpoint was saved" in line and "last good checkpoint is kept" not in line
    assert _tree(run) == before  # the old run, whole
    assert not _leftovers(run)
    assert main(["verify", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--set", "max_steps=6", "--quiet"]) == 0  # and resumable


def test_overwrite_that_succeeds_replaces_the_old_run(run, capsys):
    assert main(["train", "digits", "--out", str(run), "--overwrite", *TINY, "--set", "seed=7"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 7
    assert main(["verify", str(run)]) == 0
    assert not _leftovers(run)


# A SIGKILL during `--overwrite` (no `finally` runs) leaves the old run set aside beside the run
# folder: in `.NAME.overwriting-PID` while it is being moved aside (or back), in
# `.NAME.overwritten-PID` once it is all there; the engine deletes it at the new run's first
# checkpoint. The next command that takes the run folder's lock, or `verify`, settles a leftover.

# The new run of the real-process tests: batch 1 and a wide MLP make each epoch tens of
# thousands of steps' worth of seconds, so that a kill just after a file appears lands well
# before the next checkpoint, on a fast machine too.
SLOW_NEW_RUN = ["--set", "train.num_threads=1", "--set", "batch_size=1", "--set", "hidden_sizes=[1024,1024]",
                "--set", "max_steps=100000", "--set", "checkpoint_every=0", "--quiet"]


def _leftovers(run: Path) -> list[Path]:
    return sorted(run.parent.glob(f".{run.name}.overwrit*-*"))


def _kill_overwrite_when(run: Path, ready, delay: float = 0.0) -> None:
    """Start `duboko train --overwrite` into `run` and SIGKILL it once `ready()` holds (then `delay`)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "duboko", "train", "digits", "--out", str(run), "--overwrite",
                             *SLOW_NEW_RUN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def _verify(run: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["verify", str(run)])
    return rc, capsys.readouterr().err


def test_sigkill_during_overwrite_is_settled_by_the_next_verify(run, capsys):
    before = _tree(run)
    set_aside = lambda: bool(list(run.parent.glob(".run.overwritten-*")))  # noqa: E731
    # Killed in the new run's first epoch: the set-aside is complete, its config.json and assets are written.
    _kill_overwrite_when(run, lambda: set_aside() and (run / "config.json").exists() and (run / "tabular.json").exists(),
                         delay=0.1)
    if not _leftovers(run):
        pytest.skip("the new run finished or failed before it could be killed mid-overwrite (a very slow machine)")
    rc, err = _verify(run, capsys)
    assert rc == 0, err
    # Where the kill lands is up to the machine's speed: before the new run's first checkpoint
    # the old run comes back whole; between that checkpoint and the engine deleting the set-aside,
    # the new run is kept and the old one removed. Either way the folder verifies and nothing is
    # left beside it. (Each kill point, deterministic: the test_killed_* tests below.)
    if "put back the previous run" in err:
        assert _tree(run) == before  # the old run, whole again
    else:
        assert "removed .run.overwritten-" in err and "has its own checkpoint" in err, err
        assert _tree(run) != before  # the new run's checkpoint, verified above
    assert not _leftovers(run)


def test_sigkill_after_the_first_checkpoint_of_an_overwrite_keeps_the_new_run(run, capsys):
    # The window of the flaky failure: with the set-aside kept until the run's end, a kill while a
    # later checkpoint (or the finish) rewrote its files left it beside a folder that did not
    # verify, and `verify` deleted the old run. Now it is gone at the first checkpoint.
    before = _tree(run)
    seen_aside = []

    def first_checkpoint_written() -> bool:
        seen_aside.append(bool(list(run.parent.glob(".run.overwritten-*"))))
        return any(seen_aside) and (run / "manifest.json").exists()

    _kill_overwrite_when(run, first_checkpoint_written)
    if not any(seen_aside) or not (run / "manifest.json").exists():
        pytest.skip("the new run stopped before its first checkpoint (a very slow machine)")
    rc, err = _verify(run, capsys)
    assert rc == 0, err
    assert "put back" not in err, err
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 1  # the new run
    assert _tree(run) != before and not _leftovers(run)


def _set_aside(run: Path, names, infix: str = ".overwritten-") -> Path:
    """What `set_aside_old_run` does, up to `names`: move them into the set-aside folder."""
    backup = run.parent / f".run{infix}4242"
    backup.mkdir()
    for name in names:
        (run / name).rename(backup / name)
    return backup


def _old_run_whole(run: Path, before: dict[str, bytes]) -> None:
    assert _tree(run) == before
    assert list((run / "tb").iterdir())  # TensorBoard's log, not compared by _tree, came back too
    assert not _leftovers(run)


@pytest.mark.parametrize("moved", ["none", "unlisted only", "three", "all but the manifest"])
def test_killed_while_the_old_run_is_set_aside_puts_it_back(run, capsys, moved):
    import os
    import time

    before = _tree(run)
    names = sorted(p.name for p in run.iterdir() if p.name != LOCK_FILE)
    unlisted = [n for n in names if n not in _manifest(run) and n != "manifest.json"]
    chosen = {"none": [], "unlisted only": unlisted, "three": names[:3],
              "all but the manifest": [n for n in names if n != "manifest.json"]}[moved]
    backup = _set_aside(run, chosen, ".overwriting-")
    # The old files still in the run folder are newer than the set-aside here: which file is
    # whose follows from the folder's name, not from times (a half-moved set-aside, with the
    # unlisted files alone moved, once looked like a run folder with a checkpoint of its own, and
    # its set-aside part, plots and logs, was deleted).
    later = time.time_ns() + 10**9
    for p in run.iterdir():
        os.utime(p, ns=(later, later))
    rc, err = _verify(run, capsys)
    assert rc == 0, err
    assert "put back the previous run" in err and backup.name in err, err
    _old_run_whole(run, before)


def _write_new(run: Path, names) -> None:
    """The new run's files, written after the set-aside (contents that are not the old run's)."""
    for name in names:
        path = run / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"new run: " + name.encode())


NEW_RUN_STAGES = {
    "nothing yet": [],
    "inside config.json's atomic write": [".config.json.k2j4x8q1.tmp"],
    "config and assets": ["config.json", "tabular.json"],
    "mid first checkpoint": ["config.json", "tabular.json", "tb/events.out.tfevents.1.new", "samples.png",
                             "history.csv", "model.safetensors"],
    "before the manifest's rename": ["config.json", "tabular.json", "tb/events.out.tfevents.1.new", "history.csv",
                                     "model.safetensors", "state.safetensors", ".manifest.json.z81h3m0c.tmp"],
    # A put-back killed while it removed the new run's files (the manifest goes first).
    "put-back half-way": ["tabular.json", "state.safetensors"],
}


@pytest.mark.parametrize("stage", list(NEW_RUN_STAGES))
def test_killed_before_the_new_runs_first_checkpoint_puts_the_old_run_back(run, capsys, stage):
    before = _tree(run)
    backup = _set_aside(run, sorted(p.name for p in run.iterdir() if p.name != LOCK_FILE))
    _write_new(run, NEW_RUN_STAGES[stage])
    rc, err = _verify(run, capsys)
    assert rc == 0, err
    assert "put back the previous run" in err and backup.name in err, err
    _old_run_whole(run, before)


class _Killed(BaseException):
    """A SIGKILL stand-in: no `except OSError` or `except Exception` sees it, no clean-up runs."""


def _kill_at(monkeypatch, method: str, after: int) -> None:
    """Make the `after`+1-th call of Path.<method> "kill" the process."""
    real = getattr(Path, method)
    calls = []

    def killing(self, *args, **kwargs):
        if len(calls) == after:
            raise _Killed
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, killing)


@pytest.mark.parametrize("renamed", [0, 3, "all"])
def test_real_set_aside_killed_half_way_is_put_back(run, capsys, monkeypatch, renamed):
    import os

    from duboko.train.engine import set_aside_old_run

    before = _tree(run)
    entries = len([p for p in run.iterdir() if p.name != LOCK_FILE])
    # "all": every file moved, killed at the rename that marks the set-aside complete.
    _kill_at(monkeypatch, "rename", entries if renamed == "all" else renamed)
    with pytest.raises(_Killed):
        set_aside_old_run(run)
    monkeypatch.undo()
    assert [p.name for p in _leftovers(run)] == [f".run.overwriting-{os.getpid()}"]
    rc, err = _verify(run, capsys)
    assert rc == 0, err
    assert "put back the previous run" in err, err
    _old_run_whole(run, before)


@pytest.mark.parametrize("kill", [("unlink", 0), ("unlink", 2), ("rename", 0), ("rename", 3)])
def test_real_put_back_killed_half_way_is_finished(run, capsys, monkeypatch, kill):
    # The live run's own put-back (it stopped before its first checkpoint, here with its state
    # written and not its manifest), killed while it removed the new run's files, or at the
    # rename that marks them gone, or while it moved the old run back.
    from duboko.train.engine import set_aside_old_run, settle_overwrite

    before = _tree(run)
    backup = set_aside_old_run(run)
    _write_new(run, NEW_RUN_STAGES["before the manifest's rename"])
    _kill_at(monkeypatch, *kill)
    with pytest.raises(_Killed):
        settle_overwrite(run, backup)
    monkeypatch.undo()
    assert len(_leftovers(run)) == 1
    rc, err = _verify(run, capsys)
    assert rc == 0, err
    assert "put back the previous run" in err, err
    _old_run_whole(run, before)

@pytest.mark.parametrize("removed", [0, 3, "all"])
def test_killed_after_the_new_runs_first_checkpoint_keeps_it(run, trained, capsys, removed):
    # The new run's first checkpoint is written; the kill landed before (or while) the engine
    # deleted the set-aside old run.
    before = _tree(run)
    backup = run.parent / ".run.overwritten-4242"
    shutil.copytree(trained, backup)
    (backup / "old-run-only.txt").write_text("old")
    doomed = sorted(backup.iterdir())
    for p in doomed[: len(doomed) if removed == "all" else removed]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    rc, err = _verify(run, capsys)
    assert rc == 0, err
    assert "removed .run.overwritten-4242" in err and "has its own checkpoint" in err, err
    assert _tree(run) == before and not _leftovers(run)


def test_overwrite_deletes_the_set_aside_at_the_first_checkpoint(run, capsys):
    # In process, the states a SIGKILL would find: before the first checkpoint the old run is set
    # aside whole; right after it, it is gone and the new run verifies.
    from duboko import config as C
    from duboko.train.engine import Trainer

    before = _tree(run)
    cfg = C.resolve("digits", ["train.num_threads=1", "batch_size=32", "max_steps=4", "seed=9"])
    trainer = Trainer(cfg, run, overwrite=True, quiet=True)
    try:
        (backup,) = _leftovers(run)
        assert backup.name.startswith(".run.overwritten-")  # complete, not `.overwriting-`
        assert _tree(backup) == before
        assert not (run / "manifest.json").exists() and not (run / "state.safetensors").exists()
        trainer.run_epoch()  # the first checkpoint
        assert not _leftovers(run)
        rc, err = _verify(run, capsys)
        assert rc == 0, err
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == 9
    finally:
        trainer.close()
    assert not _leftovers(run)


def _refused_then_resumed(run: Path, capsys, *says: str) -> None:
    """`verify` refuses the killed run with a message holding `says`; a resume (more steps) mends it."""
    rc, err = _verify(run, capsys)
    assert rc == 2
    assert all(text in err for text in says), err
    assert main(["train", "--resume", str(run), "--set", "max_steps=6", "--quiet"]) == 0
    rc, err = _verify(run, capsys)
    assert rc == 0, err


def test_a_run_killed_mid_checkpoint_is_named_so_and_resumes(run, capsys):
    # After the commit a kill is a plain killed run: `verify` refuses files newer than the
    # manifest, and says that a resume finishes the run (this one had finished: more steps).
    (run / "history.csv").write_text((run / "history.csv").read_text() + "\n")  # rewritten after the manifest
    _refused_then_resumed(run, capsys, "history.csv does not match", "`duboko train --resume` finishes it")


def test_a_run_killed_before_its_final_manifest_is_named_so_and_resumes(run, capsys):
    import os

    # Killed in the finish, after metrics.json and before the manifest that lists it.
    listed = _manifest(run)
    del listed["metrics.json"]
    manifest_time = (run / "manifest.json").stat().st_mtime_ns
    _set_manifest(run, listed)
    os.utime(run / "manifest.json", ns=(manifest_time, manifest_time))
    os.utime(run / "metrics.json", ns=(manifest_time + 10**9, manifest_time + 10**9))
    _refused_then_resumed(run, capsys, "metrics.json, not listed", "killed before its manifest was rewritten")


def test_leftover_of_a_finished_overwrite_is_deleted(run, trained, capsys):
    # The new run has its own checkpoint (here: the same trained run), the old one is set aside.
    backup = run.parent / ".run.overwritten-99999"
    shutil.copytree(trained, backup)
    assert main(["train", "--resume", str(run), "--set", "max_steps=5", "--quiet"]) == 0
    assert "removed .run.overwritten-99999" in capsys.readouterr().err
    assert not backup.exists()
    assert main(["verify", str(run)]) == 0


def test_leftover_of_a_half_done_set_aside_is_put_back(run, capsys):
    import os

    before = _tree(run)
    backup = run.parent / ".run.overwritten-4242"
    backup.mkdir()
    moved = sorted(p.name for p in run.iterdir() if p.is_file())[:3]  # killed after moving three files
    for name in moved:
        (run / name).rename(backup / name)
    old = backup.stat().st_mtime_ns - 10**9
    for p in run.iterdir():
        os.utime(p, ns=(old, old))  # the old run's files are older than the set-aside
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    assert "put back the previous run" in capsys.readouterr().err
    assert _tree(run) == before and not backup.exists()


def test_symlinked_leftover_is_never_followed(run, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (run.parent / ".run.overwritten-777").symlink_to(target)
    assert main(["verify", str(run)]) == 0
    assert (target / "keep.txt").read_text() == "mine" and (run.parent / ".run.overwritten-777").is_symlink()
