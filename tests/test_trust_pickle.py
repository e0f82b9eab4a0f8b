"""A malicious pickle disguised as a checkpoint never runs: every load path refuses it with one
clear line (exit 2) and the file its unpickling would create never appears.

The payload's `__reduce__` returns `(open, (MARKER, "w"))`: unpickling it calls `open` and so
creates MARKER. A control check below unpickles one copy on purpose to prove the payload is live.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from duboko import registry
from duboko.cli.main import main
from duboko.io import load_tensors
from duboko.train.run import write_manifest

TINY = [
    "--set", "data.image_size=16", "--set", "model.image_size=16", "--set", "data.limit_train=64",
    "--set", "data.limit_test=50", "--set", "train.num_threads=1", "--set", "epochs=1", "--set", "batch_size=32",
]


class Payload:
    """Creates `marker` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_bytes(marker: Path, protocol: int) -> bytes:
    return pickle.dumps({"conv1.weight": Payload(marker)}, protocol=protocol)


def torch_save_bytes(marker: Path) -> bytes:
    """A .pt that looks like a MY_NET state dict with one poisoned entry (torch.save's zip format)."""
    sd = registry.create_model("my_net", image_size=16).state_dict()
    sd["conv1.bias"] = Payload(marker)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust_pickle") / "run"
    assert main(["train", "mnist-cnn", "--out", str(run), "--quiet", *TINY]) == 0
    return run


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "control_marker"
    pickle.loads(pickle_bytes(marker, 2))
    assert marker.exists()
    marker2 = tmp_path / "control_marker_pt"
    torch.load(io.BytesIO(torch_save_bytes(marker2)), weights_only=False)  # what duboko never does
    assert marker2.exists()


@pytest.mark.parametrize("fmt", ["pickle0", "pickle2", "pickle5", "torch_zip"])
@pytest.mark.parametrize("target", ["model.safetensors", "state.safetensors"])
def test_every_load_path_refuses_a_disguised_pickle(trained, tmp_path, capsys, fmt, target):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "PWNED"
    data = torch_save_bytes(marker) if fmt == "torch_zip" else pickle_bytes(marker, int(fmt[-1]))
    (run / target).write_bytes(data)
    # The attacker also rewrites the manifest, so the refusal below is the loader's own, not the hash check.
    write_manifest(run)
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(image)

    commands = [["verify", str(run)]]
    if target == "model.safetensors":
        commands += [["eval", str(run)], ["predict", str(run), str(image)]]
    else:  # resume reads the state (and would overwrite model.safetensors at the next epoch end)
        commands += [["train", "--resume", str(run), "--set", "epochs=2"]]
    for argv in commands:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert target in line and ("pickle" in line or "not a valid safetensors" in line), line
        assert not marker.exists(), argv
    assert (run / target).read_bytes() == data  # nothing was "repaired" over the evidence either


def test_tampered_pickle_without_new_manifest_is_caught_by_the_hash(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "PWNED"
    (run / "model.safetensors").write_bytes(pickle_bytes(marker, 2))
    assert main(["eval", str(run)]) == 2
    line = _one_error_line(capsys)
    assert "model.safetensors" in line and "SHA-256" in line
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["torch_zip", "pickle2"])
def test_import_weights_refuses_a_poisoned_pt(tmp_path, capsys, fmt):
    marker = tmp_path / "PWNED"
    src = tmp_path / "primer_weights.pt"
    src.write_bytes(torch_save_bytes(marker) if fmt == "torch_zip" else pickle_bytes(marker, 2))
    out = tmp_path / "w.safetensors"
    assert main(["import-weights", str(src), "--model", "my_net", "--set", "image_size=16", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "refused" in line or "not a readable torch.save file" in line, line
    assert not marker.exists() and not out.exists()


def test_import_weights_converts_a_real_state_dict(tmp_path, capsys):
    """The primer's own `torch.save(model.state_dict(), ...)`, also nested and DDP-prefixed."""
    torch.manual_seed(0)
    model = registry.create_model("my_net", image_size=16)
    sd = model.state_dict()
    variants = {
        "plain.pt": sd,
        "nested.pt": {"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}},
        "ddp.pt": {f"module.{k}": v for k, v in sd.items()},
    }
    for name, obj in variants.items():
        src, out = tmp_path / name, tmp_path / f"{name}.safetensors"
        torch.save(obj, src)
        assert main(["import-weights", str(src), "--model", "my_net", "--set", "image_size=16", "--out", str(out)]) == 0
        loaded = load_tensors(out)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    capsys.readouterr()
    # The wrong size of model: one line naming the tensor and both shapes.
    assert main(["import-weights", str(tmp_path / "plain.pt"), "--model", "my_net", "--out", str(tmp_path / "x.safetensors")]) == 2
    line = _one_error_line(capsys)
    assert "fc1.weight" in line and "(512, 2048)" in line
    # Not a torch file at all; a missing file; an existing output.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a pickle")
    for argv in (["import-weights", str(junk), "--model", "my_net", "--out", str(tmp_path / "y.safetensors")],
                 ["import-weights", str(tmp_path / "nope.pt"), "--model", "my_net", "--out", str(tmp_path / "y.safetensors")],
                 ["import-weights", str(tmp_path / "plain.pt"), "--model", "my_net", "--set", "image_size=16",
                  "--out", str(tmp_path / "plain.pt.safetensors")],
                 ["import-weights", str(tmp_path / "plain.pt"), "--model", "no_such_net", "--out", str(tmp_path / "z.safetensors")]):
        assert main(argv) == 2, argv
        _one_error_line(capsys)


# The static no-unpickling check (aliases, `from` imports, torch.jit, numpy...) is
# tests/test_trust_unpickle_ast.py.
