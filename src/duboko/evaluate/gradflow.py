"""How far back a recurrent network's gradient reaches (vanishing gradients, measured).

For windows of T tokens, take the loss at the last step only, L_T, and measure
‖∂L_T / ∂x_t‖, the gradient with respect to the input embedding of every earlier step t. A plain
RNN multiplies by the same recurrent Jacobian at each step back, so its curve falls off
geometrically with the distance k = T-1-t; an LSTM's or GRU's additive cell path keeps it up far
longer (Bengio et al. 1994; Hochreiter & Schmidhuber 1997).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duboko.errors import DubokoError


def random_windows(ids: torch.Tensor, steps: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` windows of `steps` consecutive tokens of `ids` (N,) and their next-token targets,
    both (batch, steps), drawn with `seed`."""
    if steps < 2 or batch < 1:
        raise DubokoError(f"steps must be >= 2 and batch >= 1, got {steps} and {batch}")
    if len(ids) < steps + 2:
        raise DubokoError(f"the text has {len(ids)} tokens, too few for windows of steps={steps}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - steps - 1, (batch,), generator=g)  # (B,)
    index = starts[:, None] + torch.arange(steps)  # (B, T)
    return ids[index], ids[index + 1]


def gradient_flow(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Mean over the batch of ‖∂ loss(last step) / ∂ embedding(step t)‖ for t = 0..T-1.

    x, y: (B, T) token ids and next-token targets. Needs `model.embedding` and
    `model.forward_embeddings` (the rnn family). Returns a list of T floats, index t."""
    if not hasattr(model, "forward_embeddings"):
        raise DubokoError(
            f"gradflow needs a recurrent language model (the rnn family); got {type(model).__name__}"
        )
    was_training = model.training
    model.eval()  # no dropout; autograd still works
    try:
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):  # cuDNN RNN backward needs train mode
            emb = model.embedding(x).detach().requires_grad_(True)  # (B, T, E)
            logits, _ = model.forward_embeddings(emb)  # (B, T, V)
            loss = F.cross_entropy(logits[:, -1].float(), y[:, -1])  # loss at the last step only
            (grad,) = torch.autograd.grad(loss, emb)  # (B, T, E)
    finally:
        model.train(was_training)
    return grad.norm(dim=-1).mean(0).tolist()  # (T,)


def gradient_by_distance(model: nn.Module, ids: torch.Tensor, steps: int, batch: int, seed: int = 0) -> list[float]:
    """`gradient_flow` on `batch` random windows of `ids` (N,), indexed by the distance from the
    loss: entry k is the mean ‖∂L_T / ∂x_(T-1-k)‖, k = 0..steps-1."""
    x, y = random_windows(ids, steps, batch, seed)
    device = next(model.parameters()).device
    return list(reversed(gradient_flow(model, x.to(device), y.to(device))))


def plot_gradient_flow(curves: dict[str, list[float]], path: str | Path) -> None:
    """One line per model (label -> values by distance k), on a log scale."""
    from duboko.evaluate.plots import figure

    with figure(path, size=(7, 4.2)) as (fig, axes):
        ax = axes[0][0]
        for label, values in curves.items():
            ax.semilogy(range(len(values)), [max(v, 1e-30) for v in values], label=label)  # log of 0 is -inf
        ax.set_xlabel("steps back from the loss, k = T-1-t")
        ax.set_ylabel("mean ‖∂L_T / ∂x_t‖ (log scale)")
        ax.set_title("Gradient of the last step's loss w.r.t. earlier inputs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
