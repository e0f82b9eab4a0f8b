"""Image classification on MNIST, Fashion-MNIST or your own image folder: the primer's CNN
pipeline (and any image model: an MLP, a ResNet, a ViT).

MNIST and Fashion-MNIST live on the training device as uint8 (60000×28×28 = 47 MB); each batch is
augmented there in a few batched ops (`duboko.data.transforms`), with no per-sample Python. An
image folder (`data.dataset = "folder"`, `data.data_dir` = the folder or a `path,label` CSV) is
decoded once into a uint8 memory-mapped cache (`duboko.data.image_folder`); its splits are held in
memory when they fit `IN_MEMORY_BYTES`, else each batch is read from the map. Its class names (the
sorted class-folder names) are saved in the run folder (classes.json) and in the resolved config
(`data.class_names`), and fill the model's `num_classes` (an MLP's `out_features`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duboko import registry
from duboko.data import fashion_mnist, image_folder, mnist, transforms
from duboko.data.batching import batch_slice, epoch_permutation, num_batches, rank_slice
from duboko.config import require_at_least
from duboko.errors import DubokoError, unknown_name
from duboko.evaluate import metrics as M
from duboko.io import atomic_write_json, atomic_write_text, read_json
from duboko.seeding import generator
from duboko.tasks import Evaluation, StepOutput, Task, register_task

DATASETS = ("mnist", "fashion-mnist", "folder")
# Classes of each built-in data set, known without loading it (so `check` can compare the model's
# outputs); a folder's classes are known only from its files.
DATASET_CLASSES = {"mnist": mnist.CLASSES, "fashion-mnist": fashion_mnist.CLASSES}
CLASSES_FILE = "classes.json"  # a folder run's class names (and decode settings), beside the weights
# The model fields a folder's class count fills (whichever the model has).
CLASS_FIELDS = ("num_classes", "out_features")
# A folder split up to this size is copied from the cache into memory (on the training device);
# a larger one is read batch by batch from the memory-mapped cache.
IN_MEMORY_BYTES = 1 << 30
# The seeded validation split of a folder does not follow train.seed: runs with different seeds
# are compared on the same held-out images (as MNIST's fixed `mnist.SPLIT_SEED`).
FOLDER_SPLIT_SEED = 0


@dataclass
class ImageDataConfig:
    dataset: str = "mnist"  # mnist | fashion-mnist | folder (your own images: data.data_dir)
    # mnist / fashion-mnist: folder with the IDX files ("" searches $DUBOKO_DATA, the bundled copy or
    # the Debian package, the user cache); folder: ROOT/<class>/*.png (or ROOT/train + ROOT/val|test)
    # or a CSV of path,label rows (required)
    data_dir: str = ""
    download: bool = False  # download into the user cache even when a local copy exists
    image_size: int = 48  # resize to image_size × image_size
    channels: int = 3  # 3 replicates the grey channel (the primer's Grayscale(3)); 1 keeps it
    rotation: float = 10.0  # random rotation in ±degrees (training only)
    brightness: float = 0.2  # brightness jitter factor range 1 ± brightness (training only)
    contrast: float = 0.2  # contrast jitter factor range 1 ± contrast (training only)
    mean: float = mnist.MEAN  # normalisation mean (MNIST train set)
    std: float = mnist.STD  # normalisation std (MNIST train set)
    val_fraction: float = 0.0  # hold out this share of train for validation (0: validate on test, as the primer;
    # a folder without ROOT/val or ROOT/test needs > 0: a seeded, per-class split by file name)
    hflip: bool = False  # random horizontal flips (off: digits are not mirror-symmetric; on for clothes, photos)
    crop_scale: float = 1.0  # random resized crop: area share drawn from [crop_scale, 1] (1: no crop)
    translate: float = 0.0  # random shift by up to ± this share of the side (0: none)
    skip_bad_images: bool = False  # folder: skip (and count) unreadable images instead of stopping
    max_pixels: int = image_folder.MAX_PIXELS  # folder: refuse images with more pixels (decompression bombs)
    # folder: the class names in label order, filled from the data (saved so `predict` needs no
    # data); set by hand, they must match the folder's
    class_names: list[str] = field(default_factory=list)
    limit_train: int = 0  # use only the first N training images (0: all), for quick experiments and tests
    limit_test: int = 0  # use only the first N test images (0: all)
    eval_batch_size: int = 1000  # batch size for evaluation passes


class _CachedRows:
    """A folder split larger than `IN_MEMORY_BYTES`: its rows of the memory-mapped cache, read
    batch by batch (only the batch is in memory)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images = images  # (N, C, S, S) uint8 memory map
        self.rows = rows  # (n,) int64 rows of this split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        picked = self.rows[index] if isinstance(index, slice) else self.rows[index.cpu().numpy()]
        return torch.from_numpy(np.asarray(self.images[picked]))  # (b, C, S, S) uint8


