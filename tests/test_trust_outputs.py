"""Output rules and flag bounds (issue 21): pictures end in .png and never replace a non-PNG
file (one rule, in duboko.evaluate.plots); sampling and generation flags out of range (NaN
included) are one line and exit 2, checked before any run folder is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.evaluate.plots import PNG_SIGNATURE, figure, save_grid


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


IMAGES = torch.zeros(4, 1, 8, 8)


def test_picture_must_end_in_png(tmp_path):
    with pytest.raises(DubokoError, match="must end in .png"):
        save_grid(IMAGES, tmp_path / "grid.jpg")
    with pytest.raises(DubokoError, match="must end in .png"):
        with figure(tmp_path / "plot.txt"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_picture_never_replaces_a_non_png(tmp_path):
    config = tmp_path / "config.png"
    config.write_text('{"task": "tabular"}')  # a user's file that happens to be named .png
    with pytest.raises(DubokoError, match="is not a PNG; duboko never replaces it"):
        save_grid(IMAGES, config)
    assert config.read_text() == '{"task": "tabular"}'
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DubokoError, match="not a regular file"):
        save_grid(IMAGES, tmp_path / "dir.png")
    (tmp_path / "link.png").symlink_to(config)
    with pytest.raises(DubokoError, match="not a regular file"):
        save_grid(IMAGES, tmp_path / "link.png")


def test_picture_replaces_a_png(tmp_path):
    path = tmp_path / "grid.png"
    save_grid(IMAGES, path)
    first = path.read_bytes()
    assert first.startswith(PNG_SIGNATURE)
    save_grid(torch.ones(4, 1, 8, 8), path)
    assert path.read_bytes() != first


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be in 1..1000, got 0"),
    (["--steps", "5000"], "--steps must be in 1..1000"),
    (["--nrow", "-3"], "--nrow must be in 0..10,000"),
    (["--guidance", "nan"], "--guidance must be in [0, 100]"),
    (["--guidance", "inf"], "--guidance must be in [0, 100]"),
    (["--eta", "-5"], "--eta must be in [0, 1]"),
    (["--eta", "nan"], "--eta must be in [0, 1]"),
    (["--n", "100000"], "--n must be in 1..10,000"),
    (["--out", "grid.txt"], "must end in .png"),
])
def test_sample_flags_are_bounded(tmp_path, capsys, argv, message):
    assert main(["sample", str(tmp_path / "no-such-run"), *argv]) == 2
    assert message in _one_error_line(capsys)


def test_sample_never_overwrites_a_run_file(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text("{}")
    assert main(["sample", str(tmp_path), "--out", str(config)]) == 2
    assert "must end in .png" in _one_error_line(capsys)
    assert config.read_text() == "{}"


def test_trajectory_flags_are_bounded(tmp_path, capsys):
    assert main(["trajectory", str(tmp_path / "no-such-run"), "--steps", "0"]) == 2
    assert "--steps must be in 1..1000" in _one_error_line(capsys)
    assert main(["trajectory", str(tmp_path / "no-such-run"), "--frames", "1000000"]) == 2
    assert "--frames must be in 2..100" in _one_error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", str(10**9)], "--max-new-tokens must be in 1..100,000"),
    (["--repetition-penalty", "nan"], "--repetition-penalty must be a finite number > 0"),
])
def test_generate_flags_are_bounded(tmp_path, capsys, argv, message):
    assert main(["generate", str(tmp_path / "no-such-run"), *argv]) == 2
    assert message in _one_error_line(capsys)


def test_next_word_temperature_nan(tmp_path, capsys):
    assert main(["next-word", str(tmp_path / "no-such-run"), "the", "--temperature", "nan"]) == 2
    assert "--temperature must be a finite number > 0" in _one_error_line(capsys)


@pytest.mark.parametrize("command", [["summary", "my_net"], ["gradcheck", "my_net"]])
def test_model_set_values_are_type_checked(capsys, command):
    assert main([*command, "--set", "image_size=abc"]) == 2
    assert "model.image_size expects an integer, got 'abc'" in _one_error_line(capsys)


def test_import_weights_set_values_are_type_checked(tmp_path, capsys):
    src = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, src)
    assert main(["import-weights", str(src), "--model", "my_net", "--set", "image_size=abc",
                 "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "model.image_size expects an integer, got 'abc'" in _one_error_line(capsys)
    assert not (tmp_path / "w.safetensors").exists()
