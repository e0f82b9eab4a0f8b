"""Fashion-MNIST through the image-classification task: the fashion-* recipes resolve and pass
their checks, a tiny IDX set the test writes is found through data_dir and trains one step end to
end (run folder, metrics with class names), and the Debian package's real files when installed."""

import gzip
import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from duboko import config as C
from duboko.data import fashion_mnist as fm
from duboko.errors import DubokoError
from duboko.tasks.image_classification import ImageClassificationTask
from duboko.train.engine import Trainer

RECIPES = ("fashion-cnn", "fashion-resnet", "fashion-vit")


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    """A folder of four tiny IDX files (train 40 images, test 20) and FILES pointing at their checksums."""
    rng = np.random.default_rng(0)
    arrays = {
        ("train", "images"): rng.integers(0, 256, (40, 28, 28)),
        ("train", "labels"): np.arange(40) % 10,
        ("test", "images"): rng.integers(0, 256, (20, 28, 28)),
        ("test", "labels"): np.arange(20) % 10,
    }
    folder, files = tmp_path / "fashion", {}
    folder.mkdir()
    for key, array in arrays.items():
        stem, raw = fm.FILES[key].stem, _idx(array)
        gz = gzip.compress(raw, mtime=0)
        (folder / f"{stem}.gz").write_bytes(gz)
        files[key] = fm.IdxFile(stem, hashlib.sha256(raw).hexdigest(), hashlib.md5(gz).hexdigest(), array.shape)
    monkeypatch.setattr(fm, "FILES", files)
    return folder


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_resolve_with_fashion_settings(recipe):
    cfg = C.resolve(recipe)
    assert cfg.data.dataset == "fashion-mnist" and cfg.data.channels == 1 and cfg.data.image_size == 28
    assert (cfg.data.mean, cfg.data.std) == (fm.MEAN, fm.STD) and cfg.data.hflip
    # bf16 where native, except the ViT: its recipe pins fp32 because bf16 autocast measured 2x slower
    # for it on an AMX CPU (the recipe's comment has the numbers).
    assert cfg.train.precision == "auto" and cfg.model["num_classes"] == 10
    assert "not yet measured" in cfg.description or "%" in cfg.description


def test_the_model_must_have_ten_classes():
    with pytest.raises(DubokoError, match=r"model\.num_classes is 7 but data\.dataset 'fashion-mnist' has 10 classes"):
        C.resolve("fashion-cnn", ["model.num_classes=7"])
    with pytest.raises(DubokoError, match=r"model\.image_size 28 differs from data\.image_size 32"):
        C.resolve("fashion-vit", ["data.image_size=32"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_training_step_end_to_end_on_tiny_idx_files(recipe, tiny_fashion, tmp_path):
    sets = ["max_steps=1", "batch_size=8", "train.num_threads=1", "data.eval_batch_size=20"]
    cfg = C.resolve(recipe, sets, data_dir=str(tiny_fashion))
    out = tmp_path / "run"
    trainer = Trainer(cfg, out)
    metrics = trainer.fit()
    assert metrics["steps"] == 1 and 0.0 <= metrics["test_accuracy"] <= 1.0
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["classification_report"]) >= {"T-shirt/top", "Ankle boot"}
    assert "Ankle boot" in (out / "report.txt").read_text()
    assert len(trainer.task.splits["train"][0]) == 40 and len(trainer.task.splits["test"][0]) == 20


def test_flip_and_shift_batches_are_seeded_and_flip_is_off_by_default(tiny_fashion):
    cfg = C.resolve("fashion-cnn", ["train.num_threads=1"], data_dir=str(tiny_fashion))
    task = ImageClassificationTask(cfg, torch.device("cpu"))
    task.setup()
    a, b = next(task.train_batches(0)), next(task.train_batches(0))
    assert torch.equal(a[0], b[0]) and a[0].shape == (min(cfg.train.batch_size, 40), 1, 28, 28)
    assert not C.resolve("mnist-cnn").data.hflip  # digits are not mirror-symmetric


@pytest.mark.skipif(not fm._has_all(fm.DEBIAN_DIR), reason="the Debian package dataset-fashion-mnist is not installed")
def test_debian_package_through_the_task():
    cfg = C.resolve("fashion-cnn", ["data.limit_train=64", "data.limit_test=50", "train.num_threads=1"])
    task = ImageClassificationTask(cfg, torch.device("cpu"))
    task.setup()
    assert task.splits["train"][0].shape == (64, 28, 28) and task.class_names == fm.CLASSES