@register_task
class ImageClassificationTask(Task):
    name = "image-classification"
    data_config = ImageDataConfig
    shown_metric = "accuracy"
    datasets = DATASETS
    losses = ("cross_entropy",)

    shared_fields = ("image_size",)

    @classmethod
    def derived_fields(cls, data: dict[str, Any]) -> dict[str, str]:
        # Only a folder's task derives the class count it finds; MNIST recipes set
        # model.num_classes = 10 themselves (checked against the data set in `check`).
        if data.get("dataset", ImageDataConfig.dataset) == "folder":
            return {key: "the class folders of data.data_dir" for key in CLASS_FIELDS}
        return {}

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        cfg = config.data
        if cfg.image_size < 4:
            raise DubokoError(f"data.image_size must be >= 4, got {cfg.image_size}")
        if cfg.channels not in (1, 3):
            raise DubokoError(f"data.channels must be 1 or 3, got {cfg.channels}")
        require_at_least("data", cfg, 0, "rotation", "brightness", "contrast", "std")
        if not math.isfinite(cfg.mean):
            raise DubokoError(f"data.mean must be a finite number, got {cfg.mean!r}")
        if cfg.std <= 0:
            raise DubokoError(f"data.std must be > 0, got {cfg.std!r}")
        for key in ("brightness", "contrast"):
            if getattr(cfg, key) >= 1:
                raise DubokoError(f"data.{key} must be < 1 (a factor range 1 ± {key}), got {getattr(cfg, key)!r}")
        require_at_least("data", cfg, 0, "limit_train", "limit_test", note=" (0: all images)")
        if cfg.eval_batch_size < 1:
            raise DubokoError(f"data.eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise DubokoError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        if not (math.isfinite(cfg.crop_scale) and 0.0 < cfg.crop_scale <= 1.0):
            raise DubokoError(f"data.crop_scale must be in (0, 1] (1: no random crop), got {cfg.crop_scale!r}")
        if not (math.isfinite(cfg.translate) and 0.0 <= cfg.translate <= 0.5):
            raise DubokoError(f"data.translate must be in [0, 0.5] (a share of the side), got {cfg.translate!r}")
        if cfg.max_pixels < 1:
            raise DubokoError(f"data.max_pixels must be >= 1, got {cfg.max_pixels}")
        if cfg.dataset == "folder":
            if cfg.class_names and (len(set(cfg.class_names)) != len(cfg.class_names) or len(cfg.class_names) < 2):
                raise DubokoError(f"data.class_names must be at least 2 distinct names, got {cfg.class_names!r}")
        elif cfg.class_names and cfg.class_names != list(DATASET_CLASSES[cfg.dataset]):
            raise DubokoError(
                f"data.class_names {cfg.class_names!r} does not fit data.dataset {cfg.dataset!r}, whose classes are "
                f"{list(DATASET_CLASSES[cfg.dataset])!r}; leave it empty"
            )
        cls._check_model_shapes(config)

    @staticmethod
    def _check_model_shapes(config: Any) -> None:
        """The model's input and output sizes against the data's, where the model has them: a
        mismatch would otherwise fail inside the first batch, after the run folder exists."""
        cfg, model = config.data, config.model
        # A folder's classes are known from its files (`setup` fills the model's class count),
        # or from data.class_names in a run folder's config.
        n_classes = len(cfg.class_names) if cfg.dataset == "folder" else len(DATASET_CLASSES[cfg.dataset])
        for key in CLASS_FIELDS:
            if n_classes and key in model and model[key] != n_classes:
                raise DubokoError(
                    f"model.{key} is {model[key]} but data.dataset {cfg.dataset!r} has {n_classes} classes"
                )
        if "image_size" in model and model["image_size"] != cfg.image_size:
            raise DubokoError(
                f"model.image_size {model['image_size']} differs from data.image_size {cfg.image_size}; "
                "set both to the same size"
            )
        if "in_channels" in model and model["in_channels"] != cfg.channels:
            raise DubokoError(f"model.in_channels {model['in_channels']} differs from data.channels {cfg.channels}")
        # A flattening model (an MLP) takes channels · image_size² inputs.
        pixels = cfg.channels * cfg.image_size**2
        if "in_features" in model and model["in_features"] != pixels:
            raise DubokoError(
                f"model.in_features {model['in_features']} does not fit data.channels × data.image_size² = "
                f"{cfg.channels} × {cfg.image_size}² = {pixels}"
            )

    # -- data ----------------------------------------------------------------------------------
    def setup(self, run_dir: Path | None = None, splits: tuple[str, ...] = ("train", "test")) -> None:
        cfg = self.config.data
        # split -> (uint8 images, int64 labels): (N, 28, 28) for MNIST / Fashion-MNIST, (N, C, S, S)
        # for a folder, either a tensor (train on the device) or `_CachedRows` read per batch.
        self.splits: dict[str, tuple[Any, torch.Tensor]] = {}
        self.folder: image_folder.ImageFolderData | None = None
        self.test_split = "test"  # the split `final_metrics` reports (a folder may have only val)
        if cfg.dataset == "folder":
            self._setup_folder(run_dir)
            return
        self.class_names = list(DATASET_CLASSES[cfg.dataset])
        self.num_classes = len(self.class_names)
        data_dir = cfg.data_dir or None
        if "train" in splits:
            x, y = self._load_builtin("train", data_dir, cfg.download, cfg.limit_train)
            if cfg.val_fraction > 0:
                (x, y), self.splits["val"] = mnist.hold_out_validation(x, y, max(1, int(len(x) * cfg.val_fraction)))
            self.splits["train"] = (x.to(self.device), y.to(self.device))
        if "test" in splits or "val" not in self.splits:
            self.splits["test"] = self._load_builtin("test", data_dir, False, cfg.limit_test)
            self.splits.setdefault("val", self.splits["test"])

    def _load_builtin(self, split: str, data_dir: str | None, download: bool, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.data.dataset == "mnist":
            return mnist.load_split(split, data_dir, download, limit=limit)
        x, y = fashion_mnist.load_fashion_mnist(split, data_dir, download)
        return (x[:limit], y[:limit]) if limit else (x, y)

    def _setup_folder(self, run_dir: Path | None) -> None:
        cfg = self.config.data
        if not cfg.data_dir:
            raise DubokoError(
                "data.data_dir is empty; data.dataset = 'folder' needs a folder of class folders "
                "(ROOT/<class>/*.png) or a CSV of path,label rows"
            )
        data = image_folder.load_image_folder(
            cfg.data_dir, image_size=cfg.image_size, channels=cfg.channels, val_fraction=cfg.val_fraction,
            seed=FOLDER_SPLIT_SEED, skip_bad_images=cfg.skip_bad_images, max_pixels=cfg.max_pixels,
            progress=None if self.rank == 0 else False,
        )
        self.folder = data
        names = list(data.class_names)
        saved = self._saved_class_names(run_dir) if run_dir is not None else None
        for what, expected in (("data.class_names", cfg.class_names), (f"{CLASSES_FILE} of the run", saved)):
            if expected and list(expected) != names:
                raise DubokoError(
                    f"the classes of {cfg.data_dir} ({', '.join(names)}) differ from {what} "
                    f"({', '.join(expected)}); the model was trained on those"
                )
        cfg.class_names = names
        self.class_names, self.num_classes = names, len(names)
        fields = registry.config_fields(registry.get_spec(self.config.model["name"]))
        for key in CLASS_FIELDS:
            if key in fields:
                self.set_model_field(key, self.num_classes)

        def rows(split: str, limit: int) -> np.ndarray:
            r = data.splits[split]
            return r[:limit] if limit else r

        train_rows = rows("train", cfg.limit_train)
        if "test" in data.splits:
            test_rows = rows("test", cfg.limit_test)
            val_rows = data.splits["val"] if len(data.splits.get("val", ())) else test_rows
        else:
            val_rows = rows("val", cfg.limit_test)
            test_rows = val_rows
            self.test_split = "val"
        if not len(val_rows):
            raise DubokoError(
                f"{cfg.data_dir} has no ROOT/val or ROOT/test folder and data.val_fraction is {cfg.val_fraction}; "
                "set data.val_fraction (e.g. 0.2) to hold out a seeded validation split"
            )
        self.splits["train"] = self._folder_split(data, train_rows, on_device=True)
        self.splits["val"] = self._folder_split(data, val_rows, on_device=False)
        self.splits["test"] = self.splits["val"] if test_rows is val_rows else self._folder_split(data, test_rows, on_device=False)

    def _folder_split(self, data: image_folder.ImageFolderData, rows: np.ndarray, on_device: bool) -> tuple[Any, torch.Tensor]:
        labels = torch.from_numpy(data.labels[rows].copy())
        if len(rows) * int(np.prod(data.images.shape[1:])) <= IN_MEMORY_BYTES:
            images, _ = data.batch(rows)  # (n, C, S, S) uint8, copied out of the map
            return (images.to(self.device), labels.to(self.device)) if on_device else (images, labels)
        return _CachedRows(data.images, rows), labels.to(self.device) if on_device else labels

    @staticmethod
    def _saved_class_names(run_dir: Path) -> list[str] | None:
        path = Path(run_dir) / CLASSES_FILE
        if not path.is_file():
            return None
        saved = read_json(path)
        names = saved.get("class_names") if isinstance(saved, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DubokoError(f"{path} holds no list of class names (expected {{\"class_names\": [...]}})")
        return names

    def save_assets(self, run_dir: Path) -> list[str]:
        if self.config.data.dataset != "folder":
            return []  # the built-in data sets' classes are constants (DATASET_CLASSES)
        cfg = self.config.data
        atomic_write_json(Path(run_dir) / CLASSES_FILE, {
            "class_names": self.class_names, "image_size": cfg.image_size, "channels": cfg.channels,
            "mean": cfg.mean, "std": cfg.std,
        })
        return [CLASSES_FILE]

    # -- training batches ---------------------------------------------------------------------
    def num_train_batches(self) -> int:
        return num_batches(len(self.splits["train"][0]), self.config.train.batch_size, self.world_size)

    def _plain_mnist_path(self) -> bool:
        """MNIST-like data without crop, shift or flip: the primer's transform, bit for bit."""
        cfg = self.config.data
        return cfg.dataset != "folder" and cfg.crop_scale >= 1 and cfg.translate <= 0 and not cfg.hflip

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        cfg, train = self.config.data, self.config.train
        images, labels = self.splits["train"]
        perm = epoch_permutation(len(images), train.seed, epoch, self.device)
        plain = self._plain_mnist_path()
        for i in range(start, self.num_train_batches()):
            idx = batch_slice(perm, i, train.batch_size)
            # The whole global batch is augmented (with the batch's own generator), then each
            # rank keeps its share: 1 process and N ranks see the same augmented images.
            gen = generator(train.seed, epoch, i, device=self.device)
            batch = images[idx].to(self.device)  # (B, 28, 28) or (B, C, S, S) uint8
            if plain:
                x = transforms.train_transform(
                    batch, size=cfg.image_size, channels=cfg.channels, rotation=cfg.rotation,
                    brightness=cfg.brightness, contrast=cfg.contrast, mean=cfg.mean, std=cfg.std, generator=gen,
                )  # (B, C, S, S)
            else:
                x = transforms.augment(
                    batch, size=cfg.image_size, channels=cfg.channels, mean=cfg.mean, std=cfg.std,
                    crop_scale=cfg.crop_scale, translate=cfg.translate, hflip=cfg.hflip, rotation=cfg.rotation,
                    brightness=cfg.brightness, contrast=cfg.contrast, generator=gen,
                )  # (B, C, S, S)
            x = rank_slice(x, self.rank, self.world_size)
            y = rank_slice(labels[idx], self.rank, self.world_size)
            if train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def eval_inputs(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config.data
        images = images.to(self.device)
        if images.dim() == 3 and self._plain_mnist_path():
            x = transforms.eval_transform(images, size=cfg.image_size, channels=cfg.channels, mean=cfg.mean, std=cfg.std)
        else:
            x = transforms.eval_transform_any(images, size=cfg.image_size, channels=cfg.channels, mean=cfg.mean, std=cfg.std)
        if self.config.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # -- pixel space (attacks: duboko.security) -----------------------------------------------
    def pixel_images(self, images: torch.Tensor) -> torch.Tensor:
        """Stored uint8 images (B, H, W) or (B, C, H, W) -> (B, C, H, W) float pixels in [0, 1] on
        the device, at their stored size: the space where an attack's eps is measured."""
        return transforms.to_float(images.to(self.device))

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, C, H, W) -> the model's input, differentiably: the evaluation's resize
        (bilinear) and normalisation (grey replicated to data.channels). For every image,
        `preprocess(pixel_images(images))` equals `eval_inputs(images)`."""
        cfg = self.config.data
        x = pixels
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
        x = transforms.normalize(x, cfg.mean, cfg.std, cfg.channels)  # (B, channels, S, S)
        if self.config.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # -- loss ----------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        logits = model(x)  # (b, classes)
        # `check` admits only cross-entropy (train.loss auto | cross_entropy).
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.train.label_smoothing)
        with torch.no_grad():
            n = y.numel()
            stats = {"loss_sum": loss.detach() * n, "count": float(n), "accuracy": (logits.argmax(1) == y).sum()}
        return StepOutput(loss, stats)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict_split(self, model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        images, labels = self.splits[split]
        bs = self.config.data.eval_batch_size
        preds, loss_sum = [], 0.0
        for i in range(0, len(images), bs):
            logits = model(self.eval_inputs(images[i : i + bs])).float()
            y = labels[i : i + bs].to(self.device)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
        return torch.cat(preds), labels.cpu(), loss_sum / max(1, len(images))

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        model.eval()
        preds, labels, loss = self.predict_split(model, split)
        return {"loss": loss, "accuracy": (preds == labels).double().mean().item()}

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        """Test loss/accuracy, the classification report and the confusion matrix (text + PNG)."""
        model.eval()
        preds, labels, loss = self.predict_split(model, "test")
        cm = M.confusion_matrix(labels, preds, self.num_classes)
        report = M.classification_report(cm, self.class_names)
        # A folder without ROOT/test is tested on its validation split; the report says so.
        where = "" if self.test_split == "test" else f"(on the {self.test_split} split: {self.config.data.data_dir} has no test folder)\n"
        text = where + (
            f"test loss = {loss:.4f} | test accuracy = {report['accuracy'] * 100:.2f}% "
            f"({int(cm.diag().sum())}/{int(cm.sum())})\n\n"
            f"Classification report\n{M.format_report(report)}\n\n"
            f"Confusion matrix (rows = true, columns = predicted)\n{M.format_confusion(cm, self.class_names)}\n"
        )
        if run_dir is not None:
            from duboko.evaluate.plots import plot_confusion, plot_curves

            atomic_write_text(Path(run_dir) / "report.txt", text)
            plot_confusion(cm, self.class_names, Path(run_dir) / "confusion_matrix.png")
            if history:
                plot_curves(history, Path(run_dir) / "curves.png", title=self.config.recipe)
        metrics = {
            "test_loss": loss,
            "test_accuracy": report["accuracy"],
            "classification_report": report,
            "confusion_matrix": cm.tolist(),
        }
        if self.folder is not None:
            metrics.update(self.folder.metrics())  # data.skipped_images, data.num_images, data.num_classes
            metrics["data.decoded_images"] = self.folder.decoded  # 0 when every image came from the cache
            metrics["test_split"] = self.test_split
        return Evaluation(metrics, text)

    # -- inference on user files ---------------------------------------------------------------
    def load_image_file(self, path: str) -> tuple[torch.Tensor, bool]:
        """A user's image as an MNIST-like (28, 28) uint8 tensor: grey, light digit on dark
        background (inverted when the background is light), resized to 28×28."""
        from PIL import Image, UnidentifiedImageError
        import numpy as np

        from duboko.io import check_image_pixels

        # The header is read first and a picture far larger than the model's input is refused
        # before it is decoded (a few hundred bytes of PNG can claim ~89 M pixels, just under PIL's
        # own bomb limit, and its decoder then needs hundreds of MB). The same cap as `predict`'s.
        config = getattr(self, "config", None)  # None: a bare reader (the fuzz tests), at MNIST's 28 pixels
        check_image_pixels(path, int(getattr(config.data, "image_size", 28)) if config is not None else 28)
        try:
            with Image.open(path) as img:
                img.load()
                grey = self._to_grey(img).resize((28, 28), Image.BILINEAR)
        except FileNotFoundError as exc:
            raise DubokoError(f"image {path!r} does not exist") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            # (PIL raises SyntaxError for broken PNG chunks, EOFError for truncated GIFs)
            raise DubokoError(f"cannot read image {path!r}: {exc}") from exc
        array = np.asarray(grey, dtype=np.uint8)
        # MNIST digits are white on black; a mostly light picture is a dark digit on paper.
        border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
        inverted = bool(border.mean() > 127)
        if inverted:
            array = 255 - array
        return torch.from_numpy(array.copy()), inverted

    @staticmethod
    def _to_grey(img):
        """Any PIL mode as 8-bit grey: float images in [0, 1] are scaled to [0, 255]; transparent
        pixels are composited onto a background that contrasts with the opaque strokes."""
        from PIL import Image
        import numpy as np

        if img.mode == "F":
            array = np.asarray(img, dtype=np.float64)
            finite = array[np.isfinite(array)]
            if finite.size and finite.max() <= 1.0:
                array = array * 255.0
            return Image.fromarray(np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255.0
            if alpha.min() < 1.0:
                luminance = np.asarray(rgba.convert("L"), dtype=np.float64)
                weight = alpha.sum()
                ink = (luminance * alpha).sum() / weight if weight > 0 else 0.0
                background = (255, 255, 255, 255) if ink < 128 else (0, 0, 0, 255)
                rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)
            return rgba.convert("L")
        return img.convert("L")

    def load_folder_image(self, path: str) -> torch.Tensor:
        """A user's image decoded exactly as a folder run's training images were (the same
        `image_folder.decode_image` at data.image_size / data.channels): uint8 (C, S, S). No
        inversion: a folder's pictures are whatever the user trained on."""
        cfg = self.config.data
        if not Path(path).is_file():
            raise DubokoError(f"image {path!r} does not exist")
        return torch.from_numpy(image_folder.decode_image(
            path, image_size=cfg.image_size, channels=cfg.channels, max_pixels=cfg.max_pixels))

    @torch.no_grad()
    def predict_files(self, model: nn.Module, paths: list[str], top: int = 3) -> list[dict]:
        cfg = self.config.data
        if cfg.dataset == "folder":
            # `predict` loads no data: the class names come from the run's config (data.class_names).
            if len(cfg.class_names) < 2:
                raise DubokoError("this folder run's config has no data.class_names; it was not trained by this version")
            self.class_names = list(cfg.class_names)
            loaded = [(self.load_folder_image(p), False) for p in paths]
        else:
            # MNIST and Fashion-MNIST share the heuristic: both are light objects on black, made
            # from dark-on-light originals (Fashion-MNIST's are negated product photos).
            self.class_names = list(DATASET_CLASSES[cfg.dataset])
            loaded = [self.load_image_file(p) for p in paths]  # all files checked before any output
        images = torch.stack([img for img, _ in loaded])
        probs = torch.softmax(model(self.eval_inputs(images)).float(), dim=1).cpu()
        k = min(top, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return [
            {
                "file": path,
                "class": self.class_names[int(idx[0])],
                "top": [(self.class_names[int(i)], float(v)) for v, i in zip(vals, idx)],
                "inverted": inv,
            }
            for path, (_, inv), vals, idx in zip(paths, loaded, values, indices)
        ]
