"""Robust accuracy against eps, and the checks that keep an evaluation from fooling itself.

Carlini et al. 2019 ("On Evaluating Adversarial Robustness", Section 5) list the signs that an
attack, not the model, is what failed (gradient masking, a broken loss, a stochastic model):
- robust accuracy rises with eps (a larger ball contains the smaller one);
- the attack at eps = 0 differs from the clean accuracy (the attacked pipeline is not the one that
  is evaluated: a different preprocessing, dropout left on);
- an unbounded attack (L∞ eps = 1: any image is reachable) leaves accuracy above 0 %;
- more steps or restarts give a *higher* accuracy (the attack has not converged, or its gradients
  are noise).
`robustness_report` measures the curve and runs these checks; each violation is a warning of
gradient masking, printed beside the table.

A task provides the data and the pixel space through duck typing (security sits below tasks):
`task.splits["test"]` = (uint8 images, labels), `task.pixel_images(images)` -> [0, 1] pixels,
`task.preprocess(pixels)` -> the model's input, `task.eval_inputs(images)` -> the model's input
as the task evaluates it (the eps = 0 check compares the two paths).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.security.attacks import AttackConfig, PixelModel, attack

MAX_IMAGES = 100_000  # bound on --n
MAX_EPS_VALUES = 64  # bound on the length of --eps
TOLERANCE = 1e-9  # accuracies are counts / n: equal means equal


@dataclass
class RobustnessResult:
    """What `robustness_report` measured."""

    attack: dict[str, Any]  # the AttackConfig, as a dict
    n: int  # images attacked (the first n of the test split)
    clean_accuracy: float  # the task's own evaluation path on those images
    curve: list[dict[str, float]] = field(default_factory=list)  # [{"eps": e, "robust_accuracy": a}]
    checks: list[dict[str, Any]] = field(default_factory=list)  # [{"check": ..., "ok": bool, "detail": ...}]

    @property
    def warnings(self) -> list[str]:
        return [f"possible gradient masking: {c['detail']}" for c in self.checks if not c["ok"]]

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "n": self.n, "clean_accuracy": self.clean_accuracy, "curve": self.curve,
                "checks": self.checks, "warnings": self.warnings}


def parse_eps_list(text: str, norm: str = "linf") -> list[float]:
    """"0.05,0.1,0.3" -> [0.05, 0.1, 0.3]; each in the norm's range, at most MAX_EPS_VALUES."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise DubokoError(f"--eps needs at least one value (e.g. 0.05,0.1,0.3), got {text!r}")
    if len(parts) > MAX_EPS_VALUES:
        raise DubokoError(f"--eps takes at most {MAX_EPS_VALUES} values, got {len(parts)}")
    values = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise DubokoError(f"--eps value {p!r} is not a number") from None
        AttackConfig(eps=value, norm=norm).check()  # the range check, with its message
        values.append(value)
    return values


