"""Grad-CAM, saliency, top losses, filters and feature maps (duboko.evaluate.interpret), and the
`explain`, `mistakes` and `filters` commands on a tiny trained MY_NET."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from duboko.cli.main import main
from duboko.data import mnist
from duboko.errors import DubokoError
from duboko.evaluate import interpret as I

SIZE = 16
HALF = SIZE // 2
PNG = b"\x89PNG\r\n\x1a\n"


class QuadrantNet(nn.Module):
    """A conv net whose class depends on the top-left quadrant only, with weights set by hand.

    conv channel 0 detects a bright blob (3×3 mean, bias -0.5: faint noise stays below zero),
    channel 1 fires on any ink (a background channel). The class-1 logit is the sum of channel 0
    over the top-left quadrant; the class-0 logit is a constant threshold. Grad-CAM must weight
    channel 0 (α > 0) and not channel 1 (α = 0), and so land on the blob in that quadrant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        mask = torch.zeros(SIZE, SIZE)
        mask[:HALF, :HALF] = 1.0
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0 / 9
            self.conv.weight[1, 0, 1, 1] = 1.0
            self.conv.bias.copy_(torch.tensor([-0.5, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv(x))  # (B, 2, H, W)
        evidence = (a[:, 0] * self.mask).sum((1, 2))  # (B,): blob mass in the top-left quadrant
        return torch.stack([torch.full_like(evidence, 2.0), evidence], dim=1)  # (B, 2)


def quadrant_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Faint noise plus a bright 4×4 square in a random quadrant; class 1 iff top-left."""
    x = 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=gen)
    quadrant = torch.randint(0, 4, (n,), generator=gen)
    for i in range(n):
        r0, c0 = divmod(int(quadrant[i]), 2)
        r = r0 * HALF + int(torch.randint(0, HALF - 4, (1,), generator=gen))
        c = c0 * HALF + int(torch.randint(0, HALF - 4, (1,), generator=gen))
        x[i, 0, r : r + 4, c : c + 4] = 1.0
    return x, (quadrant == 0).long()


@pytest.fixture(scope="module")
def quadrant_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = QuadrantNet().eval()
    x, y = quadrant_data(200, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy == 1.0, f"the toy does not follow its rule (accuracy {accuracy:.3f})"
    return model, x, y


def top_left_share(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> the fraction of each map's mass in the top-left quadrant."""
    return maps[:, :HALF, :HALF].sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)


def test_grad_cam_of_the_quadrant_toy_sits_in_that_quadrant(quadrant_model):
    model, x, y = quadrant_model
    positives = x[y == 1]
    cam = I.grad_cam(model, positives)  # the predicted class (1), at the last (only) convolution
    assert cam.shape == (len(positives), SIZE, SIZE)
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1.0 + 1e-6
    share = top_left_share(cam)
    # a uniform map would put 25% there; the background channel alone would spread it everywhere
    assert float(share.min()) > 0.9, share
    # the input-gradient saliency of the same images also sits in the quadrant
    assert float(top_left_share(I.input_saliency(model, positives)).min()) > 0.9


def test_input_saliency_of_a_linear_model_is_where_its_weights_are():
    """An MLP-like model (no convolution) whose class-1 logit reads only the top-left pixels:
    the saliency outside that quadrant is exactly zero, and Grad-CAM refuses it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2))
    with torch.no_grad():
        mask = torch.zeros(SIZE, SIZE)
        mask[:HALF, :HALF] = 1.0
        model[1].weight.zero_()
        model[1].weight[1] = (mask * torch.rand(SIZE, SIZE)).flatten() + mask.flatten() * 0.1
    sal = I.input_saliency(model, torch.rand(3, 1, SIZE, SIZE), target=1)
    assert torch.all(sal[:, HALF:, :] == 0) and torch.all(sal[:, :, HALF:] == 0)
    assert torch.all(sal[:, :HALF, :HALF] > 0)
    assert I.last_conv(model) is None
    with pytest.raises(DubokoError, match="no.*convolution|has none"):
        I.grad_cam(model, torch.rand(1, 1, SIZE, SIZE))
    result = I.explain(model, torch.rand(1, 1, SIZE, SIZE), ["a", "b"])
    assert result.cam is None and result.saliency.shape == (SIZE, SIZE)


def test_grad_cam_survives_an_in_place_relu_after_the_layer():
    """MY_NET applies F.relu(..., inplace=True) to conv outputs; the captured maps must be the
    layer's own output, so Grad-CAM equals the hand-computed ReLU(Σ α_k A_k)."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(F.relu(self.conv(x), inplace=True).mean((2, 3)))

    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(2, 1, 8, 8)
    cam = I.grad_cam(model, x, target=0)
    a = model.conv(x).detach().requires_grad_(True)
    score = model.head(F.relu(a).mean((2, 3)))[:, 0].sum()
    (g,) = torch.autograd.grad(score, a)
    expected = F.relu((g.mean((2, 3), keepdim=True) * a.detach()).sum(1))  # (B, 8, 8), same size: no resize
    expected = expected / expected.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    assert torch.allclose(cam, expected, atol=1e-5)


def test_top_losses_are_the_highest_losses_in_order():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    task = SimpleNamespace(splits={"test": (images, labels)}, class_names=["x", "y", "z"],
                           config=SimpleNamespace(data=SimpleNamespace(eval_batch_size=7)),
                           eval_inputs=lambda im: im.float()[:, None] / 255.0)
    top = I.top_losses(model, task, n=5)
    with torch.no_grad():
        all_losses = F.cross_entropy(model(task.eval_inputs(images)), labels, reduction="none")
    assert top.losses == pytest.approx(sorted(all_losses.tolist(), reverse=True)[:5], rel=1e-5)
    assert top.inputs.shape == (5, 1, 4, 4)
    assert all(0 < p <= 1 for p in top.probability)
    with pytest.raises(DubokoError, match="between 1 and"):
        I.top_losses(model, task, n=0)


def test_filters_and_feature_maps(quadrant_model, tmp_path):
    model, x, _ = quadrant_model
    assert I.plot_filters(model, "conv", tmp_path / "f.png") == 2
    assert (tmp_path / "f.png").read_bytes().startswith(PNG)
    maps = I.feature_maps(model, "conv", x[:1])
    assert maps.shape == (2, SIZE, SIZE)
    assert torch.allclose(maps, model.conv(x[:1])[0].detach())
    assert I.plot_feature_maps(maps, "conv", tmp_path / "m.png") == 2
    with pytest.raises(DubokoError, match="its convolutions are: conv"):
        I.find_layer(model, "conv9")
    with pytest.raises(DubokoError, match="not a convolution"):
        I.plot_filters(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()), "1", tmp_path / "h.png")


