"""The primer's training pipeline, as it is written: the baseline every speed claim is a ratio to.

The primer feeds MY_NET one PIL image at a time through a `DataLoader`:

    transforms.Compose([
        transforms.Resize((48, 48)),
        transforms.Grayscale(num_output_channels=3),
        transforms.RandomRotation(10),
        transforms.ColorJitter(brightness=0.2, contrast=0.2),
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])
    DataLoader(train_set, batch_size=64, shuffle=True)
    optim.Adam(model.parameters(), lr=0.001, weight_decay=1e-4)   # float32, eager

torchvision does not work in this environment, so each transform is re-written here with PIL and
numpy, following torchvision's PIL code paths (`torchvision.transforms.functional_pil`) call for
call: the same PIL operations, the same random draws from torch's global generator in the same
order. This is deliberately the slow way (per-sample Python, PIL, collation); duboko's own path
is `duboko.data.transforms` on whole uint8 batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset

from duboko.data import mnist

# ---------------------------------------------------------------------------------------------
# Per-sample transforms (torchvision semantics on PIL images).


class Resize:
    """`transforms.Resize((h, w))` on a PIL image: PIL's bilinear resize (PIL always antialiases,
    as torchvision's PIL path does)."""

    def __init__(self, size: tuple[int, int]):
        self.size = size  # (height, width), torchvision's order

    def __call__(self, img: Image.Image) -> Image.Image:
        h, w = self.size
        return img.resize((w, h), Image.BILINEAR)  # PIL takes (width, height)


class Grayscale:
    """`transforms.Grayscale(num_output_channels)`: convert to L; for 3 channels stack L three
    times into an RGB image (torchvision's `to_grayscale`)."""

    def __init__(self, num_output_channels: int = 1):
        self.num_output_channels = num_output_channels

    def __call__(self, img: Image.Image) -> Image.Image:
        img = img.convert("L")
        if self.num_output_channels == 3:
            arr = np.asarray(img)
            img = Image.fromarray(np.dstack([arr, arr, arr]), "RGB")
        return img


class RandomRotation:
    """`transforms.RandomRotation(degrees)`: angle ~ U(-degrees, degrees) drawn from torch's global
    generator, rotated about the centre without expanding, filled with 0 (black).

    torchvision's default resample is NEAREST; the primer's pipeline as given to us rotates with
    BILINEAR (also what duboko's batched resample does), so that is the default here."""

    def __init__(self, degrees: float, resample: int = Image.BILINEAR):
        self.degrees = (-float(degrees), float(degrees))
        self.resample = resample

    def __call__(self, img: Image.Image) -> Image.Image:
        angle = float(torch.empty(1).uniform_(self.degrees[0], self.degrees[1]).item())
        fill = tuple([0] * len(img.getbands())) if len(img.getbands()) > 1 else 0
        return img.rotate(angle, self.resample, expand=False, center=None, fillcolor=fill)


class ColorJitter:
    """`transforms.ColorJitter(brightness, contrast)`: factors ~ U(1-b, 1+b) and U(1-c, 1+c); the
    four colour ops are applied in a random order (torch.randperm(4)); saturation and hue unset.
    Brightness and contrast are PIL's ImageEnhance (torchvision's `adjust_brightness/contrast` on
    PIL): brightness blends with black, contrast with the mean grey level of the image."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0):
        self.brightness = (max(0.0, 1 - brightness), 1 + brightness) if brightness else None
        self.contrast = (max(0.0, 1 - contrast), 1 + contrast) if contrast else None

    def __call__(self, img: Image.Image) -> Image.Image:
        # torchvision's get_params draws in this order: permutation, brightness, contrast, ...
        fn_idx = torch.randperm(4)
        b = None if self.brightness is None else float(torch.empty(1).uniform_(*self.brightness))
        c = None if self.contrast is None else float(torch.empty(1).uniform_(*self.contrast))
        for fn_id in fn_idx.tolist():
            if fn_id == 0 and b is not None:
                img = ImageEnhance.Brightness(img).enhance(b)
            elif fn_id == 1 and c is not None:
                img = ImageEnhance.Contrast(img).enhance(c)
        return img


class ToTensor:
    """`transforms.ToTensor()`: uint8 HWC PIL image -> float CHW tensor in [0, 1]."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255)


class Normalize:
    """`transforms.Normalize(mean, std)` on a (C, H, W) tensor; a one-element mean/std broadcasts
    over the three replicated channels, as in the primer."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Compose:
    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


def train_transform(size: int = 48) -> Compose:
    """The primer's training transform."""
    return Compose([
        Resize((size, size)),
        Grayscale(3),
        RandomRotation(10),
        ColorJitter(brightness=0.2, contrast=0.2),
        ToTensor(),
        Normalize(mnist.MEAN, mnist.STD),
    ])


