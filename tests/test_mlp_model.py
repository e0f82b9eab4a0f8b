"""The `mlp` family: shapes, flattening, activations by name, dropout, registry variants."""

import pytest
import torch
from torch import nn

from duboko import registry
from duboko.errors import DubokoError
from duboko.models.mlp import MLP, MLPConfig
from duboko.nn.activations import HIDDEN_ACTIVATIONS


def test_mnist_variant_takes_images_and_vectors():
    torch.manual_seed(0)
    model = registry.create_model("mlp-mnist").eval()
    images = torch.randn(3, 1, 28, 28)
    out = model(images)
    assert out.shape == (3, 10)
    torch.testing.assert_close(model(images.reshape(3, 784)), out)


def test_layers_follow_the_config():
    model = MLP(MLPConfig(in_features=5, hidden_sizes=[7, 3], out_features=2, activation="tanh", dropout=0.1))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(5, 7), (7, 3), (3, 2)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    # parameters: (5+1)·7 + (7+1)·3 + (3+1)·2
    assert registry.count_parameters(model) == 42 + 24 + 8


def test_no_hidden_layer_is_a_linear_model():
    model = MLP(MLPConfig(in_features=4, hidden_sizes=[], out_features=1))
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [nn.Linear]
    assert model(torch.randn(2, 4)).shape == (2, 1)


@pytest.mark.parametrize("name", HIDDEN_ACTIVATIONS)
def test_every_hidden_activation_builds_and_matches_by_hand(name):
    torch.manual_seed(1)
    model = MLP(MLPConfig(in_features=3, hidden_sizes=[4], out_features=2, activation=name)).eval()
    x = torch.randn(5, 3)
    fc1, head = model.hidden.fc1, model.head
    from duboko.nn.activations import get

    expected = head(get(name).fn(fc1(x)))  # W2 σ(W1 x + b1) + b2
    torch.testing.assert_close(model(x), expected)


def test_dropout_is_off_in_eval_and_on_in_train():
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=8, hidden_sizes=[64], out_features=4, dropout=0.5))
    x = torch.randn(16, 8)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_bad_activation_lists_valid_names():
    with pytest.raises(DubokoError) as err:
        registry.create_model("mlp", activation="softmax")
    for name in HIDDEN_ACTIVATIONS:
        assert name in str(err.value)
    with pytest.raises(DubokoError, match="expected one of"):
        registry.create_model("mlp", activation="relu6")


def test_bad_sizes_are_user_errors():
    with pytest.raises(DubokoError, match="dropout"):
        registry.create_model("mlp", dropout=1.0)
    with pytest.raises(DubokoError, match="hidden_sizes"):
        registry.create_model("mlp", hidden_sizes=[0])


def test_wrong_input_width_says_what_it_expected():
    model = registry.create_model("mlp", in_features=10)
    with pytest.raises(ValueError, match="expects 10 input features"):
        model(torch.randn(2, 11))


def test_variants_are_registered():
    names = registry.model_names()
    for n in ("mlp", "mlp-mnist", "mlp-tabular"):
        assert n in names
        assert registry.get_spec(n).family == "mlp"
