"""Bounded reads (issue 21): a run folder's JSON files are read only when they are regular files
under a size cap, with recursion-safe parsing, so a FIFO, `/dev/zero` or a 200,000-deep JSON is
one line, not a hang, a MemoryError or a RecursionError; and the CLI's one top-level guard turns
an unexpected exception into one line pointing at `--debug`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from duboko.cli import main as cli_main
from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.io import read_json

TINY = ["--set", "train.num_threads=1", "--set", "batch_size=32", "--set", "max_steps=2", "--quiet"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


def test_deep_json_is_a_duboko_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DubokoError, match="nested too deeply"):
        read_json(path)


def test_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(DubokoError, match="not a regular file"):
        read_json(fifo)


def test_device_is_refused():
    with pytest.raises(DubokoError, match="not a regular file"):
        read_json("/dev/zero")


def test_size_cap(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps("x" * 5000))
    with pytest.raises(DubokoError, match="expected at most 1,000"):
        read_json(path, max_bytes=1000)
    assert read_json(path) == "x" * 5000


def test_folder_is_refused(tmp_path):
    with pytest.raises(DubokoError, match="is a folder"):
        read_json(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust_reads") / "run"
    assert main(["train", "digits", "--out", str(run), *TINY]) == 0
    return run


@pytest.mark.parametrize("kind", ["fifo", "zero", "deep"])
def test_run_folder_with_a_hostile_config_is_one_line(trained, tmp_path, capsys, kind):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "config.json").unlink()
    if kind == "fifo":
        os.mkfifo(run / "config.json")
    elif kind == "zero":
        os.symlink("/dev/zero", run / "config.json")
    else:
        (run / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["eval", str(run), "--json"]) == 2
    line = _one_error_line(capsys)
    assert "config.json" in line
    # The resume path parses config.json (config.resolve) before the engine verifies it.
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "config.json" in _one_error_line(capsys)


def _boom(args) -> int:
    raise ValueError("something no one expected\nsecond line")


def _parser_with_boom(monkeypatch):
    real = cli_main.build_parser

    def build():
        parser = real()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.add_parser("boom").set_defaults(func=_boom)
        return parser

    monkeypatch.setattr(cli_main, "build_parser", build)


def test_unexpected_exception_is_one_line_pointing_at_debug(monkeypatch, capsys):
    _parser_with_boom(monkeypatch)
    monkeypatch.delenv("DUBOKO_DEBUG", raising=False)
    assert main(["boom"]) == 2
    line = _one_error_line(capsys)
    assert "unexpected ValueError: something no one expected" in line and "--debug" in line


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    _parser_with_boom(monkeypatch)
    monkeypatch.delenv("DUBOKO_DEBUG", raising=False)
    with pytest.raises(ValueError):
        main(["--debug", "boom"])
    monkeypatch.setenv("DUBOKO_DEBUG", "1")  # what tests/conftest.py sets for every test
    with pytest.raises(ValueError):
        main(["boom"])


def test_safetensors_whose_first_byte_is_0x80_is_not_taken_for_a_pickle(tmp_path):
    # The first byte of a safetensors file is the low byte of its header length: 0x80 for one
    # length in 256. Such a file used to be refused as a pickle (flaky: the training state's
    # header length varies with its timings).
    import torch

    from duboko.io import load_tensors, save_tensors

    path = tmp_path / "w.safetensors"
    for pad in range(300):
        save_tensors({"w": torch.arange(3.0)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    assert torch.equal(load_tensors(path)["w"], torch.arange(3.0))


def test_csv_and_tensor_reads_refuse_fifos(tmp_path):
    from duboko.io import load_tensors, read_csv_rows

    os.mkfifo(tmp_path / "history.csv")
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(DubokoError, match="not a regular file"):
        read_csv_rows(tmp_path / "history.csv")
    with pytest.raises(DubokoError, match="not a regular file"):
        load_tensors(tmp_path / "model.safetensors")


def test_csv_rows_still_parse(tmp_path):
    from duboko.io import read_csv_rows

    (tmp_path / "h.csv").write_text("epoch,loss,note\r\n1,0.5,a\r\n2,0.25,b\r\n")
    assert read_csv_rows(tmp_path / "h.csv") == [{"epoch": 1, "loss": 0.5, "note": "a"}, {"epoch": 2, "loss": 0.25, "note": "b"}]
