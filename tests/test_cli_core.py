"""The CLI as a user meets it: commands work, and mistakes end in one clear line and exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CNN


def duboko(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "duboko", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _assert_user_error(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("duboko: error:"), result.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    sets = [a for s in TINY_CNN + ["epochs=2"] for a in ("--set", s)]
    r = duboko("train", "mnist-cnn", "--out", str(out), *sets)
    assert r.returncode == 0, r.stderr
    assert "[Epoch 1] loss = " in r.stdout and "| accuracy = " in r.stdout
    assert "Classification report" in r.stdout and "Confusion matrix" in r.stdout
    return out


def test_recipes_and_models_list():
    r = duboko("recipes")
    assert r.returncode == 0 and "mnist-cnn" in r.stdout
    r = duboko("models")
    assert r.returncode == 0 and "my_net" in r.stdout


def test_eval_text_and_json(trained_run):
    r = duboko("eval", str(trained_run))
    assert r.returncode == 0 and "test accuracy" in r.stdout and "macro avg" in r.stdout
    r = duboko("eval", str(trained_run), "--json")
    data = json.loads(r.stdout)
    saved = json.loads((trained_run / "metrics.json").read_text())
    assert data["test_accuracy"] == pytest.approx(saved["test_accuracy"])
    assert len(data["confusion_matrix"]) == 10


def test_predict_images(trained_run, tmp_path):
    from duboko.data.mnist import load_mnist

    x, y = load_mnist("test")
    paths = []
    for i in range(3):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(x[i].numpy()).save(p)
        paths.append(str(p))
    # The same digit as dark ink on white paper, bigger, in RGB: inverted and resized.
    paper = tmp_path / "paper.jpg"
    Image.fromarray(255 - x[0].numpy()).resize((96, 96)).convert("RGB").save(paper)
    r = duboko("predict", str(trained_run), *paths, str(paper), "--json")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)["predictions"]
    assert len(preds) == 4 and all(len(p["top"]) == 3 for p in preds)
    assert preds[3]["inverted"] is True and preds[0]["inverted"] is False
    assert abs(sum(p for _, p in preds[0]["top"])) <= 1.0 + 1e-6
    r = duboko("predict", str(trained_run), paths[0])
    assert r.returncode == 0 and "digit0.png:" in r.stdout


def test_user_mistakes_end_in_one_line(tmp_path, trained_run):
    _assert_user_error(duboko("train", "nope"), "unknown recipe 'nope'")
    _assert_user_error(duboko("train", "mnist-cnn", "--set", "epochs=x", "--out", str(tmp_path / "a")), "train.epochs expects an integer")
    _assert_user_error(duboko("train", "mnist-cnn", "--set", "bogus=1", "--out", str(tmp_path / "b")), "unknown key 'bogus'")
    _assert_user_error(duboko("train", "mnist-cnn", "--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "c")), "does not exist")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    _assert_user_error(duboko("predict", str(trained_run), str(bad)), "cannot read image")
    _assert_user_error(duboko("predict", str(trained_run), str(tmp_path / "missing.png")), "does not exist")
    _assert_user_error(duboko("eval", str(tmp_path / "norun")), "does not exist")
    _assert_user_error(duboko("train", "--resume", str(tmp_path / "norun")), "cannot resume")