# -- the commands on a tiny trained MY_NET -------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    from tests.conftest import TINY_CNN

    out = tmp_path_factory.mktemp("cnn") / "run"
    sets = TINY_CNN + ["data.limit_train=256", "data.limit_test=100", "epochs=1", "batch_size=64"]
    assert main(["train", "mnist-cnn", "--quiet", "--out", str(out), *sum((["--set", s] for s in sets), [])]) == 0
    return out


@pytest.fixture(scope="module")
def digit(tmp_path_factory) -> Path:
    x, _ = mnist.load_split("test", None, limit=1)
    path = tmp_path_factory.mktemp("img") / "digit.png"
    Image.fromarray(x[0].numpy()).save(path)
    return path


def test_explain_mistakes_filters_commands(cnn_run, digit, tmp_path, capsys):
    why, top, filt, fmap = (tmp_path / n for n in ("why.png", "top.png", "filters.png", "maps.png"))
    assert main(["explain", str(cnn_run), str(digit), "--out", str(why)]) == 0
    assert "Grad-CAM at conv3" in capsys.readouterr().out
    assert main(["mistakes", str(cnn_run), "--n", "6", "--out", str(top)]) == 0
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split()[1].rstrip(":")) for line in lines if line.startswith("loss ")]
    assert losses == sorted(losses, reverse=True) and len(losses) == 5
    assert main(["filters", str(cnn_run), "--layer", "conv1", "--out", str(filt)]) == 0
    assert "conv1: 32 kernels" in capsys.readouterr().out
    assert main(["filters", str(cnn_run), "--layer", "conv2", "--image", str(digit), "--out", str(fmap)]) == 0
    assert "64 feature maps" in capsys.readouterr().out
    for p in (why, top, filt, fmap):
        assert p.read_bytes().startswith(PNG)


def test_commands_refuse_bad_input_in_one_line(cnn_run, digit, tmp_path, capsys):
    assert main(["filters", str(cnn_run), "--layer", "nope", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "conv1, conv2, conv3" in err and len(err.strip().splitlines()) == 1
    assert main(["mistakes", str(cnn_run), "--n", "1000", "--out", str(tmp_path / "x.png")]) == 2
    assert "between 1 and 100" in capsys.readouterr().err
    assert main(["explain", str(cnn_run), str(digit), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png" in capsys.readouterr().err


def test_explain_an_mlp_run_gives_saliency_only(tmp_path, digit, capsys):
    run = tmp_path / "mlp"
    sets = ["data.limit_train=256", "data.limit_test=50", "train.num_threads=1", "epochs=1", "hidden_sizes=[32]"]
    assert main(["train", "mnist-mlp", "--quiet", "--out", str(run), *sum((["--set", s] for s in sets), [])]) == 0
    capsys.readouterr()
    assert main(["explain", str(run), str(digit), "--out", str(tmp_path / "why.png")]) == 0
    assert "saliency only (no convolution)" in capsys.readouterr().out
    assert (tmp_path / "why.png").read_bytes().startswith(PNG)
    assert main(["filters", str(run), "--out", str(tmp_path / "f.png")]) == 2
    assert "no convolution" in capsys.readouterr().err
