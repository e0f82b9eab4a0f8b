"""Stateful testing (hypothesis' RuleBasedStateMachine) of one run folder under random sequences
of commands: train, `--overwrite`, `--resume`, verify, eval, a second writer while the lock is
held, a file corrupted or deleted behind duboko's back.

Invariants after every step: each command exits 0 or 2 (an unexpected exception fails the test:
conftest sets DUBOKO_DEBUG=1), a refusal is one `duboko: error:` line, `verify` is ok exactly
when the folder is untouched since duboko last wrote it, a refused command changes nothing, and
the config in the folder is the last successful writer's. Fresh sequences every run (seed from
DUBOKO_FUZZ_SEED or drawn, printed on failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from duboko.cli.main import main
from duboko.train.lock import LOCK_FILE, RunLock

SEED = int(os.environ.get("DUBOKO_FUZZ_SEED") or secrets.randbits(32))
TINY = ["--set", "train.num_threads=1", "--set", "batch_size=32", "--quiet"]


def _digest(run: Path) -> dict[str, str]:
    """What duboko wrote: every file but the lock and the pictures `eval` adds."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE and p.suffix != ".png" and "tb" not in p.relative_to(run).parts}


class RunFolderMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="duboko_stateful_"))
        self.run = self.tmp / "run"
        self.exists = False  # a complete run is there
        self.tampered = False  # a file was changed behind duboko's back
        self.expected: dict[str, str] = {}  # the folder as duboko last left it
        self.seed = None  # the last successful writer's train.seed
        self.steps = 0
        self.held: RunLock | None = None
        self.last_err = ""

    def teardown(self):
        if self.held is not None:
            self.held.release()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- running a command -----------------------------------------------------------------------
    def call(self, argv: list[str]) -> int:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(argv)
        note(f"{' '.join(argv)} -> {code}; stderr {err.getvalue().strip()[:300]!r}; replay with DUBOKO_FUZZ_SEED={SEED}")
        assert code in (0, 2), (argv, code, err.getvalue())
        if code == 2:
            lines = [line for line in err.getvalue().splitlines() if line.startswith("duboko: error:")]
            assert len(lines) == 1, err.getvalue()
        self.last_err = err.getvalue()
        return code

    def written(self, seed: int | None) -> None:
        self.expected = _digest(self.run)
        self.exists, self.tampered = True, False
        if seed is not None:
            self.seed = seed

    def unchanged(self) -> None:
        if self.run.is_dir():
            assert _digest(self.run) == self.expected or not self.exists and not self.expected

    # -- rules -----------------------------------------------------------------------------------
    @rule(seed=st.integers(0, 3), steps=st.integers(2, 5))
    def train(self, seed, steps):
        code = self.call(["train", "digits", "--out", str(self.run), *TINY, "--set", f"seed={seed}",
                          "--set", f"max_steps={steps}"])
        if self.held is not None:
            assert code == 2 and "in use" in self.last_err
            self.unchanged()
        elif self.exists or self.tampered:
            assert code == 2 and ("already holds a run" in self.last_err or "not empty" in self.last_err)
            self.unchanged()
        else:
            assert code == 0
            self.steps = steps
            self.written(seed)

    @precondition(lambda self: self.exists)
    @rule(seed=st.integers(4, 7), steps=st.integers(2, 5))
    def overwrite(self, seed, steps):
        code = self.call(["train", "digits", "--out", str(self.run), "--overwrite", *TINY, "--set", f"seed={seed}",
                          "--set", f"max_steps={steps}"])
        if self.held is not None:
            assert code == 2 and "in use" in self.last_err
            self.unchanged()
        else:
            assert code == 0  # even over a tampered run: it is replaced whole
            self.steps = steps
            self.written(seed)
        assert not list(self.tmp.glob(".run.overwritten-*"))

    @precondition(lambda self: self.exists)
    @rule(more=st.integers(1, 3))
    def resume(self, more):
        code = self.call(["train", "--resume", str(self.run), "--set", f"max_steps={self.steps + more}", "--quiet"])
        if self.held is not None or self.tampered:
            assert code == 2
            self.unchanged()
        else:
            assert code == 0
            self.steps += more
            self.written(None)

    @rule()
    def verify(self):
        code = self.call(["verify", str(self.run)])
        assert (code == 0) == (self.exists and not self.tampered), self.last_err
        self.unchanged()

    @precondition(lambda self: self.exists)
    @rule()
    def eval(self):
        code = self.call(["eval", str(self.run), "--json"])
        # `eval --json` only reads (no pictures written, so no lock taken): a writer holding the
        # lock does not refuse it; a tampered folder does (the manifest is checked first).
        if self.tampered:
            assert code == 2
        else:
            assert code == 0
        self.unchanged()

    @precondition(lambda self: self.exists)
    @rule(name=st.sampled_from(["config.json", "model.safetensors", "tabular.json", "history.csv", "state.safetensors",
                                "metrics.json"]),
          how=st.sampled_from(["flip", "truncate", "delete"]), where=st.integers(0, 2**31))
    def corrupt(self, name, how, where):
        path = self.run / name
        if not path.is_file():
            return
        data = bytearray(path.read_bytes())
        if how == "flip" and data:
            data[where % len(data)] ^= 0x01
            path.write_bytes(bytes(data))
        elif how == "truncate":
            path.write_bytes(bytes(data[: where % max(1, len(data))]))
        else:
            path.unlink()
        self.tampered = _digest(self.run) != self.expected
        if self.tampered:
            self.expected = _digest(self.run)  # refusals must leave even a tampered folder as it is

    @precondition(lambda self: self.held is None and self.run.is_dir())
    @rule()
    def hold_lock(self):
        self.held = RunLock.acquire(self.run, command="a concurrent writer (test)")

    @precondition(lambda self: self.held is not None)
    @rule()
    def release_lock(self):
        self.held.release()
        self.held = None

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def config_is_the_last_writers(self):
        if self.exists and not self.tampered and self.seed is not None and (self.run / "config.json").is_file():
            assert json.loads((self.run / "config.json").read_text())["train"]["seed"] == self.seed


def test_run_folder_command_sequences():
    """3 random sequences of up to 8 commands (about 30 s on the shared 2-core machine)."""
    machine_test = seed(SEED)(RunFolderMachine.TestCase)
    machine_test.settings = settings(max_examples=3, stateful_step_count=8, deadline=None, database=None,
                                     suppress_health_check=list(HealthCheck))
    print(f"stateful seed DUBOKO_FUZZ_SEED={SEED}")
    machine_test("runTest").runTest()
