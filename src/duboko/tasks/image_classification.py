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
from duboko.errors import DubokoError, unknown_name
from duboko.evaluate import metrics as M
from duboko.io import atomic_write_text
from duboko.tasks import StepOutput, Task

DATASETS = ("mnist",)


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


def batch_generator(seed: int, epoch: int, index: int, device: torch.device) -> torch.Generator:
    """A generator for one batch's random draws: a pure function of (seed, epoch, batch index),
    so resume and every rank reproduce the same augmentation without replaying earlier batches."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)
    return g


class ImageClassificationTask(Task):
    name = "image-classification"
    data_config = ImageDataConfig
    shown_metric = "accuracy"

    def setup(self, run_dir: Path | None = None, splits: tuple[str, ...] = ("train", "test")) -> None:
        cfg = self.config.data
        if cfg.dataset not in DATASETS:
            raise unknown_name("data.dataset", cfg.dataset, DATASETS)
        if cfg.image_size < 4 or cfg.channels not in (1, 3):
            raise DubokoError(f"data.image_size must be >= 4 and data.channels 1 or 3, got {cfg.image_size}, {cfg.channels}")
        for key in ("rotation", "brightness", "contrast", "mean", "std"):
            value = getattr(cfg, key)
            if not math.isfinite(value) or (value < 0 and key != "mean"):
                raise DubokoError(f"data.{key} must be a finite number >= 0, got {value!r}")
        if cfg.std <= 0:
            raise DubokoError(f"data.std must be > 0, got {cfg.std!r}")
        if cfg.brightness >= 1 or cfg.contrast >= 1:
            raise DubokoError(f"data.brightness and data.contrast must be < 1, got {cfg.brightness!r}, {cfg.contrast!r}")
        if cfg.limit_train < 0 or cfg.limit_test < 0 or cfg.eval_batch_size < 1:
            raise DubokoError(
                f"data.limit_train and data.limit_test must be >= 0 and data.eval_batch_size >= 1, got "
                f"{cfg.limit_train}, {cfg.limit_test}, {cfg.eval_batch_size}"
            )
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise DubokoError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        self.class_names = list(mnist.CLASSES)
        self.num_classes = len(self.class_names)
        model_classes = self.config.model.get("num_classes", self.config.model.get("out_features"))
        if model_classes is not None and model_classes != self.num_classes:
            raise DubokoError(f"the model has {model_classes} outputs but {cfg.dataset} has {self.num_classes} classes")
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        data_dir = cfg.data_dir or None
        if "train" in splits:
            x, y = mnist.load_mnist("train", data_dir, cfg.download)
            if cfg.limit_train:
                x, y = x[: cfg.limit_train], y[: cfg.limit_train]
            if cfg.val_fraction > 0:
                # A fixed split (seeded by nothing but the data): the same for every run and rank.
                g = torch.Generator().manual_seed(1234)
                perm = torch.randperm(len(x), generator=g)
                n_val = max(1, int(len(x) * cfg.val_fraction))
                self.splits["val"] = (x[perm[:n_val]], y[perm[:n_val]])
                x, y = x[perm[n_val:]], y[perm[n_val:]]
            self.splits["train"] = (x.to(self.device), y.to(self.device))
        if "test" in splits or "val" not in self.splits:
            x, y = mnist.load_mnist("test", data_dir)
            if cfg.limit_test:
                x, y = x[: cfg.limit_test], y[: cfg.limit_test]
            self.splits["test"] = (x, y)
            self.splits.setdefault("val", self.splits["test"])

    # -- training batches ---------------------------------------------------------------------
    def _global_batches(self) -> int:
        return math.ceil(len(self.splits["train"][0]) / self.config.train.batch_size)

    def num_train_batches(self) -> int:
        return self._global_batches()

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        cfg, train = self.config.data, self.config.train
        images, labels = self.splits["train"]
        g = torch.Generator(device=self.device)
        g.manual_seed(train.seed * 7919 + epoch)
        perm = torch.randperm(len(images), generator=g, device=self.device)
        bs = train.batch_size
        for i in range(start, self._global_batches()):
            # The global batch is the same for any world size; each rank takes every
            # world_size-th sample of it, so 1 process and N ranks see the same data.
            idx = perm[i * bs : (i + 1) * bs]
            gen = batch_generator(train.seed, epoch, i, self.device)
            x = transforms.train_transform(
                images[idx], size=cfg.image_size, channels=cfg.channels, rotation=cfg.rotation,
                brightness=cfg.brightness, contrast=cfg.contrast, mean=cfg.mean, std=cfg.std, generator=gen,
            )
            x, y = x[self.rank :: self.world_size], labels[idx][self.rank :: self.world_size]
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
    def _loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = self.config.train.loss
        if loss in ("auto", "cross_entropy"):
            return F.cross_entropy(logits.float(), y, label_smoothing=self.config.train.label_smoothing, reduction=reduction)
        raise DubokoError(f"train.loss {loss!r} does not fit {self.num_classes}-class image classification; use cross_entropy")

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        logits = model(x)
        loss = self._loss(logits, y)
        with torch.no_grad():
            n = y.numel()
            stats = {"loss_sum": loss.detach() * n, "count": float(n), "correct": (logits.argmax(1) == y).sum()}
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

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> dict[str, Any]:
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
        return {
            "test_loss": loss,
            "test_accuracy": report["accuracy"],
            "classification_report": report,
            "confusion_matrix": cm.tolist(),
            "report_text": text,
        }

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
        self.class_names = list(mnist.CLASSES)
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
