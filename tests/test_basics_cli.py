"""CLI: activations and compare write PNGs; gradcheck reports per tensor; errors are one line."""

import json

import pytest
import torch

from duboko import config as C
from duboko.cli.main import main


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_activations_png(tmp_path, capsys):
    out = tmp_path / "act.png"
    assert main(["activations", "--out", str(out)]) == 0
    _png(out)
    text = capsys.readouterr().out
    assert "sigmoid" in text and "+0.2500" in text  # σ'(0) = 1/4
    assert main(["activations", "--names", "relu,swish9", "--out", str(out)]) == 2
    assert "unknown activation 'swish9'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from duboko.train.engine import fit

    base = tmp_path_factory.mktemp("runs")
    for opt in ("sgd", "adam"):
        cfg = C.resolve("digits", ["epochs=2", f"optimizer={opt}", "lr=0.01"])
        fit(cfg, base / opt, quiet=True)
    return base


def test_compare_png(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["compare", str(two_runs / "sgd"), str(two_runs / "adam"), "--out", str(out)]) == 0
    _png(out)
    text = capsys.readouterr().out
    assert "sgd" in text and "adam" in text and "test_accuracy" in text and "loss, accuracy" in text
    assert main(["compare", str(two_runs / "sgd"), "--metrics", "bleu", "--out", str(out)]) == 2
    assert "no run has metric(s) bleu" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gradcheck_cli(capsys):
    assert main(["gradcheck", "mlp", "--set", "in_features=4", "--set", "hidden_sizes=[3]",
                 "--set", "out_features=2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and [r["tensor"] for r in report["rows"]] == [
        "hidden.fc1.weight", "hidden.fc1.bias", "head.weight", "head.bias", "input[0]"]
    assert main(["gradcheck", "mlp", "--set", "width=3"]) == 2
    assert "valid fields" in capsys.readouterr().err


def test_bad_optimizer_lists_valid_ones(capsys):
    assert main(["train", "digits", "--set", "optimizer=lion", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    for name in ("sgd", "adam", "adamw", "rmsprop"):
        assert name in err
