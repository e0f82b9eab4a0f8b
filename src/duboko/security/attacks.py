"""White-box evasion attacks in pixel space: FGSM, PGD (L∞ and L2, random start, restarts),
Carlini–Wagner's margin loss as a PGD objective, and APGD-CE / APGD-DLR.

Every attack works on images in [0, 1] *before* the model's normalisation, so eps means what the
papers mean (eps = 0.3 on MNIST is 0.3 of the pixel range). A run's network is wrapped as
`PixelModel(net, preprocess)`: preprocess is the task's resize + normalise, which is
differentiable, so the gradient flows back to the pixels.

- FGSM (Goodfellow et al. 2015): x' = clip(x + eps · sign(∇x L)), L2: x + eps · ∇/‖∇‖₂.
- PGD (Madry et al. 2018): from a random point of the eps-ball, `steps` steps of size α along
  sign(∇) (L∞) or ∇/‖∇‖₂ (L2), each followed by the projection onto the ball ∩ [0, 1]^d; the
  attack is rerun `restarts` times and a sample counts as robust only if no restart fools it.
- CW (Carlini & Wagner 2017, loss f6 with κ = ∞): PGD on the margin max_{j≠y} z_j − z_y, the
  "CW-L∞" attack of Madry et al.'s leaderboard.
- APGD (Croce & Hein 2020, Algorithm 1): PGD with momentum 0.75 and a per-sample step size that
  starts at 2·eps and is halved at checkpoints where the loss stopped rising; its losses are the
  cross-entropy (APGD-CE) or the scale-invariant Difference of Logits Ratio (APGD-DLR, eq. 6).

Batched, with gradients taken by `torch.autograd.grad` (the model's parameter gradients are never
touched), updates under `torch.no_grad`, and every random draw from a generator seeded by
`AttackConfig.seed` (the same seed gives the same adversarial images).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duboko.errors import DubokoError, unknown_name
from duboko.seeding import generator

METHODS = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr")
NORMS = ("linf", "l2")
MAX_STEPS = 10_000  # bounds for a request (CLI, API): a larger number is refused
MAX_RESTARTS = 100
MAX_L2_EPS = 1e4  # an L2 ball of this radius already holds the whole [0, 1]^d of any image we load

# APGD (Croce & Hein 2020, Section 3.2): momentum α, the checkpoint test's ρ, the first
# checkpoints p_0 = 0, p_1 = 0.22 and the growth p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
APGD_MOMENTUM = 0.75
APGD_RHO = 0.75


@dataclass
class AttackConfig:
    method: str = "pgd"  # fgsm | pgd | cw | apgd-ce | apgd-dlr
    eps: float = 0.3  # radius of the threat model's ball, in pixel units ([0, 1] images)
    norm: str = "linf"  # linf | l2
    steps: int = 40  # iterations (pgd, cw, apgd; fgsm is one step)
    step_size: float = 0.0  # α per iteration; 0: 2.5 · eps / steps (Madry et al.); fgsm always eps
    restarts: int = 1  # independent random starts; robust only when no restart succeeds
    random_start: bool = True  # start from a uniform point of the ball (pgd, cw, apgd)
    seed: int = 0  # seeds the random starts

    def check(self) -> None:
        """Refuse values that cannot run, naming the field and its allowed range."""
        if self.method not in METHODS:
            raise unknown_name("attack method", self.method, METHODS)
        if self.norm not in NORMS:
            raise unknown_name("attack norm", self.norm, NORMS)
        limit = 1.0 if self.norm == "linf" else MAX_L2_EPS
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0.0 <= self.eps <= limit):
            raise DubokoError(f"eps must be a number in [0, {limit:g}] for norm {self.norm}, got {self.eps!r}")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= MAX_STEPS):
            raise DubokoError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        if not (isinstance(self.restarts, int) and 1 <= self.restarts <= MAX_RESTARTS):
            raise DubokoError(f"restarts must be an integer in [1, {MAX_RESTARTS}], got {self.restarts!r}")
        if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size >= 0):
            raise DubokoError(f"step_size must be a finite number >= 0 (0: 2.5 · eps / steps), got {self.step_size!r}")

    @property
    def alpha(self) -> float:
        """The step size: step_size, or Madry et al.'s 2.5 · eps / steps."""
        return self.step_size if self.step_size > 0 else 2.5 * self.eps / self.steps


