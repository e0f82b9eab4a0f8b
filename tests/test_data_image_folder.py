"""Image folders: layouts, the decode-once cache (a second load decodes nothing, touching one file
re-decodes only it), the seeded split, bad files (one error, or skipped and counted) and the
path-safety rules. Images are real MNIST digits written as PNG files by the tests."""

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from duboko.data import image_folder as imf
from duboko.data.mnist import load_mnist
from duboko.errors import DubokoError


@pytest.fixture(scope="module")
def digits():
    """30 real digits: 10 each of 0, 1 and 7, (28, 28) uint8."""
    x, y = load_mnist("test")
    picks = {c: x[y == c][:10].numpy() for c in (0, 1, 7)}
    return picks


def _write_tree(root, digits, names=("zero", "one", "seven"), count=10, prefix=""):
    for name, (c, images) in zip(names, digits.items()):
        folder = root / prefix / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images[:count]):
            Image.fromarray(image).save(folder / f"{c}_{i:02d}.png")
    return root


def _load(root, cache, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("progress", False)
    return imf.load_image_folder(root, cache_root=cache, **kw)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims width × height (a decompression bomb's header)."""
    data = bytearray(_png_bytes(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# Layouts.


def test_class_folders_give_the_exact_pixels(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits)
    (root / "README.txt").write_text("not an image, ignored")
    (root / "one" / "notes.txt").write_text("ignored")
    (root / "one" / "._0_00.png").write_bytes(b"macOS resource fork, hidden: ignored")
    data = _load(root, tmp_path / "cache", image_size=28, channels=1, val_fraction=0.2)
    assert data.class_names == ["one", "seven", "zero"]  # sorted folder names
    assert isinstance(data.images, np.memmap) and data.images.dtype == np.uint8
    assert data.images.shape == (30, 1, 28, 28) and data.labels.dtype == np.int64
    assert data.files[0] == "one/1_00.png" and data.decoded == 30 and data.num_skipped == 0
    # No resize at 28×28 and grey in, grey out: the cache holds the digits exactly.
    for i, name in enumerate(data.files):
        c, k = name.split("/")[1].split("_")
        np.testing.assert_array_equal(data.images[i, 0], digits[int(c)][int(k[:2])])
        assert data.class_names[data.labels[i]] == name.split("/")[0]
    # 3 channels replicate the grey; resizing keeps the shape contract.
    rgb = _load(root, tmp_path / "cache", image_size=16, channels=3)
    assert rgb.images.shape == (30, 3, 16, 16)
    assert (rgb.images[:, 0] == rgb.images[:, 1]).all() and (rgb.images[:, 1] == rgb.images[:, 2]).all()
    x, y = rgb.tensors("train")
    assert x.dtype == torch.uint8 and x.shape == (len(rgb.splits["train"]), 3, 16, 16) and y.dtype == torch.int64
    assert rgb.metrics() == {"data.skipped_images": 0, "data.num_images": 30, "data.num_classes": 3}
    assert rgb.cache_path.parent == tmp_path / "cache" / "image-folder"


def test_integer_class_names_sort_numerically(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits, names=("10", "2", "0"), count=3)
    assert _load(root, tmp_path / "c", image_size=8).class_names == ["0", "2", "10"]


def test_train_val_and_train_test_layouts(tmp_path, digits):
    root = tmp_path / "pics"
    _write_tree(root, digits, count=6, prefix="train")
    _write_tree(root, {c: im[6:] for c, im in digits.items()}, count=4, prefix="val")
    data = _load(root, tmp_path / "c", image_size=8)
    assert data.class_names == ["one", "seven", "zero"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 18, "val": 12}
    assert all(data.files[i].startswith("val/") for i in data.splits["val"])
    assert data.eval_split == "val"
    os.rename(root / "val", root / "test")
    data = _load(root, tmp_path / "c", image_size=8)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 18, "test": 12} and data.eval_split == "test"
    (root / "test" / "eight").mkdir()
    Image.fromarray(digits[0][0]).save(root / "test" / "eight" / "x.png")
    with pytest.raises(DubokoError, match="test/eight .* has no match in .*train"):
        _load(root, tmp_path / "c", image_size=8)


def test_csv_of_path_and_label(tmp_path, digits):
    root = tmp_path / "set"
    (root / "img" / "a").mkdir(parents=True)
    rows = ["path,label"]
    for i in range(6):
        name = f"img/a/{i}.png"
        Image.fromarray(digits[7 if i % 2 else 0][i]).save(root / name)
        rows.append(f"{name},{'seven' if i % 2 else 'zero'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    data = _load(root / "labels.csv", tmp_path / "c", image_size=28, channels=1, val_fraction=0.0)
    assert data.class_names == ["seven", "zero"] and len(data.files) == 6 and len(data.splits["val"]) == 0
    for i, name in enumerate(data.files):
        k = int(name.split("/")[-1][0])
        np.testing.assert_array_equal(data.images[i, 0], digits[7 if k % 2 else 0][k])
    # Without a header, and with ./ and a/../ spellings of paths inside the folder.
    (root / "plain.csv").write_text("./img/a/0.png,zero\nimg/a/../a/1.png,seven\n")
    assert _load(root / "plain.csv", tmp_path / "c", image_size=8, val_fraction=0.0).files == ["img/a/0.png", "img/a/1.png"]


@pytest.mark.parametrize("bad_path", ["../outside.png", "img/../../outside.png", "/etc/passwd"])
def test_csv_paths_must_stay_inside_its_folder(tmp_path, digits, bad_path):
    root = tmp_path / "set"
    root.mkdir()
    Image.fromarray(digits[0][0]).save(tmp_path / "outside.png")
    Image.fromarray(digits[0][1]).save(root / "in.png")
    (root / "l.csv").write_text(f"in.png,zero\n{bad_path},one\n")
    with pytest.raises(DubokoError, match=r"line 2: path .* leads outside the CSV's folder"):
        _load(root / "l.csv", tmp_path / "c", image_size=8)


def test_csv_errors(tmp_path, digits):
    root = tmp_path / "set"
    root.mkdir()
    for i in range(2):
        Image.fromarray(digits[0][i]).save(root / f"{i}.png")
    (root / "cols.csv").write_text("0.png,zero,extra\n")
    with pytest.raises(DubokoError, match="line 1: expected 2 columns path,label, got 3"):
        _load(root / "cols.csv", tmp_path / "c", image_size=8)
    (root / "dup.csv").write_text("0.png,zero\n1.png,one\n./0.png,zero\n")
    with pytest.raises(DubokoError, match=r"line 3: './0.png' is listed twice \(first on line 1\)"):
        _load(root / "dup.csv", tmp_path / "c", image_size=8)
    (root / "missing.csv").write_text("0.png,zero\n1.png,one\nnope.png,one\n")
    with pytest.raises(DubokoError, match=r"1 bad image file .*nope\.png \(does not exist\)"):
        _load(root / "missing.csv", tmp_path / "c", image_size=8)
    assert _load(root / "missing.csv", tmp_path / "c", image_size=8, skip_bad_images=True).num_skipped == 1


# ---------------------------------------------------------------------------------------------
# The seeded split.


def test_split_is_seeded_stratified_and_stable():
    files = [f"c{c}/{i}.png" for c in range(3) for i in range(20)]
    labels = [c for c in range(3) for _ in range(20)]
    train, val = imf.split_indices(files, labels, 0.25, seed=1)
    assert len(val) == 15 and np.bincount(np.asarray(labels)[val]).tolist() == [5, 5, 5]  # stratified
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(60))
    again = imf.split_indices(list(files), list(labels), 0.25, seed=1)
    assert np.array_equal(again[1], val)  # a pure function of the seed and the names
    assert not np.array_equal(imf.split_indices(files, labels, 0.25, seed=2)[1], val)
    # Adding one file leaves every other file on its side (hash order, not a permutation).
    more_files, more_labels = files + ["c0/new.png"], labels + [0]
    _, val2 = imf.split_indices(more_files, more_labels, 0.25, seed=1)
    old_val = {files[i] for i in val}
    new_val = {more_files[i] for i in val2}
    assert len(old_val ^ new_val) <= 2
    # Simple (not stratified) split; tiny classes keep one image on each side.
    assert len(imf.split_indices(files, labels, 0.25, seed=1, stratified=False)[1]) == 15
    train, val = imf.split_indices(["a", "b", "c", "d"], [0, 0, 1, 1], 0.1)
    assert len(val) == 2 and len(train) == 2
    with pytest.raises(DubokoError, match=r"data.val_fraction must be in \[0, 1\), got 1.0"):
        imf.split_indices(files, labels, 1.0)


def test_split_of_a_folder_depends_on_the_seed_only(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits)
    a = _load(root, tmp_path / "c", image_size=8, val_fraction=0.3, seed=5)
    b = _load(root, tmp_path / "c", image_size=8, val_fraction=0.3, seed=5)
    c = _load(root, tmp_path / "c", image_size=8, val_fraction=0.3, seed=6)
    assert np.array_equal(a.splits["val"], b.splits["val"]) and not np.array_equal(a.splits["val"], c.splits["val"])
    assert np.bincount(a.labels[a.splits["val"]]).tolist() == [3, 3, 3]
    assert b.decoded == 0 and c.decoded == 0  # the split is not part of the cache


# ---------------------------------------------------------------------------------------------
# The cache.


def test_second_load_decodes_nothing_and_touching_a_file_rebuilds(tmp_path, digits, monkeypatch):
    root = _write_tree(tmp_path / "pics", digits)
    cache = tmp_path / "cache"
    first = _load(root, cache, image_size=16)
    assert first.decoded == 30
    calls = []
    real_decode = imf._decode_file

    def counting(path, *args):
        calls.append(path.name)
        return real_decode(path, *args)

    monkeypatch.setattr(imf, "_decode_file", counting)
    second = _load(root, cache, image_size=16)
    assert second.decoded == 0 and calls == [] and second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.images, first.images)

    # Touch one file: another key, and only that file is decoded again.
    target = root / "seven" / "7_03.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = _load(root, cache, image_size=16)
    assert third.decoded == 1 and calls == ["7_03.png"] and third.cache_path != first.cache_path
    np.testing.assert_array_equal(third.images, first.images)
    assert sorted(p.name for p in (cache / "image-folder").iterdir()) == sorted(
        [third.cache_path.name, third.cache_path.with_suffix(".json").name])  # the stale cache is gone

    # Add a file: decoded alone; remove one: a new cache, nothing decoded.
    Image.fromarray(digits[1][0]).save(root / "one" / "extra.png")
    fourth = _load(root, cache, image_size=16)
    assert fourth.decoded == 1 and len(fourth.files) == 31
    (root / "zero" / "0_00.png").unlink()
    fifth = _load(root, cache, image_size=16)
    assert fifth.decoded == 0 and len(fifth.files) == 30 and "zero/0_00.png" not in fifth.files
    # Other settings are another cache; the first one is kept.
    assert _load(root, cache, image_size=8).decoded == 30
    assert _load(root, cache, image_size=16).decoded == 0


def test_cache_root_from_the_environment_and_damaged_caches(tmp_path, digits, monkeypatch):
    root = _write_tree(tmp_path / "pics", digits, count=3)
    monkeypatch.setenv("DUBOKO_CACHE", str(tmp_path / "env-cache"))
    assert imf.user_cache_dir() == tmp_path / "env-cache"
    assert imf.user_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    data = imf.load_image_folder(root, image_size=8, progress=False, num_workers=1)
    assert data.cache_path.is_relative_to(tmp_path / "env-cache")
    # A damaged cache (bad JSON, a short data file) is rebuilt, never trusted or crashed on.
    data.cache_path.with_suffix(".json").write_text("{not json")
    assert imf.load_image_folder(root, image_size=8, progress=False).decoded == 9
    with open(data.cache_path, "r+b") as f:
        f.truncate(10)
    assert imf.load_image_folder(root, image_size=8, progress=False).decoded == 9
    monkeypatch.delenv("DUBOKO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert imf.user_cache_dir() == tmp_path / "xdg" / "duboko"


def test_threads_give_the_same_cache_and_a_bar_is_shown_when_asked(tmp_path, digits, capsys):
    root = _write_tree(tmp_path / "pics", digits)
    one = _load(root, tmp_path / "a", image_size=12, num_workers=1)
    two = _load(root, tmp_path / "b", image_size=12, num_workers=2, progress=True)
    np.testing.assert_array_equal(one.images, two.images)
    assert "decoding images" in capsys.readouterr().err


def test_batches_stream_from_the_map(tmp_path, digits):
    data = _load(_write_tree(tmp_path / "pics", digits), tmp_path / "c", image_size=8)
    x, y = data.batch(np.array([3, 0, 29]))
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.uint8
    np.testing.assert_array_equal(x.numpy(), data.images[[3, 0, 29]])
    assert y.tolist() == data.labels[[3, 0, 29]].tolist()
    x += 1  # writable copy: the read-only map is untouched
    with pytest.raises(DubokoError, match="has no split 'test'"):
        data.tensors("test")


# ---------------------------------------------------------------------------------------------
# Image formats.


def test_formats_and_modes_decode_without_warnings(tmp_path, digits):
    root = tmp_path / "pics"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    grey = digits[0][0]
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    Image.fromarray(rgb).save(root / "a" / "photo.JPG", quality=95, subsampling=0)  # upper-case extension
    Image.fromarray(rgb).save(root / "a" / "x.bmp")
    Image.fromarray(rgb).save(root / "a" / "x.webp", lossless=True)
    Image.fromarray(grey).save(root / "a" / "x.gif")
    Image.fromarray(np.dstack([rgb, np.full((28, 28), 128, np.uint8)])).save(root / "b" / "rgba.png")
    palette = Image.fromarray(grey).convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "b" / "palette.png")
    Image.fromarray((grey.astype(np.uint16) * 257)).save(root / "b" / "grey16.png")  # 16-bit grey
    Image.fromarray(rgb).save(root / "b" / "x.jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = _load(root, tmp_path / "c", image_size=28, channels=3, val_fraction=0.0)
        grey_data = _load(root, tmp_path / "c", image_size=28, channels=1, val_fraction=0.0)
    assert data.num_skipped == 0 and len(data.files) == 8 and data.images.shape == (8, 3, 28, 28)
    by_name = {f: i for i, f in enumerate(data.files)}
    np.testing.assert_array_equal(data.images[by_name["a/x.bmp"]], rgb.transpose(2, 0, 1))  # lossless
    np.testing.assert_array_equal(data.images[by_name["a/x.webp"]], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(data.images[by_name["b/rgba.png"]], rgb.transpose(2, 0, 1))  # alpha dropped
    np.testing.assert_array_equal(grey_data.images[by_name["b/grey16.png"], 0], grey)  # top 8 bits
    np.testing.assert_array_equal(grey_data.images[by_name["a/x.gif"], 0], grey)
    jpeg = data.images[by_name["a/photo.JPG"]].astype(int)
    assert np.abs(jpeg - rgb.transpose(2, 0, 1)).mean() < 8  # lossy but close


def test_exif_orientation_and_centre_crop(tmp_path):
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # a white centre square between black bands
    image = Image.fromarray(wide)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    image.save(tmp_path / "wide.png")
    upright = imf.decode_image(tmp_path / "rotated.jpg", image_size=10, channels=1)
    squashed = imf.decode_image(tmp_path / "wide.png", image_size=10, channels=1)
    cropped = imf.decode_image(tmp_path / "wide.png", image_size=10, channels=1, crop_to_aspect_ratio=True)
    assert upright.shape == squashed.shape == cropped.shape == (1, 10, 10)
    # Rotated upright the image is 10 wide and 30 high: a white band across the middle rows.
    assert upright[0, 4:6].mean() > 200 and upright[0, :2].mean() < 50 and upright[0, -2:].mean() < 50
    assert cropped.min() == 255  # only the white square is left
    assert squashed[0, :, 0].max() < 50 and squashed[0, :, 5].min() > 200  # squashed: bands remain


# ---------------------------------------------------------------------------------------------
# Bad input: one error naming the files and the config key, or skipped and counted.


def _write_bad_files(folder, digits):
    noisy = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    png = _png_bytes(noisy)
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello, I am not a picture")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (folder / "bomb.png").write_bytes(_png_with_size(100_000, 100_000))
    return 5


def test_bad_files_are_one_error_naming_them(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits)
    n_bad = _write_bad_files(root / "seven", digits)
    with pytest.raises(DubokoError) as err:
        _load(root, tmp_path / "c", image_size=8)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{n_bad} bad image files in {root}:")
    for name, reason in [("seven/bomb.png", "decompression bomb"), ("seven/corrupt.png", "seven/corrupt.png ("),
                         ("seven/empty.png", "empty file (0 bytes)"), ("seven/text.jpg", "not an image PIL can read"),
                         ("seven/truncated.png", "truncated or corrupt")]:
        assert name in message and reason in message
    assert "data.skip_bad_images = true" in message
    # Skipped when asked, and counted for metrics.json; the readable images are all there.
    data = _load(root, tmp_path / "c", image_size=8, skip_bad_images=True)
    assert data.decoded == 0  # the failed load above already built the cache
    assert data.num_skipped == n_bad and len(data.files) == 30
    assert data.metrics()["data.skipped_images"] == n_bad
    assert {name for name, _ in data.skipped} == {f"seven/{n}" for n in
                                                   ("bomb.png", "corrupt.png", "empty.png", "text.jpg", "truncated.png")}


def test_many_bad_files_show_the_first_few_and_the_count(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits, count=2)
    for i in range(12):
        (root / "one" / f"bad{i:02d}.png").write_bytes(b"junk")
    with pytest.raises(DubokoError, match=r"^12 bad image files .*one/bad04\.png.*; and 7 more; fix or remove"):
        _load(root, tmp_path / "c", image_size=8)


def test_pixel_limit_refuses_on_the_header(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits, count=2)
    (root / "one" / "big.png").write_bytes(_png_bytes(np.zeros((40, 40), np.uint8)))
    with pytest.raises(DubokoError, match=r"one/big\.png \(40×40 = 1,600 pixels, more than data\.max_pixels = 1,000"):
        _load(root, tmp_path / "c", image_size=8, max_pixels=1000)
    with pytest.raises(DubokoError, match="data.max_pixels must be an integer from 1 to"):
        _load(root, tmp_path / "c", image_size=8, max_pixels=10**12)
    with pytest.raises(DubokoError, match="decompression bomb"):
        bomb = tmp_path / "bomb.png"
        bomb.write_bytes(_png_with_size(9000, 9000))  # 81 M pixels: over ours, under PIL's limits
        imf.decode_image(bomb, image_size=8)


def test_empty_class_single_class_and_no_images(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits, count=3)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DubokoError, match=r"1 empty class folder in .*: empty; .*data.skip_bad_images = true"):
        _load(root, tmp_path / "c", image_size=8)
    data = _load(root, tmp_path / "c", image_size=8, skip_bad_images=True)
    assert data.class_names == ["one", "seven", "zero"] and data.empty_classes == ["empty"]

    single = _write_tree(tmp_path / "single", digits, names=("only",), count=3)
    for skip in (False, True):
        with pytest.raises(DubokoError, match=r"found 1 class \(only\) .*at least 2 classes"):
            _load(single, tmp_path / "c", image_size=8, skip_bad_images=skip)
    # Every image of a class bad: with skipping, one class is left, which is still an error.
    two = _write_tree(tmp_path / "two", digits, names=("a", "b"), count=2)
    for f in (two / "b").iterdir():
        f.write_bytes(b"junk")
    with pytest.raises(DubokoError, match=r"readable images of 1 class \(a\) after skipping 2 bad"):
        _load(two, tmp_path / "c", image_size=8, skip_bad_images=True)

    (tmp_path / "nothing" / "a").mkdir(parents=True)
    (tmp_path / "nothing" / "a" / "x.txt").write_text("")
    with pytest.raises(DubokoError, match=r"no image files \(\.bmp, .*\) found in .*nothing; expected .*<class>/\*\.png"):
        _load(tmp_path / "nothing", tmp_path / "c", image_size=8)
    with pytest.raises(DubokoError, match="data.data_dir .*missing.* does not exist"):
        _load(tmp_path / "missing", tmp_path / "c", image_size=8)
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(DubokoError, match="neither a folder of class folders nor a .csv file"):
        _load(tmp_path / "file.txt", tmp_path / "c", image_size=8)


def test_symlinks_are_not_followed_out_of_the_root(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits, count=3)
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.fromarray(digits[0][5]).save(outside / "s.png")
    (root / "one" / "link.png").symlink_to(outside / "s.png")
    (root / "stolen").symlink_to(outside, target_is_directory=True)
    (root / "one" / "nested").symlink_to(outside, target_is_directory=True)  # never entered
    (root / "one" / "inside.png").symlink_to(root / "zero" / "0_00.png")  # inside ROOT: fine
    with pytest.raises(DubokoError, match=r"^2 bad image files .*one/link\.png \(a symlink to a file outside.*stolen/ \(a symlink to a folder outside"):
        _load(root, tmp_path / "c", image_size=8)
    data = _load(root, tmp_path / "c", image_size=28, channels=1, skip_bad_images=True)
    assert data.num_skipped == 2 and "one/inside.png" in data.files
    assert not any("nested" in f or "stolen" in f for f in data.files)
    np.testing.assert_array_equal(data.images[data.files.index("one/inside.png"), 0], digits[0][0])


def test_bad_settings_name_their_config_keys(tmp_path, digits):
    root = _write_tree(tmp_path / "pics", digits, count=2)
    for kwargs, key in [({"image_size": 0}, "data.image_size"), ({"channels": 2}, "data.channels"),
                        ({"val_fraction": 1.5}, "data.val_fraction"), ({"image_size": 8.5}, "data.image_size")]:
        with pytest.raises(DubokoError, match=rf"{key} must .*got"):
            _load(root, tmp_path / "c", **{"image_size": 8, **kwargs})
    with pytest.raises(DubokoError, match=r"^.*nope\.png: not an image PIL can read"):
        (tmp_path / "nope.png").write_text("x")
        imf.decode_image(tmp_path / "nope.png", image_size=8)
