"""A torchinfo-style model inspector that shows the primer's parameter arithmetic.

For every layer (module) it gives its name, type, output shape, its own parameter count with the
formula that produces it, whether those parameters are trainable, and its multiply-accumulates
(mult-adds) for one example; then the totals and the memory of the parameters and of the
activations of one forward pass.

    conv1  Conv2d  (B, 32, 48, 48)  (3·3·3+1)·32 = 896        yes  1,990,656
    fc1    Linear  (B, 512)         (18432+1)·512 = 9,437,696  yes  9,437,184

How it is measured:
- Output shapes come from forward hooks. The model runs twice, with batch 1 and batch 2; a
  dimension that doubles is the batch dimension and is shown as B (2·B, ... if it is a multiple).
- Parameters are counted once per tensor: a weight tied between two layers (a language model's
  embedding and output layer) is counted at its first layer and marked "shared" at the other.
  Parameters of layers that the forward pass never calls are still counted (marked "not called").
- Mult-adds come from `torch.utils.flop_counter` (matmuls, convolutions, attention: FLOPs / 2) in
  the layer itself (its children's are shown on their own rows), and from the formula
  T·gates·(in·H + H·H) per layer and direction for nn.RNN/LSTM/GRU, which the counter does not
  see. Bias additions and elementwise operations are not counted. Numbers are for one example.
- Activation memory is the sum of the output tensors of the leaf layers for one example (what
  backpropagation keeps, roughly); the parameter memory is that of the unique parameter tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duboko.errors import DubokoError


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Parameter formulas: one string per layer whose left side, evaluated, equals its count.


def _prod(dims: Sequence[int]) -> str:
    return "·".join(str(d) for d in dims)


def _generic_formula(params: list[tuple[str, torch.Tensor]]) -> str:
    terms = [_prod(p.shape) if p.dim() else "1" for _, p in params]
    total = sum(p.numel() for _, p in params)
    if len(terms) == 1 and "·" not in terms[0]:
        return fmt_int(total)
    return f"{' + '.join(terms)} = {fmt_int(total)}"


def _rnn_formula(m: nn.RNNBase, total: int) -> str | None:
    if getattr(m, "proj_size", 0):
        return None
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    dirs = 2 if m.bidirectional else 1
    terms = []
    for layer in range(m.num_layers):
        width = m.input_size if layer == 0 else m.hidden_size * dirs
        h = m.hidden_size
        inner = f"{width}·{h}+{h}·{h}" + (f"+2·{h}" if m.bias else "")
        terms.append(f"{dirs}·{gates}·({inner})" if dirs > 1 else f"{gates}·({inner})")
    return f"{' + '.join(terms)} = {fmt_int(total)}"


def param_formula(module: nn.Module, params: list[tuple[str, torch.Tensor]]) -> str:
    """A formula for the parameters registered directly on `module` (the primer's arithmetic)."""
    if not params:
        return ""
    total = sum(p.numel() for _, p in params)
    names = {n for n, _ in params}
    has_bias = "bias" in names
    if isinstance(module, nn.Linear) and names <= {"weight", "bias"}:
        inner = f"({module.in_features}+1)" if has_bias else f"{module.in_features}"
        return f"{inner}·{module.out_features} = {fmt_int(total)}"
    if isinstance(module, nn.modules.conv._ConvNd) and names <= {"weight", "bias"}:
        # Conv: weight (out, in/groups, k...); transposed conv: (in, out/groups, k...). Either
        # way the count is (k·k·fan_in + 1)·out_channels, the primer's formula.
        fan_in = module.in_channels // module.groups
        if module.transposed:
            fan_in = module.out_channels // module.groups
            outs = module.in_channels
            inner = f"{_prod(module.kernel_size)}·{fan_in}"
            return f"{inner}·{outs}" + (f" + {module.out_channels}" if has_bias else "") + f" = {fmt_int(total)}"
        inner = f"{_prod(module.kernel_size)}·{fan_in}"
        inner = f"({inner}+1)" if has_bias else inner
        return f"{inner}·{module.out_channels} = {fmt_int(total)}"
    if isinstance(module, nn.Embedding) and names == {"weight"}:
        return f"{module.num_embeddings}·{module.embedding_dim} = {fmt_int(total)}"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) and names <= {"weight", "bias"}:
        width = params[0][1].numel()
        return f"{len(params)}·{width} = {fmt_int(total)}" if len(params) > 1 else fmt_int(total)
    if isinstance(module, nn.RNNBase):
        formula = _rnn_formula(module, total)
        if formula:
            return formula
    if isinstance(module, nn.MultiheadAttention) and names == {"in_proj_weight", "in_proj_bias"}:
        e = module.embed_dim
        return f"3·{e}·{e} + 3·{e} = {fmt_int(total)}"
    return _generic_formula(params)


