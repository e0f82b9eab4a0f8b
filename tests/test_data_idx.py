import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from duboko.data import idx, mnist
from duboko.errors import DubokoError


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_reads_raw_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(a)
    (tmp_path / "x").write_bytes(raw)
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    sha = hashlib.sha256(raw).hexdigest()
    for name in ("x", "x.gz"):
        got = idx.read_idx(tmp_path / name, sha256=sha, expected_shape=(2, 3, 4))
        np.testing.assert_array_equal(got, a)


def test_truncated_payload(tmp_path):
    raw = _idx_bytes(np.zeros((5, 4), np.uint8))
    (tmp_path / "t").write_bytes(raw[:-3])
    with pytest.raises(DubokoError, match=r"truncated.*t"):
        idx.read_idx(tmp_path / "t")


def test_truncated_gzip_stream(tmp_path):
    gz = gzip.compress(_idx_bytes(np.zeros((50, 40), np.uint8)))
    (tmp_path / "t.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DubokoError, match=r"t\.gz.*(truncated|corrupt)"):
        idx.read_idx(tmp_path / "t.gz")


def test_wrong_magic(tmp_path):
    (tmp_path / "m").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 12)
    with pytest.raises(DubokoError, match="bad magic"):
        idx.read_idx(tmp_path / "m")
    (tmp_path / "short").write_bytes(b"\x00")
    with pytest.raises(DubokoError, match="not an IDX file"):
        idx.read_idx(tmp_path / "short")


def test_wrong_checksum(tmp_path):
    (tmp_path / "c").write_bytes(_idx_bytes(np.ones((3, 3), np.uint8)))
    with pytest.raises(DubokoError, match="wrong checksum"):
        idx.read_idx(tmp_path / "c", sha256="0" * 64)


def test_wrong_shape_and_missing(tmp_path):
    (tmp_path / "s").write_bytes(_idx_bytes(np.ones((3, 3), np.uint8)))
    with pytest.raises(DubokoError, match="expected"):
        idx.read_idx(tmp_path / "s", expected_shape=(3, 4))
    with pytest.raises(DubokoError, match="does not exist"):
        idx.read_idx(tmp_path / "nope")


def test_bundled_mnist_loads_with_checksums():
    x, y = mnist.load_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and int(y.min()) == 0 and int(y.max()) == 9
    # The statistics the recipe normalises with (train set): a real-data sanity check.
    xt, _ = mnist.load_mnist("train")
    assert abs(xt.float().div(255).mean().item() - mnist.MEAN) < 1e-3
    assert abs(xt.float().div(255).std().item() - mnist.STD) < 1e-3


def test_data_dir_search_order(tmp_path, monkeypatch):
    with pytest.raises(DubokoError, match="does not exist"):
        mnist.locate(tmp_path / "missing")
    with pytest.raises(DubokoError, match="lacks MNIST files"):
        mnist.locate(tmp_path)
    monkeypatch.setenv("DUBOKO_DATA", str(tmp_path))
    assert mnist.locate() == mnist.bundled_dir()  # empty $DUBOKO_DATA falls through to the bundled copy


def test_offline_download_says_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", ["http://127.0.0.1:9/"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DubokoError, match=r"download failed.*127\.0\.0\.1"):
        mnist.locate(download=True)


def test_corrupt_file_in_data_dir_names_the_file(tmp_path):
    for stem, _, _ in mnist.FILES.values():
        (tmp_path / f"{stem}.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DubokoError, match=r"t10k-images-idx3-ubyte\.gz"):
        mnist.load_mnist("test", tmp_path)


def test_load_split_limits_and_holds_out_a_fixed_validation_split():
    x, y = mnist.load_split("test", limit=300)
    full_x, full_y = mnist.load_mnist("test")
    assert torch.equal(x, full_x[:300]) and torch.equal(y, full_y[:300])
    assert len(mnist.load_split("test")[0]) == 10000  # limit 0: every image
    with pytest.raises(DubokoError, match="limit"):
        mnist.load_split("test", limit=-1)
    (tx, ty), (vx, vy) = mnist.hold_out_validation(x, y, 30)
    assert len(tx) == 270 and len(vx) == 30
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(mnist.SPLIT_SEED))
    assert torch.equal(vx, x[perm[:30]]) and torch.equal(ty, y[perm[30:]])
    (again, _), _ = mnist.hold_out_validation(x, y, 30)
    assert torch.equal(again, tx)  # the same for every run