def robust_correct(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig,
                   batch_size: int = 500, progress: Any = None) -> torch.Tensor:
    """(N,) bool: still classified correctly after `cfg`'s attack, batch by batch."""
    model.eval()
    out = []
    for b, i in enumerate(range(0, len(pixels), batch_size)):
        x, y = pixels[i : i + batch_size], labels[i : i + batch_size]
        x_adv = attack(model, x, y, cfg, batch_index=b)
        with torch.no_grad():
            out.append((model(x_adv).argmax(1) == y).cpu())
        if progress is not None:
            progress.update(len(x))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def first_test_pixels(task: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images in pixel space [0, 1] (B, C, H, W) and their labels, on the task's device."""
    if not (isinstance(n, int) and 1 <= n <= MAX_IMAGES):
        raise DubokoError(f"--n must be an integer in [1, {MAX_IMAGES}], got {n!r}")
    images, labels = task.splits["test"]
    n = min(n, len(images))
    return task.pixel_images(images[:n]), labels[:n].to(task.device)


@torch.no_grad()
def _task_accuracy(task: Any, net: nn.Module, n: int, batch_size: int) -> float:
    images, labels = task.splits["test"]
    correct = 0
    for i in range(0, n, batch_size):
        logits = net(task.eval_inputs(images[i : min(n, i + batch_size)]))
        correct += int((logits.argmax(1).cpu() == labels[i : min(n, i + batch_size)].cpu()).sum())
    return correct / max(1, n)


def robustness_report(task: Any, net: nn.Module, cfg: AttackConfig, eps_list: Sequence[float], n: int = 1000,
                      batch_size: int = 500, checks: bool = True, show_progress: bool | None = None) -> RobustnessResult:
    """Robust accuracy of `net` (a run's model, eval mode) on the first n test images for each eps,
    and the sanity checks (see the module's docstring)."""
    cfg.check()
    if not eps_list:
        raise DubokoError("eps_list is empty; give at least one eps")
    for eps in eps_list:
        dataclasses.replace(cfg, eps=float(eps)).check()
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DubokoError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    net.eval()
    model = PixelModel(net, task.preprocess)
    pixels, labels = first_test_pixels(task, n)
    n = len(pixels)
    clean = _task_accuracy(task, net, n, batch_size)
    result = RobustnessResult(attack=dataclasses.asdict(cfg), n=n, clean_accuracy=clean)

    eps_values = sorted({0.0, *map(float, eps_list)})
    extra_runs = 2 if checks and cfg.method != "fgsm" else 1 if checks else 0
    total = n * (len(eps_values) + extra_runs)
    bar = _progress(total, f"{cfg.method} attack", show_progress)
    try:
        accuracy = {}
        for eps in eps_values:
            run = dataclasses.replace(cfg, eps=eps)
            accuracy[eps] = robust_correct(model, pixels, labels, run, batch_size, bar).double().mean().item()
        result.curve = [{"eps": e, "robust_accuracy": accuracy[e]} for e in eps_values]
        if checks:
            result.checks = _sanity_checks(model, pixels, labels, cfg, clean, accuracy, batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    return result


def _sanity_checks(model, pixels, labels, cfg: AttackConfig, clean: float, accuracy: dict[float, float],
                   batch_size: int, bar) -> list[dict[str, Any]]:
    out = []
    eps_values = sorted(accuracy)
    rises = [(a, b) for a, b in zip(eps_values, eps_values[1:]) if accuracy[b] > accuracy[a] + TOLERANCE]
    out.append({"check": "monotone in eps", "ok": not rises, "detail": (
        "robust accuracy never rises with eps" if not rises else
        "; ".join(f"accuracy rises from {accuracy[a]:.2%} at eps {a:g} to {accuracy[b]:.2%} at eps {b:g}" for a, b in rises))})
    zero = accuracy[0.0]
    same = abs(zero - clean) <= TOLERANCE
    out.append({"check": "eps 0 = clean", "ok": same, "detail": (
        f"eps = 0 gives the clean accuracy {clean:.2%}" if same else
        f"eps = 0 gives {zero:.2%} but the clean accuracy is {clean:.2%}: the attacked pipeline differs from the "
        "evaluated one (preprocessing, or a stochastic model)")})
    # An unbounded ball: L∞ eps = 1 reaches every image; for L2 the ball of radius √d holds [0, 1]^d.
    unbounded = 1.0 if cfg.norm == "linf" else math.sqrt(pixels[0].numel())
    full = robust_correct(model, pixels, labels, dataclasses.replace(cfg, eps=unbounded), batch_size, bar)
    full_acc = full.double().mean().item()
    note = " (fgsm is a single step: an iterative attack such as pgd should reach 0 %)" if cfg.method == "fgsm" else ""
    out.append({"check": "unbounded eps gives 0 %", "ok": full_acc <= TOLERANCE, "eps": unbounded, "robust_accuracy": full_acc,
                "detail": f"an unbounded attack (eps {unbounded:g}) leaves {full_acc:.2%} correct{note}"})
    if cfg.method != "fgsm":
        # More work for the attacker at the largest eps: twice the steps and twice the restarts
        # (the first restarts are the same draws, see `attack`); it must not help the model.
        eps = eps_values[-1]
        stronger = dataclasses.replace(cfg, eps=eps, steps=min(2 * cfg.steps, 10_000), restarts=min(2 * cfg.restarts, 100),
                                       step_size=cfg.step_size)
        acc = robust_correct(model, pixels, labels, stronger, batch_size, bar).double().mean().item()
        ok = acc <= accuracy[eps] + TOLERANCE
        out.append({"check": "more steps/restarts never help", "ok": ok, "eps": eps, "robust_accuracy": acc,
                    "steps": stronger.steps, "restarts": stronger.restarts, "detail": (
                        f"{stronger.steps} steps × {stronger.restarts} restarts give {acc:.2%} ≤ {accuracy[eps]:.2%} at eps {eps:g}"
                        if ok else f"{stronger.steps} steps × {stronger.restarts} restarts give {acc:.2%} > "
                        f"{accuracy[eps]:.2%} of {cfg.steps} × {cfg.restarts} at eps {eps:g}: the attack has not converged")})
    return out


def _progress(total: int, desc: str, show: bool | None):
    import sys

    if show is False or (show is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


def format_table(result: RobustnessResult) -> str:
    """The curve and the checks as text, for people."""
    a = result.attack
    steps = "" if a["method"] == "fgsm" else f", {a['steps']} steps × {a['restarts']} restarts, step {a['step_size'] or '2.5·eps/steps'}"
    lines = [f"{a['method']} ({a['norm']}{steps}) on {result.n} test images; clean accuracy {result.clean_accuracy:.2%}",
             "", f"{'eps':>8}  {'robust accuracy':>15}"]
    lines += [f"{row['eps']:>8g}  {row['robust_accuracy']:>15.2%}" for row in result.curve]
    if result.checks:
        lines += ["", "Checks (Carlini et al. 2019)"]
        lines += [f"  [{'ok' if c['ok'] else 'WARNING'}] {c['check']}: {c['detail']}" for c in result.checks]
    return "\n".join(lines)


def plot_curve(result: RobustnessResult, path: str | Path, title: str = "") -> None:
    """Robust accuracy (%) against eps as a PNG."""
    from duboko.evaluate.plots import figure

    xs = [row["eps"] for row in result.curve]
    ys = [100 * row["robust_accuracy"] for row in result.curve]
    with figure(path, title=title or f"{result.attack['method']} robustness ({result.n} images)") as (_, axes):
        ax = axes[0][0]
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel(f"eps ({result.attack['norm']}, pixel units)")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)


def adversarial_examples(task: Any, net: nn.Module, cfg: AttackConfig, count: int) -> dict[str, Any]:
    """The first `count` test images, their perturbations and adversarial images, with labels and
    predictions (for `plot_examples`)."""
    if not (isinstance(count, int) and 1 <= count <= 256):
        raise DubokoError(f"--examples must be an integer in [1, 256], got {count!r}")
    cfg.check()
    net.eval()
    model = PixelModel(net, task.preprocess)
    x, y = first_test_pixels(task, count)
    x_adv = attack(model, x, y, cfg)
    with torch.no_grad():
        clean_pred, adv_pred = model(x).argmax(1), model(x_adv).argmax(1)
    names = list(getattr(task, "class_names", [])) or [str(i) for i in range(int(y.max()) + 1)]
    return {"clean": x.cpu(), "adversarial": x_adv.cpu(), "labels": [names[i] for i in y.tolist()],
            "clean_pred": [names[i] for i in clean_pred.tolist()], "adv_pred": [names[i] for i in adv_pred.tolist()]}


def plot_examples(examples: dict[str, Any], path: str | Path, eps: float, method: str) -> None:
    """One row per image: clean (true label, prediction) | perturbation (scaled to the colour
    range) | adversarial (its prediction)."""
    from duboko.evaluate.plots import figure, hide_ticks

    clean, adv = examples["clean"], examples["adversarial"]
    n = len(clean)

    def show(ax, img):  # (C, H, W) in [0, 1]
        ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        hide_ticks(ax)

    per_row = 2 if n > 4 else 1  # two (clean | perturbation | adversarial) triples side by side
    rows = math.ceil(n / per_row)
    with figure(path, rows, 3 * per_row, size=(6 * per_row, 2 * rows), title=f"{method}, eps {eps:g}") as (_, axes):
        for ax in (a for row in axes for a in row):
            hide_ticks(ax)
            ax.axis("off")
        for i in range(n):
            r, c = divmod(i, per_row)
            panels = axes[r][3 * c : 3 * c + 3]
            for ax in panels:
                ax.axis("on")
            show(panels[0], clean[i])
            panels[0].set_title(f"true {examples['labels'][i]}, pred {examples['clean_pred'][i]}", fontsize=8)
            delta = adv[i] - clean[i]
            scale = max(float(delta.abs().max()), 1e-12)
            show(panels[1], (delta / scale + 1) / 2)
            panels[1].set_title(f"perturbation (±{scale:.3g})", fontsize=8)
            show(panels[2], adv[i])
            panels[2].set_title(f"adversarial: {examples['adv_pred'][i]}", fontsize=8)
