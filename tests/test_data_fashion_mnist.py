"""Fashion-MNIST lookup, checks and checksummed download, on tiny IDX files the tests write (the
download from a local HTTP server, never the network), plus one test on the Debian package."""

import gzip
import hashlib
import http.server
import stat
import struct
import threading

import numpy as np
import pytest
import torch

from duboko.data import fashion_mnist as fm
from duboko.errors import DubokoError


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny(monkeypatch):
    """Four tiny IDX files (train 6 images, test 4) and FILES pointing at their checksums.

    Returns {stem: raw IDX bytes}; the Debian package and the user's own folders are kept out of
    the lookup."""
    rng = np.random.default_rng(0)
    arrays = {
        ("train", "images"): rng.integers(0, 256, (6, 28, 28)).astype(np.uint8),
        ("train", "labels"): np.array([0, 1, 2, 3, 8, 9], np.uint8),
        ("test", "images"): rng.integers(0, 256, (4, 28, 28)).astype(np.uint8),
        ("test", "labels"): np.array([9, 5, 7, 0], np.uint8),
    }
    raw, files = {}, {}
    for key, array in arrays.items():
        stem = fm.FILES[key].stem
        raw[stem] = _idx(array)
        gz = gzip.compress(raw[stem], mtime=0)
        files[key] = fm.IdxFile(stem, hashlib.sha256(raw[stem]).hexdigest(), hashlib.md5(gz).hexdigest(), array.shape)
    monkeypatch.setattr(fm, "FILES", files)
    monkeypatch.setattr(fm, "DEBIAN_DIR", fm.Path("/nonexistent/fashion-mnist"))
    monkeypatch.setattr(fm.shutil, "which", lambda name: None)  # no dpkg to ask
    fm.debian_dir.cache_clear()
    monkeypatch.delenv("DUBOKO_DATA", raising=False)
    monkeypatch.delenv("DUBOKO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent/xdg")
    yield {"raw": raw, "arrays": arrays}
    fm.debian_dir.cache_clear()


def _write(folder, raw, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, data in raw.items():
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / stem).write_bytes(data)


def test_class_names_and_constants():
    assert fm.CLASSES == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                          "Sneaker", "Bag", "Ankle boot"]
    assert fm.DEBIAN_DIR == fm.Path("/usr/share/datasets/fashion-mnist")
    assert {f.shape for f in fm.FILES.values()} == {(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)}


@pytest.mark.parametrize("compress", [True, False])
def test_loads_tiny_files_from_data_dir(tmp_path, tiny, compress):
    _write(tmp_path / "d", tiny["raw"], compress)
    x, y = fm.load_fashion_mnist("train", tmp_path / "d")
    assert x.dtype == torch.uint8 and x.shape == (6, 28, 28) and y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), tiny["arrays"]["train", "images"])
    assert y.tolist() == [0, 1, 2, 3, 8, 9]
    xt, yt = fm.load_fashion_mnist("test", tmp_path / "d")
    assert xt.shape == (4, 28, 28) and [fm.CLASSES[i] for i in yt] == ["Ankle boot", "Sandal", "Sneaker", "T-shirt/top"]