class PixelModel(nn.Module):
    """net ∘ preprocess: a classifier of [0, 1] pixel images (B, C, H, W), for attacks whose eps
    is measured before normalisation."""

    def __init__(self, net: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.net = net
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x) if self.preprocess is not None else x).float()


# -- losses (per sample, (B,); each attack maximises its loss) ---------------------------------
def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini–Wagner's f6 with κ = ∞: max_{j≠y} z_j − z_y (> 0 exactly when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein 2020, eq. 6: −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3), with z_π sorted
    descending; invariant to shifting and scaling the logits (needs >= 3 classes)."""
    ordered = logits.sort(dim=1, descending=True).values  # (B, K)
    return margin_loss(logits, y) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _loss_for(method: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return {"cw": margin_loss, "apgd-dlr": dlr_loss}.get(method, ce_loss)


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample loss (B,), ∇x of their sum (B, ...), logits (B, K)) at x."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad.detach(), logits.detach()


# -- geometry of the ball -------------------------------------------------------------------
def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped (B, 1, 1, ...) to broadcast against t."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step: sign(∇) for L∞, ∇/‖∇‖₂ for L2."""
    return grad.sign() if norm == "linf" else grad / _flat_norm(grad)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Onto {x' : ‖x' − x‖ ≤ eps} ∩ [0, 1]^d. For L2 the ball's projection comes first; clipping
    to [0, 1] then moves each coordinate towards x (x is in [0, 1]), so it stays inside the ball."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A uniform point of the ball around x, clipped to [0, 1]. L2: a Gaussian direction and a
    radius eps · u^(1/d), uniform in the ball's volume."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * eps
    else:
        d = x[0].numel()
        direction = torch.randn(x.shape, generator=gen, device=x.device)
        direction = direction / _flat_norm(direction)
        radius = torch.rand(x.shape[0], generator=gen, device=x.device) ** (1.0 / d) * eps
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


# -- attacks --------------------------------------------------------------------------------
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
         loss_fn=ce_loss) -> torch.Tensor:
    """One step of size eps along the gradient's sign (L∞) or direction (L2), clipped to [0, 1]."""
    _, grad, _ = _gradient(model, x, y, loss_fn)
    with torch.no_grad():
        return project(x + eps * _direction(grad, norm), x, eps, norm)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, gen: torch.Generator,
        loss_fn=ce_loss) -> torch.Tensor:
    """One PGD run (Madry et al. 2018, eq. 2): x_{t+1} = Π(x_t + α · direction(∇ L(x_t)));
    returns the last iterate."""
    x_adv = random_start(x, cfg.eps, cfg.norm, gen) if cfg.random_start else x.clone()
    for _ in range(cfg.steps):
        _, grad, _ = _gradient(model, x_adv, y, loss_fn)
        with torch.no_grad():
            x_adv = project(x_adv + cfg.alpha * _direction(grad, cfg.norm), x, cfg.eps, cfg.norm)
    return x_adv


