import torch
import torch.nn.functional as F

from duboko import registry
from duboko.bench.reference import PrimerNet

EXPECTED = {"conv1": 896, "conv2": 18_496, "conv3": 73_856, "fc1": 9_437_696, "fc2": 5_130}


def test_my_net_shapes_and_parameter_counts():
    model = registry.create_model("my_net")
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children() if any(True for _ in m.parameters())}
    assert counts == EXPECTED
    assert registry.count_parameters(model) == 9_536_074
    x = torch.randn(2, 3, 48, 48)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, 512)
    assert registry.create_model("my_net", num_classes=7)(x).shape == (2, 7)


def test_primer_state_dict_loads_and_gives_same_outputs():
    torch.manual_seed(0)
    primer = PrimerNet().eval()
    ours = registry.create_model("my_net").eval()
    ours.load_state_dict(primer.state_dict())  # strict: same names and shapes
    x = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(ours(x), primer(x))


def test_relu_after_pool_gives_the_primers_gradients():
    """duboko's forward pools before the ReLU and runs ReLU in place; values and gradients must be
    the primer's (ties at exactly zero included: ReLU's gradient there is zero either way)."""
    torch.manual_seed(1)
    primer = PrimerNet(image_size=16)
    ours = registry.create_model("my_net", image_size=16)
    ours.load_state_dict(primer.state_dict())
    x = torch.randn(4, 3, 16, 16)
    x[0, :, :4, :4] = 0.0  # whole pooling windows of zeros / negatives
    y = torch.tensor([0, 3, 5, 9])
    for model in (primer, ours):
        model.train()
        torch.manual_seed(2)  # same dropout mask
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(primer.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bad_model_names_and_fields():
    import pytest

    from duboko.errors import DubokoError

    with pytest.raises(DubokoError, match="unknown model 'nope'.*my_net"):
        registry.create_model("nope")
    with pytest.raises(DubokoError, match="no field 'width'"):
        registry.create_model("my_net", width=3)
    with pytest.raises(DubokoError, match="divisible by 4"):
        registry.create_model("my_net", image_size=30)