def test_search_order(tmp_path, tiny, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(DubokoError, match=r"Fashion-MNIST not found.*apt-get install dataset-fashion-mnist.*data\.download"):
        fm.locate(cache_root=cache)
    # the user cache
    _write(cache / "fashion-mnist", tiny["raw"])
    assert fm.locate(cache_root=cache) == cache / "fashion-mnist"
    monkeypatch.setenv("DUBOKO_CACHE", str(cache))
    assert fm.locate() == cache / "fashion-mnist"
    # the Debian package's folder comes before the cache
    debian = tmp_path / "usr-share-datasets"
    _write(debian, tiny["raw"])
    monkeypatch.setattr(fm, "DEBIAN_DIR", debian)
    fm.debian_dir.cache_clear()
    assert fm.locate() == debian
    # $DUBOKO_DATA itself, then its fashion-mnist sub-folder, come before the package
    data = tmp_path / "data"
    _write(data, tiny["raw"])
    monkeypatch.setenv("DUBOKO_DATA", str(data))
    assert fm.locate() == data
    _write(data / "fashion-mnist", tiny["raw"])
    assert fm.locate() == data / "fashion-mnist"
    # an explicit folder wins, and is never fallen back from
    mine = tmp_path / "mine"
    _write(mine, tiny["raw"])
    assert fm.locate(mine) == mine
    with pytest.raises(DubokoError, match="does not exist"):
        fm.locate(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DubokoError, match="lacks Fashion-MNIST files: train-labels-idx1-ubyte, t10k"):
        fm.locate(tmp_path / "half")


def test_debian_folder_found_through_dpkg_when_not_at_the_usual_path(tmp_path, tiny, monkeypatch):
    folder = tmp_path / "elsewhere" / "fashion-mnist"
    _write(folder, tiny["raw"])
    dpkg = tmp_path / "dpkg"
    dpkg.write_text(f"#!/bin/sh\necho /.\necho {folder}\necho {folder}/train-images-idx3-ubyte.gz\n")
    dpkg.chmod(dpkg.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(fm.shutil, "which", lambda name: str(dpkg) if name == "dpkg" else None)
    fm.debian_dir.cache_clear()
    assert fm.debian_dir() == folder
    assert fm.locate(cache_root=tmp_path / "cache") == folder
    # dpkg saying "not installed" (exit 1) is no package, not an error
    dpkg.write_text("#!/bin/sh\necho 'dpkg-query: package is not installed' >&2\nexit 1\n")
    fm.debian_dir.cache_clear()
    assert fm.debian_dir() is None


def test_no_download_unless_asked(tmp_path, tiny, monkeypatch):
    def no_network(url, timeout=30.0):
        raise AssertionError(f"tried to fetch {url}")

    monkeypatch.setattr(fm, "_fetch", no_network)
    with pytest.raises(DubokoError, match="not found"):
        fm.load_fashion_mnist("test", cache_root=tmp_path)


class _Server:
    """A local HTTP server serving {path: bytes}; anything else is a 404."""

    def __init__(self, files):
        handler_files = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = handler_files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_from_a_local_server_with_checksums(tmp_path, tiny, monkeypatch):
    good = {f"/good/{stem}.gz": gzip.compress(data, mtime=0) for stem, data in tiny["raw"].items()}
    # The first mirror serves different bytes under the right names: refused by checksum, and the
    # next mirror is tried.
    bad = {f"/bad/{stem}.gz": gzip.compress(data[:-1] + b"\x01", mtime=0) for stem, data in tiny["raw"].items()}
    with _Server({**good, **bad}) as server:
        monkeypatch.setattr(fm, "MIRRORS", [f"{server.url}/missing/", f"{server.url}/bad/", f"{server.url}/good/"])
        folder = fm.locate(download=True, cache_root=tmp_path / "cache")
        assert folder == tmp_path / "cache" / "fashion-mnist"
        x, y = fm.load_fashion_mnist("train", cache_root=tmp_path / "cache")
        np.testing.assert_array_equal(x.numpy(), tiny["arrays"]["train", "images"])
        # into an explicit folder when asked
        mine = fm.locate(tmp_path / "mine", download=True)
        assert mine == tmp_path / "mine" and len(list(mine.glob("*.gz"))) == 4
        # only bad copies: one error naming the checksums, nothing kept
        monkeypatch.setattr(fm, "MIRRORS", [f"{server.url}/bad/"])
        with pytest.raises(DubokoError, match=r"could not download.*MD5 [0-9a-f]{32} \(expected [0-9a-f]{32}\).*SHA-256"):
            fm.locate(download=True, cache_root=tmp_path / "other")
        assert not list((tmp_path / "other").rglob("*.gz"))


def test_a_recompressed_archive_is_accepted_by_its_decoded_checksum(tmp_path, tiny, monkeypatch):
    """The Debian package's .gz files differ from Zalando's byte-wise but decode to the same bytes."""
    served = {f"/{stem}.gz": gzip.compress(data, compresslevel=1, mtime=12345) for stem, data in tiny["raw"].items()}
    assert all(hashlib.md5(b).hexdigest() != f.md5_gz for b, f in zip(served.values(), fm.FILES.values()))
    with _Server(served) as server:
        monkeypatch.setattr(fm, "MIRRORS", [f"{server.url}/"])
        assert fm.locate(download=True, cache_root=tmp_path) == tmp_path / "fashion-mnist"


def test_offline_download_says_what_it_tried(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(fm, "MIRRORS", ["http://127.0.0.1:9/"])
    with pytest.raises(DubokoError, match=r"could not download.*127\.0\.0\.1:9"):
        fm.locate(download=True, cache_root=tmp_path)


def test_checked_like_mnist(tmp_path, tiny, monkeypatch):
    _write(tmp_path / "d", tiny["raw"])
    # a label out of range (with a matching checksum, so only the range check can catch it)
    labels = _idx(np.array([9, 5, 10, 0], np.uint8))
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    files = dict(fm.FILES)
    f = files["test", "labels"]
    files["test", "labels"] = f._replace(sha256=hashlib.sha256(labels).hexdigest())
    monkeypatch.setattr(fm, "FILES", files)
    with pytest.raises(DubokoError, match="labels .* hold 10; expected 0-9"):
        fm.load_fashion_mnist("test", tmp_path / "d")
    # a corrupt file is named; a wrong checksum and a wrong shape are refused
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DubokoError, match=r"t10k-images-idx3-ubyte\.gz"):
        fm.load_fashion_mnist("test", tmp_path / "d")
    _write(tmp_path / "e", {**tiny["raw"], "train-labels-idx1-ubyte": _idx(np.zeros(6, np.uint8))})
    with pytest.raises(DubokoError, match="wrong checksum"):
        fm.load_fashion_mnist("train", tmp_path / "e")
    with pytest.raises(DubokoError, match="unknown Fashion-MNIST split 'val'"):
        fm.load_fashion_mnist("val", tmp_path / "d")


def test_the_debian_package_if_installed():
    fm.debian_dir.cache_clear()
    folder = fm.debian_dir()
    if folder is None:
        reason = (f"Debian package {fm.DEBIAN_PACKAGE} is not installed (no {fm.DEBIAN_DIR}); "
                  f"`apt-get install {fm.DEBIAN_PACKAGE}` to run this test")
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    x, y = fm.load_fashion_mnist("test", folder)  # full checksum, shape and label checks
    assert x.shape == (10000, 28, 28) and y.bincount().tolist() == [1000] * 10
    xt, yt = fm.load_fashion_mnist("train", folder)
    assert xt.shape == (60000, 28, 28) and yt.bincount().tolist() == [6000] * 10
    pixels = xt.float().div(255)
    assert abs(pixels.mean().item() - fm.MEAN) < 1e-3 and abs(pixels.std().item() - fm.STD) < 1e-3