# ---------------------------------------------------------------------------------------------
# The summary.


@dataclass
class LayerRow:
    name: str  # qualified module name ("hidden.fc1"); the model's class name for the root
    type: str  # module class name
    depth: int  # 0 for the model itself
    output_shape: str  # "(B, 32, 48, 48)"; "" if not called
    params: int  # parameters registered directly on this layer, counted once model-wide
    formula: str  # "(3·3·3+1)·32 = 896"
    trainable: str  # yes | no | partial | "" (no parameters of its own)
    mult_adds: int  # multiply-accumulates for one example in this layer itself
    calls: int  # forward calls in one pass (0: never called)
    note: str = ""  # "shared with X" for tied weights, "not called"


@dataclass
class ModelSummary:
    model: str  # registry name (or class name)
    input_shapes: list[str]  # one per input, with B for the batch
    rows: list[LayerRow]
    total_params: int  # unique parameter tensors (a tied weight once)
    trainable_params: int
    params_counting_shared: int  # a tied weight counted at every layer using it (torchinfo's total)
    mult_adds: int  # per example (0 when the forward pass was not run)
    param_bytes: int
    buffer_bytes: int
    activation_bytes: int  # outputs of leaf layers for one example (0 if no forward pass)
    input_bytes: int  # one example's input
    forward_ran: bool
    notes: list[str] = field(default_factory=list)

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = d.pop("rows")
        d["non_trainable_params"] = self.non_trainable_params
        return d

    def _folded(self, row: LayerRow) -> LayerRow:
        """A row at the display depth limit, with its hidden sublayers' parameters and mult-adds."""
        if row.depth == 0:
            return row
        below = [r for r in self.rows if r.name.startswith(row.name + ".")]
        if not below:
            return row
        params = row.params + sum(r.params for r in below)
        formula = f"{fmt_int(params)} (with {len(below)} sublayer{'s' if len(below) > 1 else ''})" if params else row.formula
        return dataclasses.replace(row, params=params, formula=formula,
                                   mult_adds=row.mult_adds + sum(r.mult_adds for r in below),
                                   note="" if params else row.note)

    def format_table(self, max_depth: int | None = None) -> str:
        header = ("Layer", "Type", "Output shape", "Param # (formula)", "Train", "Mult-adds")
        lines = []
        for r in self.rows:
            if max_depth is not None and r.depth > max_depth:
                continue
            if max_depth is not None and r.depth == max_depth:
                r = self._folded(r)
            name = ("  " * r.depth + r.name) if r.depth else r.name
            shape = r.output_shape or "--"
            if shape.startswith("(("):  # a tuple of outputs: the first one (all in --json)
                shape = shape[1 : shape.index(")") + 1] + ", …"
            if r.calls > 1:
                shape += f" ×{r.calls}"
            params = r.formula or "--"
            if r.note:
                params = f"[{r.note}]" if params == "--" else f"{params}  [{r.note}]"
            lines.append((name, r.type, shape, params, r.trainable or "--", fmt_int(r.mult_adds) if r.mult_adds else "--"))
        widths = [max(len(header[i]), *(len(l[i]) for l in lines)) for i in range(len(header))]
        widths = [min(w, 60) for w in widths]

        def row(cells):
            out = []
            for i, c in enumerate(cells):
                c = c if len(c) <= widths[i] else c[: widths[i] - 1] + "…"
                out.append(c.rjust(widths[i]) if i == 5 else c.ljust(widths[i]))
            return "  ".join(out).rstrip()

        rule = "=" * len(row(header))
        text = [rule, f"{self.model}   input: {', '.join(self.input_shapes) or '--'}", rule, row(header), "-" * len(rule)]
        text += [row(l) for l in lines]
        text.append(rule)
        text.append(f"Total params:         {fmt_int(self.total_params)}")
        text.append(f"Trainable params:     {fmt_int(self.trainable_params)}")
        text.append(f"Non-trainable params: {fmt_int(self.non_trainable_params)}")
        if self.params_counting_shared != self.total_params:
            text.append(
                f"(shared weights counted once; counting them at every layer, as torchinfo does: "
                f"{fmt_int(self.params_counting_shared)})"
            )
        if self.forward_ran:
            text.append(f"Mult-adds per example: {fmt_int(self.mult_adds)} ({self.mult_adds / 1e6:.2f} M)")
        text.append(rule)
        text.append(f"Params size:          {fmt_bytes(self.param_bytes)}" + (f" (+ buffers {fmt_bytes(self.buffer_bytes)})" if self.buffer_bytes else ""))
        if self.forward_ran:
            text.append(f"Input size / example: {fmt_bytes(self.input_bytes)}")
            text.append(f"Activations / example (one forward pass): {fmt_bytes(self.activation_bytes)}")
        text.extend(self.notes)
        text.append(rule)
        return "\n".join(text)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "data") and isinstance(getattr(obj, "data"), torch.Tensor):  # PackedSequence
        return [obj.data]
    return []


