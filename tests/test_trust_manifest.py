"""Tampered, truncated or missing run-folder files are detected on load (manifest.json holds the
SHA-256 of each file), by `eval`, `predict`, `verify` and `load_run`: one clear line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.train.run import load_run

TINY = [
    "--set", "data.image_size=16", "--set", "model.image_size=16", "--set", "data.limit_train=64",
    "--set", "data.limit_test=50", "--set", "train.num_threads=1", "--set", "epochs=1", "--set", "batch_size=32",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust_manifest") / "run"
    assert main(["train", "mnist-cnn", "--out", str(run), "--quiet", *TINY]) == 0
    return run


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


def test_a_clean_run_verifies_and_loads(run, capsys):
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "model.safetensors" in out and "state.safetensors" in out
    listed = json.loads((run / "manifest.json").read_text())["sha256"]
    assert {"config.json", "metrics.json", "history.csv", "model.safetensors", "state.safetensors"} <= set(listed)
    assert load_run(run, "cpu").model is not None


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # one bit inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(path: Path) -> None:
    cfg = json.loads(path.read_text())
    cfg["train"]["lr"] = 0.5  # a plausible, valid edit: only the hash can tell
    path.write_text(json.dumps(cfg))


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "name, damage, words",
    [
        ("model.safetensors", _flip_byte, ("model.safetensors", "SHA-256")),
        ("model.safetensors", _truncate, ("model.safetensors", "SHA-256")),
        ("model.safetensors", _delete, ("model.safetensors", "missing")),
        ("state.safetensors", _flip_byte, ("state.safetensors", "SHA-256")),
        ("history.csv", _truncate, ("history.csv", "SHA-256")),
        ("config.json", _edit_config, ("config.json", "SHA-256")),
        ("metrics.json", _truncate, ("metrics.json",)),
    ],
)
def test_damage_is_detected_by_every_command(run, tmp_path, capsys, name, damage, words):
    damage(run / name)
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(image)
    for argv in (["verify", str(run)], ["eval", str(run)], ["predict", str(run), str(image)]):
        assert main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert all(w in line for w in words), (argv, line)
    with pytest.raises(DubokoError):
        load_run(run, "cpu")


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2, 3]", b'{"sha256": "abc"}', b'{"sha256": {"../../etc/passwd": "00"}}',
                                     b'{"sha256": {"model.safetensors": 7}}'])
def test_a_broken_manifest_is_a_clear_error(run, capsys, content):
    (run / "manifest.json").write_bytes(content)
    for argv in (["verify", str(run)], ["eval", str(run)]):
        assert main(argv) == 2, argv
        assert "manifest.json" in _one_error_line(capsys)


def test_a_missing_manifest_is_refused(run, capsys):
    (run / "manifest.json").unlink()
    assert main(["eval", str(run)]) == 2
    assert "manifest.json" in _one_error_line(capsys)


def test_not_a_run_folder(tmp_path, capsys):
    for argv in (["verify", str(tmp_path / "nope")], ["eval", str(tmp_path / "nope")], ["verify", str(tmp_path)]):
        assert main(argv) == 2, argv
        _one_error_line(capsys)
