"""Bad input everywhere gives one clear error (exit 2, one stderr line `duboko: error: ...`) and
loses nothing: corrupt data files, odd images for `predict`, empty text, bad configs, a read-only
run folder and a full disk (tiny tmpfs mounts, only where this process may mount: root in a
container; skipped elsewhere)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from duboko.cli.main import main
from duboko.data import mnist
from duboko.tasks.image_classification import ImageClassificationTask

TINY = [
    "--set", "data.image_size=16", "--set", "model.image_size=16", "--set", "data.limit_train=64",
    "--set", "data.limit_test=50", "--set", "train.num_threads=1", "--set", "epochs=1", "--set", "batch_size=32",
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("duboko: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust_bad") / "run"
    assert main(["train", "mnist-cnn", "--out", str(run), "--quiet", *TINY]) == 0
    return run


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Corrupt data files.


def _data_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "mnist"
    shutil.copytree(mnist.bundled_dir(), folder)
    return folder


def _truncate_gz(folder: Path) -> None:
    p = folder / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:1000])


def _flip_label(folder: Path) -> None:
    p = folder / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a valid IDX file: only the checksum can tell
    p.write_bytes(gzip.compress(bytes(raw)))


def _bad_magic(folder: Path) -> None:
    p = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[2] = 0x42
    p.unlink()
    (folder / "t10k-images-idx3-ubyte").write_bytes(bytes(raw))  # uncompressed variant


def _missing(folder: Path) -> None:
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()


def _not_gzip(folder: Path) -> None:
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 100)


@pytest.mark.parametrize("damage, words", [
    (_truncate_gz, ("train-labels", "truncated or corrupt gzip")),
    (_flip_label, ("train-labels", "checksum")),
    (_bad_magic, ("t10k-images", "checksum")),  # the checksum is checked before the header
    (_missing, ("t10k-labels",)),
    (_not_gzip, ("train-images", "gzip")),
])
def test_corrupt_data_files(tmp_path, capsys, damage, words):
    folder = _data_copy(tmp_path)
    damage(folder)
    out = tmp_path / "run"
    assert main(["train", "mnist-cnn", "--out", str(out), "--data-dir", str(folder), "--quiet", *TINY]) == 2
    line = _one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not (out / "state.safetensors").exists()


def test_missing_data_dir(tmp_path, capsys):
    assert main(["train", "mnist-cnn", "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nope"), *TINY]) == 2
    assert "does not exist" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# Odd images for `predict`: modes and sizes that must work, files that must be refused.


def _digit(size: int = 28) -> Image.Image:
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).line([(size // 2, size // 7), (size // 2, size - size // 7)], fill=255, width=max(1, size // 9))
    return img


def _crafted_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width×height pixels (a decompression bomb needs no more)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


GOOD_IMAGES = {
    "rgba.png": lambda: _digit().convert("RGBA"),
    "palette.png": lambda: _digit().convert("P"),
    "la.png": lambda: _digit().convert("LA"),
    "sixteen_bit.png": lambda: Image.fromarray(np.asarray(_digit()).astype(np.uint16) * 257),
    "one_bit.png": lambda: _digit().convert("1"),
    "cmyk.jpg": lambda: _digit().convert("CMYK"),
    "rgb.jpg": lambda: _digit().convert("RGB"),
    "tiny_1x1.png": lambda: Image.new("L", (1, 1), 0),
    "tiny_3x2.png": lambda: Image.new("RGB", (3, 2), (10, 10, 10)),
    "big_1500.png": lambda: _digit(1500),
    "wide.png": lambda: _digit().resize((280, 28)),
    "dark_on_light.png": lambda: Image.eval(_digit(), lambda v: 255 - v),
    "int32.tiff": lambda: _digit().convert("I"),
    "float.tiff": lambda: _digit().convert("F"),
}


def test_predict_accepts_odd_modes_and_sizes(trained, tmp_path, capsys):
    paths = []
    for name, make in GOOD_IMAGES.items():
        path = tmp_path / name
        make().save(path)
        paths.append(str(path))
    before = _tree_digest(trained)
    assert main(["predict", str(trained), *paths, "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in result["predictions"]] == paths
    assert all(r["class"] in mnist.CLASSES for r in result["predictions"])
    assert _tree_digest(trained) == before  # predict wrote nothing into the run


@pytest.mark.parametrize("name", ["rgba.png", "palette.png", "la.png", "sixteen_bit.png", "one_bit.png", "int32.tiff",
                                  "float.tiff", "dark_on_light.png"])
def test_modes_read_as_the_same_digit(tmp_path, name):
    """Every lossless encoding of the same digit reads as the same 28×28 array."""
    task = ImageClassificationTask.__new__(ImageClassificationTask)
    _digit().save(tmp_path / "base.png")
    GOOD_IMAGES[name]().save(tmp_path / name)
    base, _ = task.load_image_file(str(tmp_path / "base.png"))
    got, _ = task.load_image_file(str(tmp_path / name))
    assert (got.int() - base.int()).abs().max().item() <= 1


def test_transparent_background_reads_as_the_digit(tmp_path):
    task = ImageClassificationTask.__new__(ImageClassificationTask)
    _digit().save(tmp_path / "base.png")
    img = Image.new("RGBA", (28, 28), (0, 0, 0, 0))  # fully transparent (black) background
    ImageDraw.Draw(img).line([(14, 4), (14, 24)], fill=(0, 0, 0, 255), width=3)  # black, opaque strokes
    img.save(tmp_path / "transparent.png")
    base, _ = task.load_image_file(str(tmp_path / "base.png"))
    got, _ = task.load_image_file(str(tmp_path / "transparent.png"))
    assert (got.int() - base.int()).abs().max().item() <= 1


def test_float_image_in_unit_range_reads_as_the_digit(tmp_path):
    task = ImageClassificationTask.__new__(ImageClassificationTask)
    _digit().save(tmp_path / "base.png")
    Image.fromarray((np.asarray(_digit()) / 255.0).astype(np.float32)).save(tmp_path / "unit.tiff")
    base, _ = task.load_image_file(str(tmp_path / "base.png"))
    got, _ = task.load_image_file(str(tmp_path / "unit.tiff"))
    assert (got.int() - base.int()).abs().max().item() <= 1


def _write_bad_images(folder: Path) -> dict[str, str]:
    """name -> a word the error must contain."""
    (folder / "bomb.png").write_bytes(_crafted_png(100_000, 100_000))
    (folder / "text.png").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    good = folder / "good.png"
    _digit().save(good)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    (folder / "a_folder.png").mkdir()
    return {"bomb.png": "bomb.png", "text.png": "text.png", "empty.png": "empty.png", "truncated.png": "truncated.png",
            "a_folder.png": "a_folder.png", "missing.png": "missing.png"}


def test_predict_refuses_bad_images_with_one_line(trained, tmp_path, capsys):
    bad = _write_bad_images(tmp_path)
    good = str(tmp_path / "good.png")
    for name, word in bad.items():
        assert main(["predict", str(trained), good, str(tmp_path / name)]) == 2, name
        line = _one_error_line(capsys)
        assert word in line, line
    assert main(["predict", str(trained), good, "--top", "0"]) == 2
    _one_error_line(capsys)


def test_predict_needs_an_image_run(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "no_run"), str(tmp_path / "x.png")]) == 2
    _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# Empty or useless text for the language-model family (owned by its helper; tested through the CLI).


@pytest.mark.parametrize("content", [b"", b"\n\n   \n", b"\x00\x01binary\x00", b"\xff\xfe\xfa not utf-8", b"ab"])
def test_empty_or_bad_text(tmp_path, capsys, content):
    from duboko import registry

    if "lstm-char" not in registry.model_names():
        pytest.skip("the text family is not present")
    text = tmp_path / "corpus.txt"
    text.write_bytes(content)
    recipe = tmp_path / "lm.toml"
    recipe.write_text(f'description = "x"\ntask = "language-model"\n[model]\nname = "lstm-char"\n'
                      f'[data]\npath = "{text}"\n[train]\nepochs = 1\nnum_threads = 1\n')
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "corpus.txt" in _one_error_line(capsys) or content == b"ab"


# ---------------------------------------------------------------------------------------------
# Bad configs.


BAD_CONFIGS = [
    (["train", "no-such-recipe"], "unknown recipe"),
    (["train", "mnist-cnn", "--set", "nonsense=1"], "unknown key"),
    (["train", "mnist-cnn", "--set", "train.bogus=1"], "unknown key"),
    (["train", "mnist-cnn", "--set", "bogus.lr=1"], "unknown section"),
    (["train", "mnist-cnn", "--set", "epochs=two"], "train.epochs expects an integer"),
    (["train", "mnist-cnn", "--set", "epochs"], "key=value"),
    (["train", "mnist-cnn", "--set", "batch_size=-4"], "batch_size"),
    (["train", "mnist-cnn", "--set", "lr=0"], "train.lr"),
    (["train", "mnist-cnn", "--set", "optimizer=adamax"], "unknown train.optimizer"),
    (["train", "mnist-cnn", "--set", "precision=fp8"], "unknown train.precision"),
    (["train", "mnist-cnn", "--set", "model.name=resnet9000"], "unknown model"),
    (["train", "mnist-cnn", "--set", "data.image_size=2", "--set", "model.image_size=2"], "image_size"),
    (["train", "mnist-cnn", "--set", "model.dropout=1.5"], "dropout"),
    (["train", "mnist-cnn", "--set", "data.dataset=cifar"], "unknown data.dataset"),
    (["train", "mnist-cnn", "--set", "betas=[0.9]"], "betas"),
    (["train", "mnist-cnn", "--set", "betas=[0.9, 2]"], "betas"),
    (["train", "mnist-cnn", "--set", "lr=nan"], "train.lr must be a finite number"),
    (["train", "mnist-cnn", "--set", "lr=inf"], "train.lr must be a finite number"),
    (["train", "mnist-cnn", "--set", "weight_decay=nan"], "train.weight_decay"),
    (["train", "mnist-cnn", "--set", "weight_decay=-0.1"], "train.weight_decay"),
    (["train", "mnist-cnn", "--set", "num_threads=-3"], "train.num_threads"),
    (["train", "mnist-cnn", "--set", "label_smoothing=5"], "train.label_smoothing"),
    (["train", "mnist-cnn", "--set", "ema_decay=2"], "train.ema_decay"),
    (["train", "mnist-cnn", "--set", "checkpoint_every=-1"], "train.checkpoint_every"),
    (["train", "mnist-cnn", "--set", "model.name=[0]"], "unknown model"),
    (["train", "mnist-cnn", "--device", "cuda:7"], "cuda"),
    (["train"], "name a recipe"),
    (["train", "mnist-cnn", "--resume", "x"], "not both"),
    (["train", "--resume", "/nonexistent/run"], "cannot resume"),
]


@pytest.mark.parametrize("argv, words", BAD_CONFIGS, ids=[" ".join(a[1:])[:40] for a, _ in BAD_CONFIGS])
def test_bad_configs(tmp_path, capsys, argv, words):
    argv = list(argv)
    if "--resume" not in argv and len(argv) > 1:
        argv += ["--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert words in line, line
    assert not (tmp_path / "run" / "state.safetensors").exists()


@pytest.mark.parametrize("text, words", [
    ("task = 'image-classification'\n[model\nname='my_net'", "not valid TOML"),
    ("description = 'x'\n[model]\nname = 'my_net'\n", "names no task"),
    ("task = 'painting'\n[model]\nname = 'my_net'\n", "unknown task"),
    ("task = 'image-classification'\nextra = 1\n[model]\nname = 'my_net'\n", "unknown top-level keys"),
    ("task = 'image-classification'\n[data]\nimage_size = 16\n", "no model.name"),
    ("task = 'image-classification'\n[model]\nname = 'my_net'\n[train]\nepochs = 'many'\n", "train.epochs"),
])
def test_bad_recipe_files(tmp_path, capsys, text, words):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert words in _one_error_line(capsys)


def test_existing_run_is_not_overwritten(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _tree_digest(run)
    assert main(["train", "mnist-cnn", "--out", str(run), *TINY]) == 2
    assert "--resume" in _one_error_line(capsys)
    assert _tree_digest(run) == before
    assert main(["train", "--resume", str(run)]) == 2  # finished: says how to continue
    assert "epochs" in _one_error_line(capsys)
    assert _tree_digest(run) == before


# ---------------------------------------------------------------------------------------------
# Read-only run folder and full disk, on small tmpfs mounts.


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def _remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True, capture_output=True, timeout=20)


def test_read_only_run_folder(trained, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "64M") as mnt:
        shutil.copytree(trained, mnt / "run")
        _remount(mnt, "ro")
        before = _tree_digest(mnt / "run")
        # Training into it: one line.
        assert main(["train", "mnist-cnn", "--out", str(mnt / "new"), "--quiet", *TINY]) == 2
        assert "new" in _one_error_line(capsys)
        # Resuming it (to train further): one line, nothing changed.
        assert main(["train", "--resume", str(mnt / "run"), "--set", "epochs=2", "--quiet"]) == 2
        assert "run" in _one_error_line(capsys)
        # Reading it still works.
        assert main(["eval", str(mnt / "run"), "--json"]) == 0
        assert main(["verify", str(mnt / "run")]) == 0
        capsys.readouterr()
        assert _tree_digest(mnt / "run") == before
        _remount(mnt, "rw")


def test_full_disk_loses_nothing_and_resume_recovers(trained, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "48M") as mnt:
        run = mnt / "run"
        shutil.copytree(trained, run, ignore=shutil.ignore_patterns("tb"))
        state = (run / "state.safetensors").read_bytes()
        # Fill the disk, leaving less than one state file (~14 MB) free.
        filler = mnt / "filler"
        free = shutil.disk_usage(mnt).free
        filler.write_bytes(b"\0" * max(0, free - 4 * 2**20))
        assert main(["train", "--resume", str(run), "--set", "epochs=2", "--set", "checkpoint_every=1", "--quiet"]) == 2
        line = _one_error_line(capsys)
        assert "No space left on device" in line, line
        assert (run / "state.safetensors").read_bytes() == state  # the previous checkpoint is whole
        assert not list(run.glob(".*.tmp"))  # and no half-written temporary file stays behind
        # Free the space: the same resume now completes.
        filler.unlink()
        assert main(["train", "--resume", str(run), "--set", "epochs=2", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["verify", str(run)]) == 0


def test_predict_caps_pixels_by_the_model_input_size(trained, tmp_path, capsys):
    """A picture far larger than the model's input is refused from its header (nothing decoded):
    at most (128 · side)² pixels, within [4096², 8192²]. A float TIFF of a few KB claiming
    thousands of pixels a side would otherwise be decoded (and copied as float64) at gigabytes."""
    from duboko.config import resolve
    from duboko.io import image_pixel_cap

    side = resolve(trained).data.image_size
    cap = image_pixel_cap(side)
    assert cap == min(8192 ** 2, max(4096 ** 2, (128 * side) ** 2))
    assert image_pixel_cap(28) == 4096 ** 2 and image_pixel_cap(48) == 6144 ** 2 and image_pixel_cap(224) == 8192 ** 2
    wide = int(cap ** 0.5) + 1
    big = tmp_path / "big.tiff"
    Image.new("F", (wide, wide)).save(big, compression="tiff_deflate")
    assert big.stat().st_size < 2_000_000
    assert main(["predict", str(trained), str(big)]) == 2
    line = _one_error_line(capsys)
    assert f"{wide}x{wide}" in line and f"{cap:,}" in line and "resize" in line
    # Just within the cap (a long strip, so the test decodes little): accepted.
    strip = tmp_path / "strip.png"
    Image.new("L", (cap // 64, 64)).save(strip)
    assert main(["predict", str(trained), str(strip), "--json"]) == 0
    capsys.readouterr()