def _shapes(obj: Any) -> Any:
    """Nested structure of shapes (lists of ints) mirroring the output."""
    if isinstance(obj, torch.Tensor):
        return list(obj.shape)
    if isinstance(obj, (list, tuple)):
        inner = [_shapes(o) for o in obj]
        return [s for s in inner if s is not None] or None
    if isinstance(obj, dict):
        inner = [_shapes(o) for o in obj.values()]
        return [s for s in inner if s is not None] or None
    if hasattr(obj, "data") and isinstance(getattr(obj, "data"), torch.Tensor):
        return list(obj.data.shape)
    return None


def _symbolic(s1: Any, s2: Any) -> str:
    """Shapes from the batch-1 and batch-2 runs -> "(B, 32, 48, 48)"."""
    if s1 is None:
        return ""
    if s1 and isinstance(s1[0], list):  # a nested structure
        s2 = s2 if isinstance(s2, list) and len(s2) == len(s1) else [None] * len(s1)
        parts = [_symbolic(a, b) for a, b in zip(s1, s2)]
        return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"
    dims = []
    for i, d1 in enumerate(s1):
        d2 = s2[i] if isinstance(s2, list) and i < len(s2) and not isinstance(s2[i], list) else None
        if d2 is not None and d2 != d1 and d2 == 2 * d1:
            dims.append("B" if d1 == 1 else f"{d1}·B")
        else:
            dims.append(str(d1))
    return "(" + ", ".join(dims) + ")"


def _rnn_mult_adds(module: nn.RNNBase, args: tuple) -> int:
    x = args[0] if args else None
    if x is None:
        return 0
    if hasattr(x, "batch_sizes"):  # PackedSequence: all time steps of all sequences
        steps = int(x.data.shape[0])
    elif x.dim() == 2:  # unbatched (T, in)
        steps = int(x.shape[0])
    else:
        steps = int(x.shape[0] * x.shape[1])  # (B, T) or (T, B): batch 1 here
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    dirs = 2 if module.bidirectional else 1
    h = module.hidden_size
    total = 0
    for layer in range(module.num_layers):
        width = module.input_size if layer == 0 else h * dirs
        total += dirs * steps * gates * (width * h + h * h)
    return total


