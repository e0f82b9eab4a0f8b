"""Vision Transformer (Dosovitskiy et al. 2021) on the shared encoder blocks: the ViT-Ti/16
parameter count against the published 5.7M, shapes, positions, gradients, a tiny overfit and a
state-dict round trip."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import duboko.models.vit  # noqa: F401  (registers the variants until discovery is automatic)
from duboko import registry
from duboko.errors import DubokoError
from duboko.io import load_tensors, save_tensors
from duboko.models.vit import ViT, ViTConfig
from duboko.nn.attention import TransformerEncoderBlock


def _vit_count(image: int, patch: int, channels: int, d: int, depth: int, mlp: int, classes: int,
               learned: bool = True, cls: bool = True) -> int:
    """ViT parameters by hand (eqs. 1-4 of the paper)."""
    tokens = (image // patch) ** 2 + (1 if cls else 0)
    embed = channels * patch * patch * d + d  # E and its bias
    block = 2 * 2 * d + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)  # 2 LN, q k v o, MLP
    return embed + (d if cls else 0) + (tokens * d if learned else 0) + depth * block + 2 * d + d * classes + classes


def test_vit_ti16_matches_the_published_count():
    model = registry.create_model("vit-ti16")
    count = registry.count_parameters(model)
    assert count == _vit_count(224, 16, 3, 192, 12, 768, 1000) == 5_717_416
    # ViT-Ti/16 (Steiner et al. 2021; timm's vit_tiny_patch16_224; DeiT-Ti): 5.7M parameters.
    assert abs(count - 5.7e6) / 5.7e6 < 0.01
    built = ViT(ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, embed_dim=192,
                          depth=12, num_heads=3, mlp_dim=768))
    assert registry.count_parameters(built) == count
    assert sum(isinstance(m, TransformerEncoderBlock) for m in built.modules()) == 12  # the nn/ blocks


def test_vit_tiny_shapes_and_count():
    model = registry.create_model("vit-tiny").eval()
    c = model.config
    assert (c.image_size, c.patch_size, c.in_channels, c.embed_dim, c.depth) == (28, 4, 1, 128, 6)
    assert model.num_patches == 49
    assert registry.count_parameters(model) == _vit_count(28, 4, 1, 128, 6, 256, 10) == 805_130
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 128)
    seven = registry.create_model("vit-tiny", patch_size=7, num_classes=5).eval()
    assert seven.num_patches == 16 and seven(x).shape == (3, 5)


def test_sinusoidal_positions_and_mean_pooling():
    learned = registry.create_model("vit-tiny")
    fixed = registry.create_model("vit-tiny", positional="sinusoidal")
    assert registry.count_parameters(learned) - registry.count_parameters(fixed) == 50 * 128  # (1 + 49) × D
    assert not any("pe" in k for k in fixed.state_dict())  # the fixed table is not saved
    mean = registry.create_model("vit-tiny", pool="mean").eval()
    assert mean.cls_token is None
    assert registry.count_parameters(mean) == _vit_count(28, 4, 1, 128, 6, 256, 10, cls=False)
    x = torch.randn(2, 1, 28, 28)
    for model in (fixed.eval(), mean):
        assert model(x).shape == (2, 10)


def test_patch_embedding_is_a_linear_map_of_each_patch():
    """Eq. 1: the stride-P convolution equals flattening each P×P patch and multiplying by E."""
    torch.manual_seed(0)
    model = registry.create_model("vit-tiny")
    x = torch.randn(2, 1, 28, 28)
    conv = model.patch_embed(x)  # (B, 49, D)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 7, 7, 4, 4)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 49, 16)  # row-major patches, (C, P, P) flattened
    proj = model.patch_embed.proj
    linear = patches @ proj.weight.reshape(128, 16).T + proj.bias
    torch.testing.assert_close(conv, linear, rtol=1e-5, atol=1e-5)


def test_the_class_token_sees_the_image():
    torch.manual_seed(0)
    model = registry.create_model("vit-tiny").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        a = model(x)
        x[1, :, :4, :4] += 1.0  # change one patch of the second image only
        b = model(x)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for positional in ("learned", "sinusoidal"):
        model = registry.create_model("vit-tiny", depth=2, positional=positional)
        F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_a_tiny_vit_overfits_a_few_batches():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=4, in_channels=1, num_classes=4, embed_dim=32, depth=2,
                          num_heads=2, mlp_dim=64))
    x = torch.randn(64, 1, 16, 16)
    y = torch.randint(0, 4, (64,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(60):
        for i in range(0, 64, 32):
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
    model = registry.create_model("vit-tiny", depth=2).eval()
    save_tensors(model.state_dict(), tmp_path / "vit.safetensors")
    rebuilt = registry.build_model("vit-tiny", dataclasses.asdict(model.config)).eval()
    rebuilt.load_state_dict(load_tensors(tmp_path / "vit.safetensors"))  # strict
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_example_input_and_summary():
    from duboko.evaluate.summary import summarize_registered

    model = registry.create_model("vit-tiny")
    (x,) = registry.example_input("vit-tiny", 2, model)
    assert x.shape == (2, 1, 28, 28) and model(x).shape == (2, 10)
    assert summarize_registered("vit-tiny").total_params == 805_130


def test_bad_configs_and_inputs():
    with pytest.raises(DubokoError, match="multiple of patch_size.*image_size=30, patch_size=4"):
        registry.create_model("vit-tiny", image_size=30)
    with pytest.raises(DubokoError, match="not divisible by num_heads"):
        registry.create_model("vit-tiny", num_heads=3)
    with pytest.raises(DubokoError, match="positional must be one of learned, sinusoidal, got 'rotary'"):
        registry.create_model("vit-tiny", positional="rotary")
    with pytest.raises(DubokoError, match="pool must be"):
        registry.create_model("vit-tiny", pool="max")
    model = registry.create_model("vit-tiny")
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
