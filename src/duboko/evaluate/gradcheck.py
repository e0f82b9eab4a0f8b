"""Backpropagation checked against finite differences, one parameter tensor at a time.

`check_model` runs `torch.autograd.gradcheck` on a float64 copy of a model in eval mode (dropout
off, so the function is deterministic). For each parameter tensor W it checks the function
v ↦ output(W with the chosen entries replaced by v): autograd's gradient against central finite
differences (f(v + ε) - f(v - ε)) / 2ε, ε = 1e-6.

Honest scope, reported per row:
- A tensor with at most `max_entries` entries is checked entry by entry, all of them. A larger one
  (MY_NET's fc1 has 9.4 M) is checked on a seeded sample of `max_entries` entries: half drawn
  among the entries whose gradient is non-zero for this input, half uniformly (an unused
  embedding row has a zero gradient both ways and would pass trivially).
- When the output has more than `max_outputs` numbers, it is reduced to the scalar ⟨R, y⟩ with
  a fixed random R, so each check needs one backward pass; the check is then of the gradient of
  that projection (a random linear combination of all outputs), which any error in the Jacobian
  almost surely shows up in.
- ReLU kinks and max-pool ties are not differentiable; an entry sitting exactly on one (not
  expected with random float64 input) could fail.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call


@dataclass
class GradcheckRow:
    tensor: str  # parameter name, or "input[0]"
    shape: list[int]
    entries: int  # entries in the tensor
    checked: int  # entries checked
    sampled: bool  # True when `checked` < `entries`
    passed: bool
    max_abs_error: float | None  # on failure: max |autograd - finite difference| (NaN: passed, not measured)
    seconds: float
    note: str = ""


@dataclass
class GradcheckReport:
    model: str
    input_shapes: list[list[int]]
    output_projection: bool  # output reduced to ⟨R, y⟩ with a fixed random R
    rows: list[GradcheckRow]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shapes": self.input_shapes,
            "output_projection": self.output_projection,
            "passed": self.passed,
            "rows": [asdict(r) for r in self.rows],
        }

    def format_table(self) -> str:
        head = ("tensor", "shape", "checked", "seconds", "result")
        lines = []
        for r in self.rows:
            checked = f"{r.checked:,} of {r.entries:,} (sampled)" if r.sampled else f"all {r.entries:,}"
            result = "pass" if r.passed else "FAIL"
            if r.note:
                result += f" ({r.note})"
            lines.append((r.tensor, "×".join(map(str, r.shape)) or "scalar", checked, f"{r.seconds:.2f}", result))
        widths = [max(len(head[i]), *(len(l[i]) for l in lines)) if lines else len(head[i]) for i in range(5)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [
            f"gradcheck {self.model}: float64, eval mode, input "
            + ", ".join("×".join(map(str, s)) for s in self.input_shapes)
            + ("; output reduced to a fixed random projection ⟨R, y⟩" if self.output_projection else "; full Jacobian"),
            fmt(head),
            fmt(tuple("-" * w for w in widths)),
        ]
        out += [fmt(l) for l in lines]
        n_fail = sum(not r.passed for r in self.rows)
        out.append(f"{'PASSED' if not n_fail else 'FAILED'}: {len(self.rows) - n_fail} of {len(self.rows)} tensors")
        return "\n".join(out)


def _outputs(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _outputs(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _outputs(o)]
    return []


def _choose(numel: int, grad: torch.Tensor | None, k: int, gen: torch.Generator) -> torch.Tensor:
    """Entry indices to check: all, or k sampled (half among non-zero gradient entries)."""
    if numel <= k:
        return torch.arange(numel)
    picked: list[int] = []
    if grad is not None:
        nonzero = torch.nonzero(grad.reshape(-1) != 0).reshape(-1)
        if len(nonzero):
            take = min(k // 2, len(nonzero))
            picked = nonzero[torch.randperm(len(nonzero), generator=gen)[:take]].tolist()
    rest = torch.randperm(numel, generator=gen)
    chosen = set(picked)
    for i in rest.tolist():
        if len(chosen) >= k:
            break
        chosen.add(i)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _max_error(f, v0: torch.Tensor, eps: float = 1e-6) -> float:
    """max |analytical - numerical| of the Jacobian of f at v0 (central differences)."""
    from torch.autograd.functional import jacobian

    with torch.no_grad():
        cols = []
        for j in range(len(v0)):
            e = torch.zeros_like(v0)
            e[j] = eps
            cols.append(((f(v0 + e) - f(v0 - e)) / (2 * eps)).reshape(-1))
        numeric = torch.stack(cols, dim=-1)
    analytic = jacobian(f, v0).reshape(numeric.shape)
    return float((analytic - numeric).abs().max()) if numeric.numel() else 0.0


def check_model(
    model: nn.Module,
    inputs: tuple,
    name: str = "model",
    max_entries: int = 16,
    max_outputs: int = 16,
    seed: int = 0,
    check_input: bool = True,
    progress: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-3,
) -> GradcheckReport:
    """Gradcheck every parameter tensor (and floating inputs) of a float64 copy of `model`."""
    model = copy.deepcopy(model).double().eval()
    inputs = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(seed)

    with torch.no_grad():
        probe = _outputs(model(*inputs))
    if not probe:
        raise ValueError(f"{name} returns no floating-point tensor to differentiate")
    n_out = sum(t.numel() for t in probe)
    project = n_out > max_outputs
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in probe] if project else None

    def reduce(out: Any) -> torch.Tensor:
        tensors = _outputs(out)
        if weights is None:
            return torch.cat([t.reshape(-1) for t in tensors])
        return sum((t * w).sum() for t, w in zip(tensors, weights))  # ⟨R, y⟩

    # One backward pass gives every gradient, used only to pick informative sample entries.
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    float_inputs = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    x_leaves = {i: inputs[i].clone().requires_grad_(True) for i in float_inputs}
    full_in = tuple(x_leaves.get(i, t) for i, t in enumerate(inputs))
    scalar = reduce(functional_call(model, {**leaves, **buffers}, full_in))
    scalar = scalar.sum() if scalar.dim() else scalar
    targets = list(leaves.values()) + list(x_leaves.values())
    grads = torch.autograd.grad(scalar, targets, allow_unused=True)
    grad_of = dict(zip(list(leaves) + [f"input[{i}]" for i in x_leaves], grads))

    rows: list[GradcheckRow] = []

    def check(label: str, base: torch.Tensor, call) -> None:
        idx = _choose(base.numel(), grad_of.get(label), max_entries, gen)
        start = time.perf_counter()

        def f(v: torch.Tensor) -> torch.Tensor:
            full = base.reshape(-1).clone().index_put((idx,), v).reshape(base.shape)
            return reduce(call(full))

        v0 = base.reshape(-1)[idx].clone().requires_grad_(True)
        note = ""
        error = None  # measured only on failure (it costs as much as the check itself)
        try:
            passed = torch.autograd.gradcheck(f, (v0,), eps=1e-6, atol=atol, rtol=rtol, raise_exception=True)
        except GradcheckError:
            passed = False
            error = _max_error(f, v0.detach())
            note = f"max |autograd - finite difference| = {error:.2e}"
        rows.append(
            GradcheckRow(
                tensor=label,
                shape=list(base.shape),
                entries=base.numel(),
                checked=len(idx),
                sampled=len(idx) < base.numel(),
                passed=bool(passed),
                max_abs_error=error,
                seconds=time.perf_counter() - start,
                note=note,
            )
        )

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(params) + (len(float_inputs) if check_input else 0), desc="gradcheck", leave=False)
    for pname, p in params.items():
        if bar is not None:
            bar.update(1)
        check(pname, p, lambda full, pname=pname: functional_call(model, {**params, pname: full, **buffers}, inputs))
    if check_input:
        for i in float_inputs:

            def call(full, i=i):
                xs = list(inputs)
                xs[i] = full
                return functional_call(model, {**params, **buffers}, tuple(xs))

            if bar is not None:
                bar.update(1)
            check(f"input[{i}]", inputs[i], call)
    if bar is not None:
        bar.close()
    return GradcheckReport(
        model=name,
        input_shapes=[list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
        output_projection=project,
        rows=rows,
    )
