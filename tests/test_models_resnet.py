"""CIFAR-style ResNets (He et al. 2016, section 4.2): parameter counts against the paper, shapes
for 28/32/64 inputs, gradients, a tiny overfit and a state-dict round trip."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import duboko.models.resnet  # noqa: F401  (registers the variants until discovery is automatic)
from duboko import registry
from duboko.errors import DubokoError
from duboko.io import load_tensors, save_tensors
from duboko.models.resnet import BasicBlock, PadShortcut, ResNet, ResNetConfig


def _paper_count(n: int, widths=(16, 32, 64), classes: int = 10, in_channels: int = 3, projection: bool = False) -> int:
    """Parameters of a CIFAR ResNet counted by hand: 3×3 convolutions without bias, BatchNorm γ
    and β per channel, option A shortcuts (none) or B (1×1 conv + BN), a linear head."""
    total = 9 * in_channels * widths[0] + 2 * widths[0]  # stem conv + BN
    c_in = widths[0]
    for w in widths:
        for j in range(n):
            total += 9 * c_in * w + 2 * w + 9 * w * w + 2 * w  # conv1+bn1, conv2+bn2
            if projection and c_in != w:
                total += c_in * w + 2 * w
            c_in = w
    return total + c_in * classes + classes


def test_resnet20_matches_the_paper():
    model = registry.create_model("resnet20")
    count = registry.count_parameters(model)
    assert count == _paper_count(3) == 269_722
    assert abs(count - 0.27e6) / 0.27e6 < 0.01  # He et al. 2016, table 6: ResNet-20 0.27M
    # 6n + 2 = 20 weighted layers: 19 convolutions and the linear head (option A adds none).
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 20
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2  # into stages 2 and 3


@pytest.mark.parametrize("name, n, published", [("resnet32", 5, 0.46e6), ("resnet56", 9, 0.85e6)])
def test_deeper_variants_match_the_paper(name, n, published):
    count = registry.count_parameters(registry.create_model(name))
    assert count == _paper_count(n)
    assert abs(count - published) / published < 0.01  # table 6: 0.46M, 0.85M


def test_option_b_and_resnet_small_counts():
    b = registry.create_model("resnet20", shortcut="B")
    assert registry.count_parameters(b) == _paper_count(3, projection=True) == 272_474
    small = registry.create_model("resnet-small")
    assert small.config.in_channels == 1 and small.config.depth == 8 and small.config.widths == [32, 64, 128]
    assert registry.count_parameters(small) == _paper_count(1, (32, 64, 128), in_channels=1, projection=True) == 308_074


@pytest.mark.parametrize("side", [28, 32, 64])
def test_shapes_for_several_input_sizes(side):
    torch.manual_seed(0)
    for name, channels in (("resnet-small", 1), ("resnet20", 3)):
        model = registry.create_model(name, num_classes=7).eval()
        x = torch.randn(2, channels, side, side)
        assert model(x).shape == (2, 7)
        assert model.features(x).shape == (2, model.config.widths[-1])
    # A stride-2 stem halves big inputs before stage 1; global pooling takes what is left.
    wide = registry.create_model("resnet-small", stem_stride=2).eval()
    assert wide(torch.randn(2, 1, side, side)).shape == (2, 10)


def test_stage_shapes_follow_the_paper():
    model = registry.create_model("resnet20").eval()
    shapes = []
    hooks = [stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for stage in model.stages]
    model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]  # maps of 32, 16, 8 pixels


def test_option_a_shortcut_is_subsampling_plus_zero_channels():
    x = torch.randn(2, 16, 7, 7)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)  # the 3×3 stride-2 convolution also gives ceil(7/2) = 4
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0
    block = BasicBlock(16, 32, 2, "A")
    assert block(x).shape == (2, 32, 4, 4)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for name in ("resnet-small", "resnet20"):
        model = registry.create_model(name, in_channels=1)
        x = torch.randn(4, 1, 28, 28)
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


def test_zero_init_residual_starts_blocks_as_identities():
    model = registry.create_model("resnet20", zero_init_residual=True)
    assert all(torch.count_nonzero(m.bn2.weight) == 0 for m in model.modules() if isinstance(m, BasicBlock))


def test_a_tiny_resnet_overfits_a_few_batches():
    """It learns: 64 random 16×16 images with random labels are memorised in a few dozen steps."""
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(in_channels=1, num_classes=4, depth=8, widths=[8, 16, 32], shortcut="B"))
    x = torch.randn(64, 1, 16, 16)
    y = torch.randint(0, 4, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(20):
        for i in range(0, 64, 32):  # two batches
            loss = F.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert loss.item() < first / 5
    assert accuracy >= 0.95


def test_state_dict_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = registry.create_model("resnet-small")
    model.train()
    model(torch.randn(8, 1, 28, 28))  # move the BatchNorm running statistics off their defaults
    model.eval()
    save_tensors(model.state_dict(), tmp_path / "model.safetensors")
    config = dataclasses.asdict(model.config)
    rebuilt = registry.build_model("resnet-small", config).eval()
    rebuilt.load_state_dict(load_tensors(tmp_path / "model.safetensors"))  # strict
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_example_input_and_summary():
    from duboko.evaluate.summary import summarize_registered

    for name in ("resnet-small", "resnet20"):
        model = registry.create_model(name)
        (x,) = registry.example_input(name, 2, model)
        assert model(x).shape == (2, 10)
    s = summarize_registered("resnet-small")
    assert s.total_params == 308_074


def test_bad_configs_are_one_clear_error():
    with pytest.raises(DubokoError, match=r"depth must be 2·n·3 \+ 2.*got 21"):
        registry.create_model("resnet20", depth=21)
    with pytest.raises(DubokoError, match="shortcut must be 'A'.*got 'C'"):
        registry.create_model("resnet20", shortcut="C")
    with pytest.raises(DubokoError, match="can only add channels"):
        registry.create_model("resnet20", widths=[64, 32, 16])
    with pytest.raises(DubokoError, match="stem_stride"):
        registry.create_model("resnet20", stem_stride=4)
    assert registry.count_parameters(registry.create_model("resnet20", widths=[16, 32], depth=10)) > 0  # 2 stages
