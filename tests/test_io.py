import os
import stat

import pytest
import torch

from duboko.errors import DubokoError
from duboko.io import atomic_write_text, load_tensors, save_tensors


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044  # readable like a file open() would make

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(DubokoError, match="No space left"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind


def test_tied_tensors_save_and_load(tmp_path):
    w = torch.randn(4, 3)
    save_tensors({"embed.weight": w, "head.weight": w}, tmp_path / "m.safetensors")
    got = load_tensors(tmp_path / "m.safetensors")
    assert torch.equal(got["embed.weight"], w) and torch.equal(got["head.weight"], w)


def test_pickles_are_refused(tmp_path):
    import pickle

    (tmp_path / "p.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DubokoError, match="pickle"):
        load_tensors(tmp_path / "p.safetensors")