def apgd_checkpoints(steps: int) -> list[int]:
    """Croce & Hein 2020, Section 3.2: the iterations w_j = ceil(p_j · steps) where the step size
    may be halved; p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # (rounded first: 0.41 + 0.16 is 0.5700000000000001 in floating point)
    return sorted({math.ceil(round(v * steps, 9)) for v in p if v <= 1})


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, gen: torch.Generator,
         loss_fn=ce_loss) -> torch.Tensor:
    """One APGD run (Croce & Hein 2020, Algorithm 1). Returns, per sample, the first iterate that
    fooled the model, else the iterate of highest loss."""
    b = x.shape[0]
    view = (-1, *([1] * (x.dim() - 1)))
    eta = torch.full((b,), 2.0 * cfg.eps, device=x.device)  # per-sample step size η
    x_cur = random_start(x, cfg.eps, cfg.norm, gen) if cfg.random_start else x.clone()
    loss, grad, logits = _gradient(model, x_cur, y, loss_fn)
    best_loss, x_best = loss.clone(), x_cur.clone()
    fooled = logits.argmax(1) != y
    x_fooled = torch.where(fooled.view(view), x_cur, x)
    checkpoints = apgd_checkpoints(cfg.steps)
    increases = torch.zeros(b, device=x.device)  # steps with f(x_{k+1}) > f(x_k) since the last checkpoint
    last_check, eta_at_check, best_at_check = 0, eta.clone(), best_loss.clone()
    x_prev = x_cur
    prev_loss = loss
    for k in range(cfg.steps):
        with torch.no_grad():
            z = project(x_cur + eta.view(view) * _direction(grad, cfg.norm), x, cfg.eps, cfg.norm)
            if k == 0:
                x_next = z
            else:  # momentum: x_{k+1} = Π(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))
                x_next = project(x_cur + APGD_MOMENTUM * (z - x_cur) + (1 - APGD_MOMENTUM) * (x_cur - x_prev),
                                 x, cfg.eps, cfg.norm)
        loss, grad_next, logits = _gradient(model, x_next, y, loss_fn)
        with torch.no_grad():
            newly = (logits.argmax(1) != y) & ~fooled
            x_fooled = torch.where(newly.view(view), x_next, x_fooled)
            fooled |= newly
            increases += (loss > prev_loss).float()
            better = loss > best_loss
            best_loss = torch.where(better, loss, best_loss)
            x_best = torch.where(better.view(view), x_next, x_best)
            x_prev, x_cur, grad, prev_loss = x_cur, x_next, grad_next, loss
            if k + 1 in checkpoints and k + 1 > last_check:
                # Condition 1: the loss rose in fewer than ρ of the steps since the last checkpoint;
                # condition 2: η was not reduced and the best loss did not improve there.
                window = k + 1 - last_check
                cond1 = increases < APGD_RHO * window
                cond2 = (eta_at_check == eta) & (best_at_check == best_loss)
                halve = cond1 | cond2
                eta = torch.where(halve, eta / 2, eta)
                # Restart the halved samples from their best point (a new gradient is needed there).
                if halve.any():
                    x_cur = torch.where(halve.view(view), x_best, x_cur)
                    x_prev = x_cur
                    l_best, g_best, _ = _gradient(model, x_cur, y, loss_fn)
                    grad = torch.where(halve.view(view), g_best, grad)
                    prev_loss = torch.where(halve, l_best, prev_loss)
                increases.zero_()
                last_check, eta_at_check, best_at_check = k + 1, eta.clone(), best_loss.clone()
    return torch.where(fooled.view(view), x_fooled, x_best)


def _check_classes(method: str, logits: torch.Tensor) -> None:
    if method == "apgd-dlr" and logits.shape[1] < 3:
        raise DubokoError(f"apgd-dlr needs a model with >= 3 classes (its loss divides by z_π1 − z_π3), got {logits.shape[1]}")


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, batch_index: int = 0) -> torch.Tensor:
    """Adversarial images for one batch x (B, C, H, W) in [0, 1] with labels y (B,): within the
    eps-ball and [0, 1], deterministic under (cfg.seed, batch_index). With restarts, a sample's
    image is the first restart's that fooled the model (else the last restart's)."""
    cfg.check()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DubokoError(f"attack inputs must be pixel images in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
    loss_fn = _loss_for(cfg.method)
    if x.shape[0] == 0:
        return x.clone()
    if cfg.method == "fgsm":
        return fgsm(model, x, y, cfg.eps, cfg.norm)
    best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if cfg.method in ("apgd-ce", "apgd-dlr"):
        with torch.no_grad():
            _check_classes(cfg.method, model(x[:1]))
    for restart in range(cfg.restarts):
        # Each restart attacks only the samples no earlier restart has fooled (the result is the
        # same as attacking all: a fooled sample keeps its first adversarial image).
        todo = (~fooled).nonzero().squeeze(1)
        gen = generator(cfg.seed, batch_index, restart, device=x.device)
        run = apgd if cfg.method in ("apgd-ce", "apgd-dlr") else pgd
        x_adv = run(model, x[todo], y[todo], cfg, gen, loss_fn)
        with torch.no_grad():
            wrong = model(x_adv).argmax(1) != y[todo]
            # The last restart's image stands for the samples that no restart fooled.
            keep = torch.ones_like(wrong) if restart == cfg.restarts - 1 else wrong
            best[todo[keep]] = x_adv[keep]
            fooled[todo[wrong]] = True
        if bool(fooled.all()):
            break
    return best
