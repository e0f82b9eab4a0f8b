"""Image classification on MNIST: the primer's CNN pipeline (and any image model, e.g. an MLP).

The whole data set lives on the training device as uint8 (60000×28×28 = 47 MB); each batch is
augmented there in a few batched ops (`duboko.data.transforms`), with no per-sample Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duboko.data import mnist, transforms
from duboko.data.batching import batch_slice, epoch_permutation, num_batches, rank_slice
from duboko.config import require_at_least
from duboko.errors import DubokoError, unknown_name
from duboko.evaluate import metrics as M
from duboko.io import atomic_write_text
from duboko.seeding import generator
from duboko.tasks import Evaluation, StepOutput, Task, register_task

DATASETS = ("mnist",)
# Classes of each data set, known without loading it (so `check` can compare the model's outputs).
DATASET_CLASSES = {"mnist": mnist.CLASSES}


@dataclass
class ImageDataConfig:
    dataset: str = "mnist"  # the data set (mnist)
    data_dir: str = ""  # folder with the IDX files ("" searches $DUBOKO_DATA, the bundled copy, the cache)
    download: bool = False  # download into the user cache even when a local copy exists
    image_size: int = 48  # resize to image_size × image_size
    channels: int = 3  # 3 replicates the grey channel (the primer's Grayscale(3)); 1 keeps it
    rotation: float = 10.0  # random rotation in ±degrees (training only)
    brightness: float = 0.2  # brightness jitter factor range 1 ± brightness (training only)
    contrast: float = 0.2  # contrast jitter factor range 1 ± contrast (training only)
    mean: float = mnist.MEAN  # normalisation mean (MNIST train set)
    std: float = mnist.STD  # normalisation std (MNIST train set)
    val_fraction: float = 0.0  # hold out this share of train for validation (0: validate on test, as the primer)
    limit_train: int = 0  # use only the first N training images (0: all), for quick experiments and tests
    limit_test: int = 0  # use only the first N test images (0: all)
    eval_batch_size: int = 1000  # batch size for evaluation passes


@register_task
class ImageClassificationTask(Task):
    name = "image-classification"
    data_config = ImageDataConfig
    shown_metric = "accuracy"
    datasets = DATASETS
    losses = ("cross_entropy",)

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
        cls._check_model_shapes(config)

    @staticmethod
    def _check_model_shapes(config: Any) -> None:
        """The model's input and output sizes against the data's, where the model has them: a
        mismatch would otherwise fail inside the first batch, after the run folder exists."""
        cfg, model = config.data, config.model
        n_classes = len(DATASET_CLASSES[cfg.dataset])
        for key in ("num_classes", "out_features"):
            if key in model and model[key] != n_classes:
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
        self.class_names = list(DATASET_CLASSES[cfg.dataset])
        self.num_classes = len(self.class_names)
        # split -> (uint8 images (N, 28, 28), int64 labels (N,)); train lives on the device.
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        data_dir = cfg.data_dir or None
        if "train" in splits:
            x, y = mnist.load_split("train", data_dir, cfg.download, limit=cfg.limit_train)
            if cfg.val_fraction > 0:
                (x, y), self.splits["val"] = mnist.hold_out_validation(x, y, max(1, int(len(x) * cfg.val_fraction)))
            self.splits["train"] = (x.to(self.device), y.to(self.device))
        if "test" in splits or "val" not in self.splits:
            self.splits["test"] = mnist.load_split("test", data_dir, limit=cfg.limit_test)
            self.splits.setdefault("val", self.splits["test"])

    # -- training batches ---------------------------------------------------------------------
    def num_train_batches(self) -> int:
        return num_batches(len(self.splits["train"][0]), self.config.train.batch_size, self.world_size)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        cfg, train = self.config.data, self.config.train
        images, labels = self.splits["train"]
        perm = epoch_permutation(len(images), train.seed, epoch, self.device)
        for i in range(start, self.num_train_batches()):
            idx = batch_slice(perm, i, train.batch_size)
            # The whole global batch is augmented (with the batch's own generator), then each
            # rank keeps its share: 1 process and N ranks see the same augmented images.
            gen = generator(train.seed, epoch, i, device=self.device)
            x = transforms.train_transform(
                images[idx], size=cfg.image_size, channels=cfg.channels, rotation=cfg.rotation,
                brightness=cfg.brightness, contrast=cfg.contrast, mean=cfg.mean, std=cfg.std, generator=gen,
            )  # (B, C, S, S)
            x = rank_slice(x, self.rank, self.world_size)
            y = rank_slice(labels[idx], self.rank, self.world_size)
            if train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def eval_inputs(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config.data
        x = transforms.eval_transform(images.to(self.device), size=cfg.image_size, channels=cfg.channels, mean=cfg.mean, std=cfg.std)
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
        text = (
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
        return Evaluation(metrics, text)

    # -- inference on user files ---------------------------------------------------------------
    def load_image_file(self, path: str) -> tuple[torch.Tensor, bool]:
        """A user's image as an MNIST-like (28, 28) uint8 tensor: grey, light digit on dark
        background (inverted when the background is light), resized to 28×28."""
        from PIL import Image, UnidentifiedImageError
        import numpy as np

        try:
            with Image.open(path) as img:
                img.load()
                grey = self._to_grey(img).resize((28, 28), Image.BILINEAR)
        except FileNotFoundError as exc:
            raise DubokoError(f"image {path!r} does not exist") from exc
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
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

    @torch.no_grad()
    def predict_files(self, model: nn.Module, paths: list[str], top: int = 3) -> list[dict]:
        self.class_names = list(DATASET_CLASSES[self.config.data.dataset])
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
