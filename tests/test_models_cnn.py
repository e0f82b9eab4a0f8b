import torch
import torch.nn as nn
import torch.nn.functional as F

from duboko import registry

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


class PrimerNet(nn.Module):
    """The primer's own MY_NET code, as a user would have written it."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(128 * 12 * 12, 512)
        self.fc2 = nn.Linear(512, num_classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool1(F.relu(self.conv2(x)))
        x = self.pool2(F.relu(self.conv3(x)))
        x = x.view(x.size(0), -1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


def test_primer_state_dict_loads_and_gives_same_outputs():
    torch.manual_seed(0)
    primer = PrimerNet().eval()
    ours = registry.create_model("my_net").eval()
    ours.load_state_dict(primer.state_dict())  # strict: same names and shapes
    x = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(ours(x), primer(x))


def test_bad_model_names_and_fields():
    import pytest

    from duboko.errors import DubokoError

    with pytest.raises(DubokoError, match="unknown model 'nope'.*my_net"):
        registry.create_model("nope")
    with pytest.raises(DubokoError, match="no field 'width'"):
        registry.create_model("my_net", width=3)
    with pytest.raises(DubokoError, match="divisible by 4"):
        registry.create_model("my_net", image_size=30)
