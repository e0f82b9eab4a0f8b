"""Every activation and its hand-written derivative against torch's implementation and autograd."""

import pytest
import torch
import torch.nn.functional as F

from duboko.errors import DubokoError
from duboko.nn import activations as A

TORCH_REFERENCE = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "silu": F.silu,
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


def _inputs() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64) * 4
    x[0, :3] = torch.tensor([-1e-3, 1e-3, 20.0])  # around the kink, and a large value
    return x


def test_every_activation_has_a_reference():
    assert set(A.ACTIVATIONS) == set(TORCH_REFERENCE)


@pytest.mark.parametrize("name", sorted(TORCH_REFERENCE))
def test_function_matches_torch(name):
    x = _inputs()
    torch.testing.assert_close(A.get(name).fn(x), TORCH_REFERENCE[name](x))
    # and the module that models use is torch's own
    torch.testing.assert_close(A.get_activation(name)(x), TORCH_REFERENCE[name](x))


@pytest.mark.parametrize("name", sorted(n for n in TORCH_REFERENCE if n != "softmax"))
def test_derivative_matches_autograd(name):
    x = _inputs().requires_grad_(True)
    (grad,) = torch.autograd.grad(TORCH_REFERENCE[name](x).sum(), x)
    torch.testing.assert_close(A.get(name).derivative(x.detach()), grad)


def test_softmax_jacobian_matches_autograd():
    x = _inputs()[0]
    jac = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, dim=-1), x)
    torch.testing.assert_close(A.softmax_jacobian(x), jac)
    torch.testing.assert_close(A.softmax_derivative(x), torch.diagonal(jac))
    # batched Jacobian
    xb = _inputs()
    assert A.softmax_jacobian(xb).shape == (4, 7, 7)


def test_softmax_is_stable_for_huge_logits():
    x = torch.tensor([1000.0, 1000.0, -1000.0])
    torch.testing.assert_close(A.softmax(x), torch.tensor([0.5, 0.5, 0.0]))


def test_unknown_activation_lists_valid_names():
    with pytest.raises(DubokoError) as err:
        A.get_activation("swish2")
    msg = str(err.value)
    assert "'swish2'" in msg
    for name in A.ACTIVATIONS:
        assert name in msg
