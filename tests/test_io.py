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


def test_writes_never_follow_a_symlinked_sub_folder_of_a_run(tmp_path):
    from duboko.errors import DubokoError
    from duboko.io import atomic_write_bytes

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"sha256": {}}')
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "plots").symlink_to(outside)
    with pytest.raises(DubokoError, match="symlink inside run folder"):
        atomic_write_bytes(run / "plots" / "loss.png", b"x")
    with pytest.raises(DubokoError, match="symlink inside run folder"):
        atomic_write_bytes(run / "plots" / "deeper" / "loss.png", b"x")
    assert list(outside.iterdir()) == []
    # A real sub-folder is fine; so is a run folder reached through a link, and links outside runs.
    atomic_write_bytes(run / "real" / "loss.png", b"x")
    assert (run / "real" / "loss.png").read_bytes() == b"x"
    (tmp_path / "link-to-run").symlink_to(run)
    atomic_write_bytes(tmp_path / "link-to-run" / "a.json", b"{}")
    assert (run / "a.json").read_bytes() == b"{}"
    (tmp_path / "link-out").symlink_to(outside)
    atomic_write_bytes(tmp_path / "link-out" / "b.png", b"y")
    assert (outside / "b.png").read_bytes() == b"y"
