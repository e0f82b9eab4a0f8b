"""`duboko train image-folder` end to end on a folder tree of real MNIST digits written as PNG files:
accuracy well above chance in seconds, the cache read by a second run (nothing decoded), one
touched file decoded alone, class names in `predict` and `eval`, and bad input as one line + exit 2
(or skipped and counted with data.skip_bad_images = true)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from duboko import config as C
from duboko.data.mnist import load_mnist
from duboko.errors import DubokoError

NAMES = ("zero", "one", "two", "three")
PER_CLASS = 75  # 300 digits in all
FAST = ["model.image_size=28", "data.image_size=28", "data.channels=1", "model.in_channels=1", "data.hflip=false",
        "data.crop_scale=1.0", "epochs=2", "batch_size=32", "train.num_threads=1", "lr=3e-3"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def duboko(*args, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUBOKO_CACHE": str(cache)}
    env.pop("DUBOKO_DEBUG", None)  # user errors as the user sees them: one line, exit 2
    return subprocess.run([sys.executable, "-m", "duboko", *args], capture_output=True, text=True, env=env, timeout=300)


def _assert_user_error(result, *patterns):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("duboko: error:"), result.stderr
    for pattern in patterns:
        assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def digits():
    x, y = load_mnist("train")
    return {c: x[y == c][:PER_CLASS].numpy() for c in range(len(NAMES))}


def _write_tree(root, digits, classes=NAMES):
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(digits[c]):
            Image.fromarray(image).save(folder / f"{c}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    base = tmp_path_factory.mktemp("folder")
    root = _write_tree(base / "pics", digits)
    cache, out = base / "cache", base / "run"
    r = duboko("train", "image-folder", "--data-dir", str(root), "--out", str(out), *_sets(FAST), cache=cache)
    assert r.returncode == 0, r.stderr
    return base, root, cache, out, r


def test_trains_well_above_chance_and_saves_class_names(trained):
    base, root, cache, out, r = trained
    metrics = json.loads((out / "metrics.json").read_text())
    # 4 classes: chance is 25%; 240 training digits, 2 epochs.
    assert metrics["test_accuracy"] > 0.7, metrics["test_accuracy"]
    assert metrics["test_split"] == "val" and metrics["data.num_classes"] == 4 and metrics["data.num_images"] == 300
    assert metrics["data.skipped_images"] == 0 and metrics["data.decoded_images"] == 300
    assert json.loads((out / "classes.json").read_text())["class_names"] == ["one", "three", "two", "zero"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["num_classes"] == 4 and config["data"]["class_names"] == ["one", "three", "two", "zero"]
    assert "classes.json" in (out / "manifest.json").read_text()
    assert "three" in (out / "report.txt").read_text()


def test_predict_and_eval_show_class_names(trained, digits):
    base, root, cache, out, _ = trained
    r = duboko("predict", str(out), str(root / "two" / "2_000.png"), str(root / "zero" / "0_001.png"), "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)["predictions"]
    assert {name for p in preds for name, _ in p["top"]} <= set(NAMES)
    assert [p["class"] for p in preds] == ["two", "zero"] and not any(p["inverted"] for p in preds)
    r = duboko("eval", str(out), cache=cache)
    assert r.returncode == 0, r.stderr
    assert "three" in r.stdout and "Confusion matrix" in r.stdout


def test_second_run_reads_the_cache_and_a_touched_file_is_decoded_alone(trained):
    base, root, cache, out, _ = trained
    one_step = ["max_steps=1"]
    r = duboko("train", "image-folder", "--data-dir", str(root), "--out", str(base / "again"), *_sets(FAST + one_step), cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads((base / "again" / "metrics.json").read_text())["data.decoded_images"] == 0
    touched = root / "one" / "1_007.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1_000_000_000))
    r = duboko("train", "image-folder", "--data-dir", str(root), "--out", str(base / "touched"), *_sets(FAST + one_step), cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads((base / "touched" / "metrics.json").read_text())["data.decoded_images"] == 1


def test_bad_input_is_one_line_or_skipped_and_counted(tmp_path, digits):
    cache = tmp_path / "cache"
    few = {c: digits[c][:6] for c in range(2)}
    root = _write_tree(tmp_path / "bad", few, NAMES[:2])
    (root / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = ["train", "image-folder", "--data-dir", str(root), *_sets(FAST + ["max_steps=1", "batch_size=4"])]
    _assert_user_error(duboko(*args, "--out", str(tmp_path / "r1"), cache=cache), "1 bad image file", "broken.png",
                       "data.skip_bad_images")
    r = duboko(*args, "--out", str(tmp_path / "r2"), "--set", "data.skip_bad_images=true", cache=cache)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert metrics["data.skipped_images"] == 1 and metrics["data.num_images"] == 12
    (root / "one" / "broken.png").unlink()
    (root / "empty").mkdir()
    _assert_user_error(duboko(*args, "--out", str(tmp_path / "r3"), cache=cache), "1 empty class folder", "empty")
    (root / "empty").rmdir()
    single = _write_tree(tmp_path / "single", {0: digits[0][:4]}, NAMES[:1])
    _assert_user_error(duboko("train", "image-folder", "--data-dir", str(single), "--out", str(tmp_path / "r4"),
                              *_sets(FAST), cache=cache), "found 1 class (zero)", "at least 2 classes")
    _assert_user_error(duboko("train", "image-folder", "--out", str(tmp_path / "r5"), cache=cache),
                       "data.data_dir is empty")


def test_config_checks_name_the_keys():
    with pytest.raises(DubokoError, match=r"model\.image_size 64 differs from data\.image_size 32"):
        C.resolve("image-folder", ["data.image_size=32"])
    with pytest.raises(DubokoError, match=r"data\.crop_scale must be in \(0, 1\]"):
        C.resolve("image-folder", ["data.crop_scale=0"])
    # A folder's class count is derived from its class folders: an override is refused with a pointer.
    with pytest.raises(DubokoError, match=r"model\.num_classes is derived by task 'image-classification' from the class folders"):
        C.resolve("image-folder", ["data.class_names=[\"a\", \"b\", \"c\"]", "model.num_classes=5"])
    # The bare image_size sets both sections, which must agree.
    cfg = C.resolve("image-folder", ["image_size=32"])
    assert cfg.data.image_size == cfg.model["image_size"] == 32
    with pytest.raises(DubokoError, match=r"data\.class_names .* does not fit data\.dataset 'mnist'"):
        C.resolve("mnist-cnn", ["data.class_names=[\"a\", \"b\"]"])


def test_bench_images_measures_the_cache_build_and_both_data_paths(tmp_path):
    from duboko.bench import images

    result = images.run_images(num_images=40, image_size=16, channels=1, batch_size=8, windows=1, window=1,
                               warmup=0, workers=1, device="cpu", overrides=["train.num_threads=1"])
    build = result["cache_build"]
    assert build["images"] == 40 and build["decoded"] == 40 and build["images_per_s"] > 0
    assert build["cache_hit_decoded"] == 0
    folder_run, mnist_run = result["training"]
    assert (folder_run["dataset"], mnist_run["dataset"]) == ("folder", "mnist")
    assert folder_run["images_per_s"] > 0 and mnist_run["images_per_s"] > 0
    assert result["precision"] in ("bf16", "fp32") and folder_run["precision"] == mnist_run["precision"]
    assert "train images/s" in images.format_report(result)


def test_a_split_larger_than_memory_streams_from_the_cache_with_the_same_batches(tmp_path, digits, monkeypatch):
    import torch

    from duboko.tasks import image_classification as ic

    monkeypatch.setenv("DUBOKO_CACHE", str(tmp_path / "cache"))
    root = _write_tree(tmp_path / "pics", {c: digits[c][:10] for c in range(3)}, NAMES[:3])
    cfg = C.resolve("image-folder", FAST + ["batch_size=8"], data_dir=str(root))

    def first_batch_and_eval():
        task = ic.ImageClassificationTask(C.resolve("image-folder", FAST + ["batch_size=8"], data_dir=str(root)),
                                          torch.device("cpu"))
        task.setup()
        torch.manual_seed(0)
        model = task.build_model()
        return task, next(task.train_batches(0)), task.evaluate(model, "val")

    memory_task, in_memory, eval_memory = first_batch_and_eval()
    assert isinstance(memory_task.splits["train"][0], torch.Tensor)
    monkeypatch.setattr(ic, "IN_MEMORY_BYTES", 0)
    stream_task, streamed, eval_stream = first_batch_and_eval()
    assert isinstance(stream_task.splits["train"][0], ic._CachedRows)
    assert torch.equal(in_memory[0], streamed[0]) and torch.equal(in_memory[1], streamed[1])
    assert eval_memory == eval_stream and cfg.model["num_classes"] == 10  # resolve alone fills nothing
    assert stream_task.config.model["num_classes"] == 3 and stream_task.class_names == ["one", "two", "zero"]


def test_a_run_refuses_a_folder_whose_classes_changed(tmp_path, digits, monkeypatch):
    from duboko.train.engine import Trainer
    from duboko.train.run import load_run

    monkeypatch.setenv("DUBOKO_CACHE", str(tmp_path / "cache"))
    root = _write_tree(tmp_path / "pics", {c: digits[c][:8] for c in range(2)}, NAMES[:2])
    out = tmp_path / "run"
    Trainer(C.resolve("image-folder", FAST + ["max_steps=1", "batch_size=4"], data_dir=str(root)), out).fit()
    loaded = load_run(out, device="cpu")  # eval: classes.json and data.class_names match the folder
    assert loaded.task.class_names == ["one", "zero"] and loaded.model.fc2.out_features == 2
    (root / "two").mkdir()
    for i, image in enumerate(digits[2][:8]):
        Image.fromarray(image).save(root / "two" / f"2_{i:03d}.png")
    with pytest.raises(DubokoError, match=r"the classes of .* \(one, two, zero\) differ from data\.class_names \(one, zero\)"):
        load_run(out, device="cpu")