class _Recorder:
    """Forward hooks that record call order, calls, output shapes and leaf output sizes."""

    def __init__(self, model: nn.Module):
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self.shapes: dict[str, Any] = {}
        self.out_bytes: dict[str, int] = {}
        self.rnn_mult_adds: dict[str, int] = {}
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(module.register_forward_hook(self._hook(name, module)))

    def _pre_hook(self, name: str):
        def hook(mod, args):
            if name not in self.calls:  # rows in the order layers are entered (parents first)
                self.order.append(name)
                self.calls[name] = 0

        return hook

    def _hook(self, name: str, module: nn.Module):
        def hook(mod, args, output):
            if name not in self.shapes:
                self.shapes[name] = _shapes(output)
            self.calls[name] += 1
            self.out_bytes[name] = self.out_bytes.get(name, 0) + sum(t.numel() * t.element_size() for t in _tensors(output))
            if isinstance(mod, nn.RNNBase):
                self.rnn_mult_adds[name] = self.rnn_mult_adds.get(name, 0) + _rnn_mult_adds(mod, args)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _extra_flop_formulas() -> dict:
    """Ops torch's flop counter does not know in this build: the CPU fused attention kernel
    (F.scaled_dot_product_attention on CPU) gets the same formula as the CUDA ones."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: sdpa} if op is not None else {}


def _run(model: nn.Module, inputs: tuple, count_flops: bool) -> tuple[_Recorder, dict[str, int]]:
    recorder = _Recorder(model)
    flops: dict[str, int] = {}
    try:
        with torch.no_grad():
            if count_flops:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False, depth=None, custom_mapping=_extra_flop_formulas()) as counter:
                    model(*inputs)
                prefix = type(model).__name__
                for key, ops in counter.get_flop_counts().items():
                    if key == "Global":
                        continue
                    name = key[len(prefix) + 1 :] if key.startswith(prefix + ".") else ("" if key == prefix else None)
                    if name is not None:
                        flops[name] = flops.get(name, 0) + int(sum(ops.values()))
            else:
                model(*inputs)
    except DubokoError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in _tensors(inputs))
        raise DubokoError(
            f"{type(model).__name__} cannot run on input shape(s) {shapes}: {str(exc).splitlines()[0]}; "
            "give a matching input shape (without the batch dimension) or change the model's config"
        ) from None
    finally:
        recorder.remove()
    return recorder, flops


def _calls(rec: _Recorder | None) -> dict[str, int]:
    return rec.calls if rec else {}


def _own_flops(flops: dict[str, int]) -> dict[str, int]:
    """Per-module FLOPs including children -> FLOPs done in the module itself. A module's flops
    are subtracted from its nearest ancestor that has a count (a ModuleList in between has none)."""
    own = dict(flops)
    for key, value in flops.items():
        if not key:
            continue
        parts = key.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            parent = ".".join(parts[:cut])
            if parent in flops:
                own[parent] -= value
                break
    return {k: max(0, v) for k, v in own.items()}


def summarize(
    model: nn.Module,
    inputs_b1: tuple | None,
    inputs_b2: tuple | None = None,
    name: str | None = None,
) -> ModelSummary:
    """Summarise `model`. `inputs_b1` / `inputs_b2` are the same example input with batch sizes 1
    and 2 (the second only tells the batch dimension apart); None skips the forward pass."""
    model.eval()
    named = dict(model.named_modules())
    root_name = type(model).__name__
    rec1 = rec2 = None
    flops: dict[str, int] = {}
    if inputs_b1 is not None:
        rec1, flops = _run(model, inputs_b1, count_flops=True)
        if inputs_b2 is not None:
            rec2, _ = _run(model, inputs_b2, count_flops=False)

    called = rec1.order if rec1 else []
    order = list(called)
    for qual in named:  # layers the forward pass never entered: before their first called child
        if qual in _calls(rec1):
            continue
        at = next((i for i, q in enumerate(order) if q.startswith(qual + ".")), None)
        order.insert(at if at is not None else len(order), qual)
    own_flops = _own_flops(flops)
    seen: dict[int, str] = {}  # id(parameter) -> the layer it was counted at
    rows: list[LayerRow] = []
    for qual in order:
        module = named[qual]
        own = list(module.named_parameters(recurse=False))
        fresh = [(n, p) for n, p in own if id(p) not in seen]
        shared = [(n, p) for n, p in own if id(p) in seen]
        for _, p in fresh:
            seen[id(p)] = qual or root_name
        count = sum(p.numel() for _, p in fresh)
        trainable = ""
        if fresh:
            flags = {p.requires_grad for _, p in fresh}
            trainable = "yes" if flags == {True} else "no" if flags == {False} else "partial"
        notes = []
        if shared:
            owners = ", ".join(sorted({seen[id(p)] for _, p in shared}))
            notes.append(f"{param_formula(module, shared)} shared with {owners}, counted there")
        calls = rec1.calls.get(qual, 0) if rec1 else 0
        if rec1 and not calls:
            notes.append("not called")
        mult_adds = 0
        if rec1 and calls:
            mult_adds = own_flops.get(qual, 0) // 2
            if mult_adds == 0 and qual in rec1.rnn_mult_adds:
                mult_adds = rec1.rnn_mult_adds[qual]
        shape = ""
        if rec1 and calls:
            shape = _symbolic(rec1.shapes.get(qual), rec2.shapes.get(qual) if rec2 else None)
        rows.append(
            LayerRow(
                name=qual or root_name,
                type=type(module).__name__,
                depth=0 if not qual else qual.count(".") + 1,
                output_shape=shape,
                params=count,
                formula=param_formula(module, fresh),
                trainable=trainable,
                mult_adds=mult_adds,
                calls=calls,
                note="; ".join(notes),
            )
        )

    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    if sum(r.params for r in rows) != total:  # every parameter belongs to exactly one module
        raise RuntimeError("summary rows do not add up to the model's parameter count")
    leaf = {q for q, m in named.items() if not any(True for _ in m.children())}
    activation_bytes = sum(b for q, b in (rec1.out_bytes.items() if rec1 else []) if q in leaf and q)
    notes = []
    if inputs_b1 is None:
        notes.append("(no forward pass: parameter counts only)")
    return ModelSummary(
        model=name or root_name,
        input_shapes=[_symbolic(list(t.shape), list(t2.shape) if t2 is not None else None)
                      for t, t2 in zip(_tensors(inputs_b1), _tensors(inputs_b2) if inputs_b2 is not None else [None] * len(_tensors(inputs_b1)))]
        if inputs_b1 is not None else [],
        rows=rows,
        total_params=total,
        trainable_params=trainable,
        params_counting_shared=sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)),
        mult_adds=sum(r.mult_adds for r in rows),
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        activation_bytes=activation_bytes,
        input_bytes=sum(t.numel() * t.element_size() for t in _tensors(inputs_b1)) if inputs_b1 is not None else 0,
        forward_ran=inputs_b1 is not None,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# Registered models and input specs.


def parse_input_shape(text: str) -> list[int]:
    """ "3,48,48" -> [3, 48, 48] (no batch dimension)."""
    parts = [p for p in text.replace("x", ",").replace("×", ",").split(",") if p.strip()]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise DubokoError(f"input shape expects comma-separated sizes without the batch, like 3,48,48; got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise DubokoError(f"input shape expects positive sizes like 3,48,48; got {text!r}")
    return dims


def _like(example: Any, shape: list[int], batch: int, gen: torch.Generator) -> torch.Tensor:
    """A random input of (batch, *shape) with the example's dtype and value range."""
    full = (batch, *shape)
    if isinstance(example, torch.Tensor) and not example.is_floating_point():
        if example.dtype == torch.bool:
            return torch.zeros(full, dtype=torch.bool)
        high = max(2, int(example.max()) + 1) if example.numel() else 2
        return torch.randint(0, high, full, generator=gen, dtype=example.dtype)
    dtype = example.dtype if isinstance(example, torch.Tensor) else torch.float32
    return torch.randn(full, generator=gen).to(dtype)


