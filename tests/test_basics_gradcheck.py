"""gradcheck: autograd against finite differences on MLP and MY_NET, and it catches a wrong backward."""

import torch
from torch import nn

from duboko import registry
from duboko.evaluate.gradcheck import check_model


def test_mlp_passes_every_entry():
    torch.manual_seed(0)
    model = registry.create_model("mlp", in_features=6, hidden_sizes=[5, 4], out_features=3, activation="tanh")
    report = check_model(model, (torch.randn(2, 6),), "mlp", max_entries=1000)
    assert report.passed
    assert not report.output_projection  # 2·3 outputs: the full Jacobian
    names = [r.tensor for r in report.rows]
    assert names == [n for n, _ in model.named_parameters()] + ["input[0]"]
    assert all(not r.sampled and r.checked == r.entries for r in report.rows)


def test_my_net_small_input_passes_with_sampled_entries():
    torch.manual_seed(0)
    model = registry.create_model("my_net", image_size=8)  # fc1: 128·2·2 = 512 inputs
    x = registry.example_input("my_net", 1, model)
    report = check_model(model, x, "my_net", max_entries=6)
    assert report.passed, report.format_table()
    fc1 = next(r for r in report.rows if r.tensor == "fc1.weight")
    assert fc1.sampled and fc1.checked == 6 and fc1.entries == 512 * 512
    assert "sampled" in report.format_table()


class _WrongSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x  # wrong: d(x²)/dx = 2x


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return _WrongSquare.apply(self.fc(x))


def test_a_wrong_backward_fails():
    torch.manual_seed(0)
    report = check_model(_Broken(), (torch.randn(2, 3),), "broken")
    assert not report.passed
    assert all(not r.passed for r in report.rows)
    assert all(r.max_abs_error and r.max_abs_error > 1e-3 for r in report.rows)
    assert "FAILED" in report.format_table()