def test_transform(size: int = 48) -> Compose:
    """The primer's test transform: no augmentation."""
    return Compose([Resize((size, size)), Grayscale(3), ToTensor(), Normalize(mnist.MEAN, mnist.STD)])


class MNISTImages(Dataset):
    """torchvision.datasets.MNIST's item path: uint8 array -> PIL 'L' image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images.numpy()  # (N, 28, 28) uint8
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index], mode="L")
        return self.transform(img), self.labels[index]


# ---------------------------------------------------------------------------------------------
# The primer's model code, as it is written (duboko's `my_net` computes the same function with
# ReLU after pooling and in place; tests/test_models_cnn.py checks that the two agree).


class PrimerNet(nn.Module):
    """The primer's own MY_NET class. Same layer names and construction order as duboko's
    `my_net`, so the same seed gives the same initial weights and state dicts load either way."""

    def __init__(self, num_classes: int = 10, image_size: int = 48):
        super().__init__()
        side = image_size // 4
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(128 * side * side, 512)
        self.fc2 = nn.Linear(512, num_classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool1(F.relu(self.conv2(x)))
        x = self.pool2(F.relu(self.conv3(x)))
        x = x.view(x.size(0), -1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


# ---------------------------------------------------------------------------------------------
# The primer's training loop, steppable in windows so a benchmark can interleave it.


@dataclass
class ReferenceConfig:
    batch_size: int = 64  # the primer's DataLoader batch size
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam (L2) weight decay
    num_workers: int = 0  # DataLoader worker processes (the primer's default: none)
    image_size: int = 48  # Resize((48, 48))
    seed: int = 0  # torch.manual_seed before building the model and loader
    limit_train: int = 0  # first N training images only (0: all); for tests
    limit_test: int = 0  # first N test images only (0: all)
    data_dir: str = ""  # MNIST folder ("" searches the usual places)
    device: str = "cpu"  # the primer moves the model and each batch to this device


class ReferenceTrainer:
    """MY_NET trained exactly as the primer does: float32, eager, NCHW, PIL transforms per sample,
    `loss.item()` and the accuracy count on every step."""

    name = "reference"

    def __init__(self, cfg: ReferenceConfig | None = None):
        self.cfg = cfg = cfg or ReferenceConfig()
        torch.manual_seed(cfg.seed)
        data_dir = cfg.data_dir or None
        x, y = mnist.load_mnist("train", data_dir)
        if cfg.limit_train:
            x, y = x[: cfg.limit_train], y[: cfg.limit_train]
        tx, ty = mnist.load_mnist("test", data_dir)
        if cfg.limit_test:
            tx, ty = tx[: cfg.limit_test], ty[: cfg.limit_test]
        self.train_set = MNISTImages(x, y, train_transform(cfg.image_size))
        self.test_set = MNISTImages(tx, ty, test_transform(cfg.image_size))
        self.loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
        from duboko.train.run import pick_device

        self.device = pick_device(cfg.device)
        self.model = PrimerNet(image_size=cfg.image_size).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._it = None
        self.epoch = 0
        self.steps = 0
        self.images_seen = 0

    def _next_batch(self):
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            return next(self._it)

    def run(self, n_batches: int) -> dict[str, float]:
        """Train `n_batches` steps (crossing epoch ends as needed); time them, data loading
        included."""
        self.model.train()
        loss_sum, correct, images = 0.0, 0, 0
        start = time.perf_counter()
        for _ in range(n_batches):
            inputs, labels = self._next_batch()
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            outputs = self.model(inputs)
            loss = F.cross_entropy(outputs, labels)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.item() * labels.size(0)
            correct += (outputs.argmax(1) == labels).sum().item()
            images += labels.size(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.steps += n_batches
        self.images_seen += images
        return {"seconds": seconds, "images": images, "loss_sum": loss_sum, "correct": correct}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test accuracy through the primer's own test pipeline (PIL, batch 1000)."""
        self.model.eval()
        start = time.perf_counter()
        loader = DataLoader(self.test_set, batch_size=1000, shuffle=False, num_workers=self.cfg.num_workers)
        correct, total, loss_sum = 0, 0, 0.0
        for inputs, labels in loader:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            logits = self.model(inputs)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
        return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total),
                "seconds": time.perf_counter() - start, "images": total}