def make_inputs(name: str, model: nn.Module, input_shapes: list[list[int]] | None, batch: int) -> tuple:
    """The example input of a registered model at `batch`, with the first inputs replaced by
    random tensors of `input_shapes` (keeping the example's dtype and value range)."""
    from duboko import registry

    spec = registry.get_spec(name)
    example: tuple = ()
    if spec.example_input is not None:
        torch.manual_seed(0)
        example = tuple(spec.example_input(model.config, batch))
    elif not input_shapes:
        raise DubokoError(f"model {name!r} has no default input; give an input shape like 3,48,48")
    if not input_shapes:
        return example
    if len(input_shapes) > max(1, len(example)):
        raise DubokoError(f"model {name!r} takes {len(example)} input(s), got {len(input_shapes)} input shapes")
    gen = torch.Generator().manual_seed(0)
    out = list(example) if example else [None]
    for i, shape in enumerate(input_shapes):
        out[i] = _like(example[i] if i < len(example) else None, shape, batch, gen)
    return tuple(out)


def summarize_registered(
    name: str,
    input_shapes: list[list[int]] | None = None,
    overrides: dict[str, Any] | None = None,
    forward: bool = True,
) -> ModelSummary:
    """Summary of a registered model with its default input (or `input_shapes`)."""
    from duboko import registry

    if not forward:  # parameter shapes only: build on the meta device (no memory, no init time)
        with torch.device("meta"):
            model = registry.create_model(name, **(overrides or {}))
        return summarize(model, None, name=name)
    model = registry.create_model(name, **(overrides or {}))
    b1 = make_inputs(name, model, input_shapes, 1)
    b2 = make_inputs(name, model, input_shapes, 2)
    return summarize(model, b1, b2, name=name)


__all__ = [
    "LayerRow",
    "ModelSummary",
    "summarize",
    "summarize_registered",
    "param_formula",
    "parse_input_shape",
    "make_inputs",
]
