"""`duboko summary`: the primer's arithmetic for MY_NET, and counts equal to torchinfo's on every
registered model (including the families other modules add)."""

import json
import re

import pytest
import torch
from torch import nn

from duboko import registry
from duboko.evaluate.summary import make_inputs, param_formula, summarize, summarize_registered

torchinfo = pytest.importorskip("torchinfo")

FORWARD_LIMIT = 12_000_000  # bigger models (gpt2-small) are counted without a forward pass


def _eval_formula(formula: str) -> int:
    lhs = formula.split(" = ")[0] if " = " in formula else formula
    expr = lhs.replace("·", "*").replace(",", "")
    assert re.fullmatch(r"[0-9*+() ]+", expr), formula
    return eval(expr)  # digits and * + ( ) only, checked above


def test_my_net_matches_the_primer():
    s = summarize_registered("my_net", [[3, 48, 48]])
    rows = {r.name: r for r in s.rows}
    expected = {
        "conv1": ("(B, 32, 48, 48)", 896, "(3·3·3+1)·32 = 896"),
        "conv2": ("(B, 64, 48, 48)", 18_496, "(3·3·32+1)·64 = 18,496"),
        "conv3": ("(B, 128, 24, 24)", 73_856, "(3·3·64+1)·128 = 73,856"),
        "fc1": ("(B, 512)", 9_437_696, "(18432+1)·512 = 9,437,696"),
        "fc2": ("(B, 10)", 5_130, "(512+1)·10 = 5,130"),
    }
    for name, (shape, count, formula) in expected.items():
        assert (rows[name].output_shape, rows[name].params, rows[name].formula) == (shape, count, formula)
    assert rows["pool1"].output_shape == "(B, 64, 24, 24)" and rows["pool2"].output_shape == "(B, 128, 12, 12)"
    assert s.total_params == s.trainable_params == 9_536_074
    # mult-adds: k·k·Cin·Cout·H·W per conv, in·out per linear (bias adds not counted)
    assert rows["conv1"].mult_adds == 3 * 3 * 3 * 32 * 48 * 48
    assert rows["fc1"].mult_adds == 18432 * 512
    assert s.param_bytes == 9_536_074 * 4
    d = json.loads(json.dumps(s.to_dict()))
    assert d["total_params"] == 9_536_074 and d["layers"][1]["formula"] == "(3·3·3+1)·32 = 896"


def test_cli_json(capsys):
    from duboko.cli.main import main

    assert main(["summary", "my_net", "--input-shape", "3,48,48", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["params"] for r in d["layers"] if r["params"]] == [896, 18_496, 73_856, 9_437_696, 5_130]
    assert d["layers"][1]["output_shape"] == "(B, 32, 48, 48)" and d["layers"][-1]["output_shape"] == "(B, 10)"


def test_cli_user_errors_are_one_line(capsys):
    from duboko.cli.main import main

    assert main(["summary", "my_net", "--input-shape", "3,64,64"]) == 2
    assert "cannot run on input shape" in capsys.readouterr().err
    assert main(["summary", "not-a-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'not-a-model'" in err and "my_net" in err
    assert main(["summary", "my_net", "--input-shape", "3,a"]) == 2


def test_formulas_for_common_layers():
    cases = [
        nn.Linear(18432, 512),
        nn.Linear(10, 3, bias=False),
        nn.Conv2d(3, 32, 3),
        nn.Conv2d(8, 16, (3, 5), groups=4, bias=False),
        nn.ConvTranspose2d(16, 8, 4, stride=2),
        nn.Conv1d(4, 6, 3),
        nn.Embedding(65, 128),
        nn.LayerNorm(64),
        nn.BatchNorm2d(32),
        nn.GroupNorm(4, 32),
        nn.LSTM(10, 20, num_layers=2),
        nn.GRU(10, 20, bidirectional=True),
        nn.RNN(5, 7, bias=False),
        nn.MultiheadAttention(16, 4),
    ]
    for m in cases:
        own = list(m.named_parameters(recurse=False))
        formula = param_formula(m, own)
        total = sum(p.numel() for _, p in own)
        assert _eval_formula(formula) == total, (m, formula)
        assert formula.endswith(f"{total:,}")


def test_tied_weights_are_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    x = torch.randint(0, 11, (1, 5))
    s = summarize(Tied(), (x,), (torch.randint(0, 11, (2, 5)),))
    assert s.total_params == 44 and s.params_counting_shared == 88
    head = next(r for r in s.rows if r.name == "head")
    assert head.params == 0 and "shared with emb" in head.note
    assert head.output_shape == "(B, 5, 11)"


@pytest.mark.parametrize("name", registry.model_names())
def test_counts_equal_torchinfo(name):
    torch.manual_seed(0)
    spec = registry.get_spec(name)
    with torch.device("meta"):
        size = registry.count_parameters(registry.create_model(name))
    if size > FORWARD_LIMIT or spec.example_input is None:
        with torch.device("meta"):  # no memory, no forward pass: parameters only
            model = registry.create_model(name)
        s = summarize(model, None, name=name)
        assert s.total_params == sum(p.numel() for p in model.parameters())
        assert s.params_counting_shared == sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
        return
    model = registry.create_model(name)
    s = summarize_registered(name)
    inputs = make_inputs(name, model, None, 1)
    info = torchinfo.summary(model, input_data=list(inputs), verbose=0, device="cpu")
    # torchinfo counts a tied weight at each layer that uses it; duboko counts it once and
    # reports torchinfo's convention beside it.
    assert s.params_counting_shared == info.total_params
    assert s.total_params == sum(p.numel() for p in model.parameters())
    if s.total_params == info.total_params:
        assert s.trainable_params == info.trainable_params
    # per layer: every leaf layer's parameters as torchinfo counts them
    ours = {r.name: r for r in s.rows}
    checked = 0
    for layer in info.summary_list:
        if layer.is_leaf_layer and not layer.is_recursive:
            qual = next((q for q, m in model.named_modules() if m is layer.module), None)
            if qual in ours and "shared" not in ours[qual].note:
                checked += 1
                assert ours[qual].params == layer.num_params, (qual, ours[qual].params, layer.num_params)
    assert checked > 0
    # every formula evaluates to its count
    for r in s.rows:
        if r.formula and any(c in r.formula for c in "·+"):
            assert _eval_formula(r.formula) == r.params, (r.name, r.formula)
