"""Robust accuracy against eps and its sanity checks (duboko.security.robustness), the image task's
pixel-space hooks, and `duboko attack` end to end on a tiny run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duboko import config as C
from duboko.cli.main import main
from duboko.data import mnist
from duboko.errors import DubokoError
from duboko.security import robustness as R
from duboko.security.attacks import AttackConfig

MEAN, STD = 0.1307, 0.3081


class FakeTask:
    """The duck-typed surface `robustness_report` reads from an image task."""

    def __init__(self, images, labels, mismatch: bool = False):
        self.splits = {"test": (images, labels)}
        self.device = torch.device("cpu")
        self.class_names = [str(i) for i in range(10)]
        self.mismatch = mismatch

    def pixel_images(self, images):
        return images.unsqueeze(1).float() / 255

    def preprocess(self, pixels):
        # mismatch: the attacked pipeline forgets the normalisation the evaluation applies
        return pixels if self.mismatch else (pixels - MEAN) / STD

    def eval_inputs(self, images):
        return (self.pixel_images(images) - MEAN) / STD


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    images, labels = mnist.load_split("train", limit=2000)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    x = (images.unsqueeze(1).float() / 255 - MEAN) / STD
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(8):
        for i in range(0, len(x), 100):
            loss = F.cross_entropy(net(x[i : i + 100]), labels[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test_images, test_labels = mnist.load_split("test", limit=200)
    return net, test_images, test_labels


def test_curve_and_checks_pass_on_an_honest_model(trained):
    net, images, labels = trained
    result = R.robustness_report(FakeTask(images, labels), net, AttackConfig(method="pgd", steps=10), [0.3, 0.05, 0.1],
                                 n=200, show_progress=False)
    eps = [row["eps"] for row in result.curve]
    acc = [row["robust_accuracy"] for row in result.curve]
    assert eps == [0.0, 0.05, 0.1, 0.3]  # eps 0 is always measured
    assert acc[0] == result.clean_accuracy > 0.8
    assert all(b <= a for a, b in zip(acc, acc[1:]))
    assert acc[-1] < 0.1
    assert [c["check"] for c in result.checks] == ["monotone in eps", "eps 0 = clean", "unbounded eps gives 0 %",
                                                   "more steps/restarts never help"]
    assert all(c["ok"] for c in result.checks), result.checks
    assert result.warnings == []
    text = R.format_table(result)
    assert "robust accuracy" in text and "[ok] eps 0 = clean" in text


def test_a_pipeline_mismatch_is_flagged(trained):
    net, images, labels = trained
    result = R.robustness_report(FakeTask(images, labels, mismatch=True), net, AttackConfig(method="fgsm"), [0.1],
                                 n=100, show_progress=False)
    failed = {c["check"] for c in result.checks if not c["ok"]}
    assert "eps 0 = clean" in failed
    assert any("attacked pipeline differs" in w for w in result.warnings)


def test_masked_gradients_are_flagged(trained):
    """A model whose gradient is zero (its logits detached) cannot be attacked by gradients: the
    unbounded attack leaves images correct, which the report shows as gradient masking."""
    net, images, labels = trained

    class Masked(nn.Module):
        def forward(self, x):
            return net(x).detach() + 0 * x.sum()

    result = R.robustness_report(FakeTask(images, labels), Masked(), AttackConfig(method="pgd", steps=5,
                                 random_start=False), [0.3], n=100, show_progress=False)
    failed = {c["check"] for c in result.checks if not c["ok"]}
    assert "unbounded eps gives 0 %" in failed
    assert result.warnings and all(w.startswith("possible gradient masking") for w in result.warnings)


def test_eps_list_and_counts_are_validated():
    assert R.parse_eps_list("0.05, 0.1,0.3") == [0.05, 0.1, 0.3]
    with pytest.raises(DubokoError, match="is not a number"):
        R.parse_eps_list("0.1,abc")
    with pytest.raises(DubokoError, match=r"in \[0, 1\]"):
        R.parse_eps_list("0.1,1.5")
    with pytest.raises(DubokoError, match="at least one value"):
        R.parse_eps_list(" , ")
    with pytest.raises(DubokoError, match=r"--n must be an integer in \[1, 100000\]"):
        R.first_test_pixels(FakeTask(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)), 0)


@pytest.mark.parametrize("overrides", [
    [],  # MNIST 48×48, grey replicated to RGB: preprocess resizes and expands
    ["data.image_size=28", "model.image_size=28", "data.channels=1", "model.in_channels=1"],
])
def test_preprocess_of_pixels_equals_the_evaluation_inputs(overrides):
    from duboko import registry

    cfg = C.resolve("mnist-cnn", ["data.limit_train=16", "data.limit_test=16", *overrides])
    task = registry.get_task(cfg.task)(cfg, torch.device("cpu"))
    task.setup()
    images = task.splits["test"][0][:8]
    pixels = task.pixel_images(images)
    assert pixels.shape == (8, 1, 28, 28) and pixels.min() >= 0 and pixels.max() <= 1
    assert torch.allclose(task.preprocess(pixels), task.eval_inputs(images), atol=1e-6)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    from duboko.train.engine import fit

    out = tmp_path_factory.mktemp("attack") / "mlp"
    cfg = C.resolve("mnist-mlp", ["data.limit_train=1000", "data.limit_test=100", "train.epochs=1", "train.num_threads=1"])
    fit(cfg, out, quiet=True)
    return out


def test_attack_cli(mlp_run, tmp_path, capsys):
    png = tmp_path / "robust.png"
    assert main(["attack", str(mlp_run), "--method", "pgd", "--eps", "0.05,0.2", "--n", "50", "--steps", "5",
                 "--out", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["eps"] for row in report["curve"]] == [0.0, 0.05, 0.2]
    assert report["n"] == 50 and report["attack"]["method"] == "pgd"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["attack", str(mlp_run), "--method", "fgsm", "--eps", "0.1", "--n", "20", "--no-checks"]) == 0
    assert "fgsm (linf) on 20 test images" in capsys.readouterr().out
    adv = tmp_path / "adv.png"
    assert main(["attack", str(mlp_run), "--examples", "4", "--eps", "0.2", "--steps", "5", "--out", str(adv)]) == 0
    assert "examples misclassified" in capsys.readouterr().out and adv.stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--eps", "2"], "eps must be a number in [0, 1]"),
    (["--method", "deepfool"], "unknown attack method 'deepfool'"),
    (["--n", "0"], "--n must be in [1, 100000]"),
    (["--steps", "0"], "steps must be an integer in [1, 10000]"),
    (["--examples", "4"], "--examples needs --out"),
    (["--out", "x.jpg"], "--out must end in .png"),
])
def test_attack_cli_refuses_bad_values(mlp_run, capsys, argv, message):
    assert main(["attack", str(mlp_run), *argv]) == 2
    assert message in capsys.readouterr().err
