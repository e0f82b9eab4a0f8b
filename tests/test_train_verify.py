"""train/verify.py: run-folder verification and the one way in for a torch.save file
(torch.load(weights_only=True), then safetensors), checked without the CLI."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from duboko import registry
from duboko.errors import DubokoError
from duboko.io import atomic_write_json, load_tensors, save_tensors
from duboko.train.run import write_manifest
from duboko.train.verify import (
    check_fits,
    extract_state_dict,
    import_weights,
    read_torch_file,
    verify_run,
)

MLP = {"hidden_sizes": [8], "in_features": 4, "out_features": 3}


def _mlp():
    torch.manual_seed(0)
    return registry.create_model("mlp", **MLP)


# -- run folders ------------------------------------------------------------------------------


def _run_folder(tmp_path):
    run = tmp_path / "run"
    atomic_write_json(run / "config.json", {"task": "tabular"})
    save_tensors(_mlp().state_dict(), run / "model.safetensors")
    write_manifest(run)
    return run


def test_an_intact_run_verifies(tmp_path):
    run = _run_folder(tmp_path)
    assert verify_run(run) == {"run": str(run), "ok": True, "files": ["config.json", "model.safetensors"]}


def test_a_pickle_under_a_safetensors_name_is_refused_even_with_a_new_manifest(tmp_path):
    run = _run_folder(tmp_path)
    (run / "model.safetensors").write_bytes(pickle.dumps({"w": 1}, protocol=2))
    write_manifest(run)  # the hashes match: the refusal is the format check's
    with pytest.raises(DubokoError, match="pickle or a torch.save zip"):
        verify_run(run)
    (run / "model.safetensors").write_bytes(b"{}" * 10)
    write_manifest(run)
    with pytest.raises(DubokoError, match="not a valid safetensors file"):
        verify_run(run)


def test_a_changed_file_or_a_missing_folder_is_refused(tmp_path):
    run = _run_folder(tmp_path)
    (run / "config.json").write_text('{"task": "other"}')
    with pytest.raises(DubokoError, match="does not match its SHA-256"):
        verify_run(run)
    with pytest.raises(DubokoError, match="does not exist"):
        verify_run(tmp_path / "nope")


# -- torch.save files -------------------------------------------------------------------------


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_read_torch_file_refuses_code_and_junk(tmp_path):
    marker = tmp_path / "PWNED"
    poisoned = tmp_path / "poisoned.pt"
    torch.save({"w": Payload(marker)}, poisoned)
    with pytest.raises(DubokoError, match="refused"):
        read_torch_file(poisoned)
    assert not marker.exists()
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.ones(3)}, whole)
    assert torch.equal(read_torch_file(whole)["w"], torch.ones(3))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(DubokoError, match="not a readable torch.save file"):
        read_torch_file(truncated)
    with pytest.raises(DubokoError, match="does not exist"):
        read_torch_file(tmp_path / "nope.pt")


def test_extract_state_dict_finds_nested_dicts_and_strips_wrapper_prefixes():
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    assert extract_state_dict(sd, "f.pt") is not sd and extract_state_dict(sd, "f.pt").keys() == sd.keys()
    nested = {"epoch": 3, "model_state_dict": sd}
    assert extract_state_dict(nested, "f.pt").keys() == sd.keys()
    prefixed = {"module.a.weight": sd["a.weight"], "_orig_mod.b.bias": sd["b.bias"]}
    assert list(extract_state_dict(prefixed, "f.pt")) == ["a.weight", "b.bias"]
    assert extract_state_dict({"ema": sd, "model": {"x": 1}}, "f.pt", key="ema").keys() == sd.keys()
    with pytest.raises(DubokoError, match="has no key 'nope'; its top-level keys: ema"):
        extract_state_dict({"ema": sd}, "f.pt", key="nope")
    with pytest.raises(DubokoError, match="not a state dict of named tensors; .*key=NAME"):
        extract_state_dict({"epoch": 3}, "f.pt")
    with pytest.raises(DubokoError, match="holds list"):
        extract_state_dict([1, 2], "f.pt")


def test_check_fits_names_the_first_misfit():
    expected = _mlp().state_dict()
    check_fits(dict(expected), expected, "f.pt", "mlp")  # fits
    first = next(iter(expected))
    with pytest.raises(DubokoError, match=f"missing {first}"):
        check_fits({k: v for k, v in expected.items() if k != first}, expected, "f.pt", "mlp")
    with pytest.raises(DubokoError, match="unexpected extra"):
        check_fits({**expected, "extra": torch.ones(1)}, expected, "f.pt", "mlp")
    with pytest.raises(DubokoError, match=rf"{first} has shape \(1,\), the model expects"):
        check_fits({**expected, first: torch.ones(1)}, expected, "f.pt", "mlp")
    with pytest.raises(DubokoError, match="expected a floating-point tensor"):
        check_fits({**expected, first: expected[first].long()}, expected, "f.pt", "mlp")


def test_import_weights_writes_loadable_safetensors_with_provenance(tmp_path):
    model = _mlp()
    src, out = tmp_path / "ddp.pt", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, src)
    imported = import_weights(src, out, "mlp", MLP)
    sd = model.state_dict()
    assert imported.tensors == len(sd) and imported.values == sum(v.numel() for v in sd.values())
    loaded = load_tensors(out)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["imported_from"] == "ddp.pt" and len(meta["source_sha256"]) == 64
    assert json.loads(meta["model_config"])["hidden_sizes"] == [8]
    with pytest.raises(DubokoError, match="does not fit model 'mlp'"):
        import_weights(src, tmp_path / "small.safetensors", "mlp", {**MLP, "hidden_sizes": [4]})
    assert not (tmp_path / "small.safetensors").exists()
