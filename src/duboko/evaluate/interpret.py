"""Seeing inside an image classifier: Grad-CAM, input-gradient saliency, learned filters,
feature maps and the test images with the highest loss (fastai's `plot_top_losses`).

    cam = grad_cam(model, x, target)          # (B, H, W) in [0, 1], resized to the input
    sal = input_saliency(model, x, target)    # (B, H, W) in [0, 1]

Grad-CAM (Selvaraju et al., 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", eq. 1-2): the class score's gradient w.r.t. the last convolution's
feature maps A^k is averaged over space into one weight α_k per channel; the map is
ReLU(Σ_k α_k A^k), upsampled to the input. Input-gradient saliency (Simonyan et al., 2014, "Deep
Inside Convolutional Networks", sec. 3.1) is |∂score/∂x|, the largest over colour channels; it
works for any differentiable model, so a model with no convolution (the MLP) gets saliency only.

The functions here know a task only by duck typing (`splits`, `eval_inputs`, `class_names`), so
this module stays in the evaluate layer; the commands live in `duboko.cli.inspect`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duboko.errors import DubokoError
from duboko.evaluate.plots import figure, hide_ticks

MAX_TOP_LOSSES = 100  # a gallery larger than this is unreadable and slow to draw
MAX_FEATURE_MAPS = 64


# -- layers ----------------------------------------------------------------------------------------
def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every 2-D convolution of `model`, in registration order (which is forward order for
    duboko's models)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def last_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The last convolution (Grad-CAM's layer), or None for a model without one (an MLP)."""
    convs = conv_layers(model)
    return convs[-1] if convs else None


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name` ("conv1", "blocks.0.conv"); unknown names list the convolutions."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        known = ", ".join(n for n, _ in conv_layers(model)) or "(none: this model has no convolution)"
        raise DubokoError(f"the model has no layer {name!r}; its convolutions are: {known}")
    return modules[name]


class _Capture:
    """A forward hook that keeps a layer's output and hands the network a clone of it, so that
    an in-place ReLU after the layer (MY_NET's `F.relu(..., inplace=True)`) cannot overwrite the
    tensor we differentiate against."""

    def __init__(self, layer: nn.Module):
        self.output: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        self.output = output
        return output.clone()

    def remove(self) -> None:
        self.handle.remove()


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> each map scaled to [0, 1] by its own maximum (all-zero maps stay zero)."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return maps / peak


def _targets(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    """The class index per item: the predicted one when `target` is None."""
    if target is None:
        return logits.argmax(1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return target.to(logits.device).long()


# -- Grad-CAM and saliency ---------------------------------------------------------------------------
def grad_cam(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None,
             layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] at the input's resolution, for class `target` (default:
    the predicted class) at `layer` (default: the last convolution). The model is used as it is
    (call `.eval()` first for dropout-free maps)."""
    if layer is None:
        found = last_conv(model)
        if found is None:
            raise DubokoError("Grad-CAM needs a convolution and this model has none; use input_saliency")
        layer = found[1]
    capture = _Capture(layer)
    try:
        with torch.enable_grad():
            logits = model(x).float()  # (B, classes)
            classes = _targets(logits, target)
            score = logits.gather(1, classes[:, None]).sum()
            if capture.output is None:
                raise DubokoError("the Grad-CAM layer was not used by the model's forward pass")
            activations = capture.output  # (B, K, h, w)
            (grads,) = torch.autograd.grad(score, activations)
    finally:
        capture.remove()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)  # α_k: (B, K, 1, 1)
    cam = F.relu((weights * activations.detach().float()).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    return _normalise(cam.clamp_min(0))


def input_saliency(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None) -> torch.Tensor:
    """|∂ score / ∂ x|, the largest over channels: (B, H, W) in [0, 1]."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x).float()  # (B, classes)
        classes = _targets(logits, target)
        score = logits.gather(1, classes[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)  # (B, C, H, W)
    return _normalise(grad.abs().amax(1).float())


def _shown(x: torch.Tensor) -> torch.Tensor:
    """A model input (1, C, H, W), normalised, as a displayable grey image (H, W) in [0, 1]."""
    img = x[0].detach().float().mean(0).cpu()
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)


@dataclass
class Explanation:
    predicted: str
    probability: float
    cam: torch.Tensor | None  # (H, W) in [0, 1]; None without a convolution
    saliency: torch.Tensor  # (H, W) in [0, 1]
    layer: str  # the Grad-CAM layer's name ("" without one)


def explain(model: nn.Module, x: torch.Tensor, class_names: list[str]) -> Explanation:
    """Predicted class and probability of one input (1, C, H, W), with Grad-CAM at the last
    convolution (when there is one) and input-gradient saliency, both for the predicted class."""
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)[0]  # (classes,)
    pred = int(probs.argmax())
    found = last_conv(model)
    cam = grad_cam(model, x, pred, found[1])[0].cpu() if found else None
    saliency = input_saliency(model, x, pred)[0].cpu()
    name = class_names[pred] if pred < len(class_names) else str(pred)
    return Explanation(name, float(probs[pred]), cam, saliency, found[0] if found else "")


def plot_explanation(x: torch.Tensor, result: Explanation, path: str | Path, source: str = "") -> None:
    """Input, Grad-CAM overlay (when there is one) and saliency overlay side by side."""
    image = _shown(x).numpy()
    panels = [("input", None)]
    if result.cam is not None:
        panels.append((f"Grad-CAM ({result.layer})", result.cam.numpy()))
    panels.append(("input-gradient saliency", result.saliency.numpy()))
    title = f"predicted {result.predicted} (p = {result.probability:.3f})" + (f"  —  {source}" if source else "")
    with figure(path, 1, len(panels), size=(3.2 * len(panels), 3.6), title=title) as (fig, axes):
        for ax, (label, heat) in zip(axes[0], panels):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(label, fontsize=9)
            hide_ticks(ax)


# -- top losses -------------------------------------------------------------------------------------
@dataclass
class TopLosses:
    inputs: torch.Tensor  # (n, C, H, W) model inputs (normalised), on the CPU
    labels: list[int]
    predicted: list[int]
    probability: list[float]  # of the predicted class
    true_probability: list[float]
    losses: list[float]
    class_names: list[str]


@torch.no_grad()
def top_losses(model: nn.Module, task: Any, n: int = 25, split: str = "test") -> TopLosses:
    """The `n` images of `split` with the highest cross-entropy loss (fastai's top_losses);
    `task` is a set-up image-classification task (its `splits`, `eval_inputs`, `class_names`)."""
    if not 1 <= n <= MAX_TOP_LOSSES:
        raise DubokoError(f"the number of top losses must be between 1 and {MAX_TOP_LOSSES}, got {n}")
    splits = getattr(task, "splits", None)
    if not isinstance(splits, dict) or split not in splits or not hasattr(task, "eval_inputs"):
        raise DubokoError(f"top losses need an image classifier with a {split!r} split (task {getattr(task, 'name', '?')!r})")
    images, labels = splits[split]
    model.eval()
    bs = int(getattr(task.config.data, "eval_batch_size", 256) or 256)
    losses, probs = [], []
    for i in range(0, len(images), bs):
        logits = model(task.eval_inputs(images[i : i + bs])).float()  # (b, classes)
        y = labels[i : i + bs].to(logits.device)
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        probs.append(torch.softmax(logits, 1).cpu())
    loss, prob = torch.cat(losses), torch.cat(probs)  # (N,), (N, classes)
    order = loss.argsort(descending=True)[: min(n, len(loss))]
    labels_cpu = labels.cpu()
    pred = prob[order].argmax(1)
    inputs = task.eval_inputs(images[order.to(images.device)]).float().cpu()
    return TopLosses(
        inputs=inputs,
        labels=[int(v) for v in labels_cpu[order]],
        predicted=[int(v) for v in pred],
        probability=[float(prob[i, p]) for i, p in zip(order, pred)],
        true_probability=[float(prob[i, labels_cpu[i]]) for i in order],
        losses=[float(v) for v in loss[order]],
        class_names=list(getattr(task, "class_names", [])),
    )


def plot_top_losses(top: TopLosses, path: str | Path, title: str = "Top losses") -> None:
    """A gallery: each image titled true / predicted / probability of the prediction / loss."""
    n = len(top.losses)
    cols = min(5, n)
    rows = -(-n // cols)
    names = top.class_names or [str(i) for i in range(max(top.labels + top.predicted) + 1)]
    with figure(path, rows, cols, size=(2.1 * cols, 2.7 * rows + 0.6), title=title) as (fig, axes):
        for k in range(rows * cols):
            ax = axes[k // cols][k % cols]
            hide_ticks(ax)
            if k >= n:
                ax.axis("off")
                continue
            ax.imshow(_shown(top.inputs[k : k + 1]).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{names[top.labels[k]]}/{names[top.predicted[k]]} p={top.probability[k]:.2f}\n"
                         f"loss {top.losses[k]:.2f}", fontsize=8)
    # fastai's caption order: actual / predicted / probability / loss


# -- filters and feature maps ---------------------------------------------------------------------------
def _panel_grid(path: str | Path, count: int, title: str, inches: float, draw) -> int:
    """The first MAX_FEATURE_MAPS of `count` small pictures, 8 to a row, each drawn by
    `draw(ax, k)`; returns how many were drawn."""
    n = min(count, MAX_FEATURE_MAPS)
    cols = min(8, n)
    rows = -(-n // cols)
    with figure(path, rows, cols, size=(inches * cols, inches * rows + 0.5), title=title) as (_, axes):
        for k in range(rows * cols):
            ax = axes[k // cols][k % cols]
            hide_ticks(ax)
            if k < n:
                draw(ax, k)
            else:
                ax.axis("off")
    return n


def plot_filters(model: nn.Module, layer_name: str, path: str | Path) -> int:
    """The kernels of convolution `layer_name` as images (RGB when it reads 3 channels, else the
    mean over input channels); returns how many were drawn."""
    layer = find_layer(model, layer_name)
    if not isinstance(layer, nn.Conv2d):
        raise DubokoError(f"layer {layer_name!r} is a {type(layer).__name__}, not a convolution; "
                          f"convolutions: {', '.join(n for n, _ in conv_layers(model))}")
    w = layer.weight.detach().float().cpu()  # (out, in, kh, kw)

    def draw(ax, k: int) -> None:
        kernel = w[k]
        if kernel.shape[0] == 3:  # an RGB kernel as a colour picture, scaled to [0, 1]
            lo, hi = kernel.min(), kernel.max()
            ax.imshow(((kernel - lo) / (hi - lo + 1e-12)).permute(1, 2, 0).numpy())
        else:
            ax.imshow(kernel.mean(0).numpy(), cmap="gray")

    title = f"{layer_name}: {w.shape[0]} kernels {w.shape[2]}×{w.shape[3]} over {w.shape[1]} channels"
    return _panel_grid(path, w.shape[0], title, 1.2, draw)


def feature_maps(model: nn.Module, layer_name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of `layer_name` for one input (1, C, H, W): (K, h, w), before any in-place
    activation that follows the layer."""
    layer = find_layer(model, layer_name)
    capture = _Capture(layer)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        capture.remove()
    out = capture.output
    if out is None or out.dim() != 4:
        shape = None if out is None else tuple(out.shape)
        raise DubokoError(f"layer {layer_name!r} gives no feature maps (output shape {shape}, expected (1, K, h, w))")
    return out[0].detach().float().cpu()


def plot_feature_maps(maps: torch.Tensor, layer_name: str, path: str | Path) -> int:
    """The first channels of `maps` (K, h, w) as a grid; returns how many were drawn."""
    title = f"{layer_name}: {maps.shape[0]} feature maps {maps.shape[1]}×{maps.shape[2]}"
    return _panel_grid(path, maps.shape[0], title, 1.3, lambda ax, k: ax.imshow(maps[k].numpy(), cmap="viridis"))
