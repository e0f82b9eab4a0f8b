"""Neural-network basics made visible: summary, activations, compare, gradcheck."""

from __future__ import annotations

import argparse
import json
from typing import Any

from duboko.errors import DubokoError


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "summary",
        help="per-layer table of a model: output shapes, parameter formulas, mult-adds",
        description="A torchinfo-style table of any registered model: per layer its name, type, output "
        "shape, parameter count with the formula that gives it ((3·3·3+1)·32 = 896), trainable flag and "
        "mult-adds per example; then totals and the memory of the parameters and of one forward pass.",
        epilog="examples:\n  duboko summary my_net --input-shape 3,48,48\n  duboko summary my_net --input-shape 3,48,48 --json\n"
        "  duboko summary gpt-tiny\n  duboko summary my_net --set image_size=64 --input-shape 3,64,64",
        formatter_class=raw,
    )
    p.add_argument("model", help="a registered model (see `duboko models`)")
    p.add_argument("--input-shape", action="append", default=[], metavar="DIMS",
                   help="input size without the batch, e.g. 3,48,48 (default: the model's example input; at most "
                   f"{MAX_INPUT_VALUES:,} values); repeat for models with several inputs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model config field, e.g. image_size=64 or hidden_sizes=[256,128]")
    p.add_argument("--depth", type=int, default=None, metavar="N",
                   help="show layers down to nesting depth N (0: the top-level blocks; default: all)")
    p.add_argument("--no-forward", action="store_true", help="count parameters only (no forward pass)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "activations",
        help="plot activation functions and their derivatives",
        description="Plot sigmoid, tanh, ReLU, leaky ReLU, GELU, SiLU (and softmax of [x, 0]) with their "
        "derivatives, computed by the hand-written formulas in duboko.nn.activations.",
        epilog="example:\n  duboko activations --out act.png",
        formatter_class=raw,
    )
    p.add_argument("--out", default="activations.png", metavar="PNG", help="PNG file to write (default activations.png)")
    p.add_argument("--names", default="", metavar="LIST", help="comma-separated subset of sigmoid, tanh, relu, leaky_relu, "
                   "gelu, silu, softmax (default all)")
    p.add_argument("--range", dest="x_range", type=float, default=5.0, metavar="R",
                   help=f"plot x from -R to R, 0 < R <= {MAX_RANGE:g} (default 5)")
    p.set_defaults(func=cmd_activations)

    p = sub.add_parser(
        "compare",
        help="plot the curves of several runs side by side",
        description="Loss and metric curves (train solid, validation dashed) of several run folders from "
        "their history.csv, plus a table of their final metrics.",
        epilog="examples:\n  duboko compare runs/mlp runs/cnn --out curves.png\n"
        "  for o in sgd adam adamw rmsprop; do duboko train digits --set optimizer=$o --out runs/opt-$o; done\n"
        "  duboko compare runs/opt-* --out optimizers.png",
        formatter_class=raw,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `duboko train`")
    p.add_argument("--out", default="compare.png", metavar="PNG", help="PNG file to write (default compare.png)")
    p.add_argument("--metrics", default="", metavar="LIST",
                   help="comma-separated metrics to plot, e.g. loss,accuracy (default: every metric the runs logged)")
    p.add_argument("--title", default="", help="figure title (default: none)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "gradcheck",
        help="check backpropagation against finite differences (float64)",
        description="Run torch.autograd.gradcheck on a float64 copy of a registered model (eval mode), one "
        "parameter tensor at a time, and report pass/fail per tensor. Large tensors are checked on a "
        "seeded sample of entries and a large output is reduced to a fixed random projection; the "
        "report says so.",
        epilog="examples:\n  duboko gradcheck my_net\n  duboko gradcheck my_net --set image_size=8   # a small copy, fast\n"
        "  duboko gradcheck mlp --max-entries 1000000   # every entry",
        formatter_class=raw,
    )
    p.add_argument("model", help="a registered model (see `duboko models`)")
    p.add_argument("--input-shape", action="append", default=[], metavar="DIMS",
                   help="input size without the batch, e.g. 3,8,8 (default: the model's example input); repeat for "
                   "models with several inputs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model config field, e.g. image_size=8 for a smaller MY_NET")
    p.add_argument("--batch-size", type=int, default=1, help=f"examples in the input (1-{MAX_GRADCHECK_BATCH}, default 1)")
    p.add_argument("--max-entries", type=int, default=16,
                   help="entries checked per tensor (>= 1); larger tensors are sampled (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input, the sample and the projection (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_gradcheck)


# Bounds of what `summary` / `gradcheck` build, so that a typo (`--input-shape 3,100000,100000`,
# `--set hidden_sizes=[100000000,64]`) is one line instead of a failure in the allocator.
MAX_INPUT_VALUES = 1 << 24  # values per example of one input: 3·2048·2048 fits
MAX_PARAMETERS = 1_000_000_000  # 4 GB in float32 (gpt2-small has 124 M)
MAX_GRADCHECK_BATCH = 64  # gradcheck is float64 and runs one backward pass per checked entry
MAX_RANGE = 1000.0  # activations --range


def _model_overrides(items: list[str]) -> dict[str, Any]:
    from duboko.config import parse_overrides

    out = {}
    for key, value in parse_overrides(items):
        out[key.split(".", 1)[1] if key.startswith("model.") else key] = value
    return out


def _check_model_config(name: str, overrides: dict[str, Any]) -> None:
    from duboko import registry

    registry.make_config(name, overrides)  # unknown fields fail with the list of valid ones
    check_model_set_types(name, overrides)
    check_model_size(name, overrides)


def _set_text(overrides: dict[str, Any]) -> str:
    return " ".join(f"--set {k}={v}" for k, v in overrides.items()) or "its default config"


def check_model_size(name: str, overrides: dict[str, Any]) -> None:
    """Build the model on the meta device (shapes only: no memory, no time) and refuse one that
    cannot be built or has more than MAX_PARAMETERS parameters, before the real build."""
    import torch

    from duboko import registry

    try:
        with torch.device("meta"):
            model = registry.create_model(name, **overrides)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        raise DubokoError(f"model {name!r} cannot be built with {_set_text(overrides)}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise DubokoError(f"model {name!r} with {_set_text(overrides)} has {count:,} parameters; at most "
                          f"{MAX_PARAMETERS:,} (check the sizes given with --set)")


def _input_shapes(texts: list[str]) -> list[list[int]] | None:
    """--input-shape values parsed and bounded (MAX_INPUT_VALUES per example)."""
    import math

    from duboko.evaluate.summary import parse_input_shape

    shapes = [parse_input_shape(s) for s in texts]
    for text, shape in zip(texts, shapes):
        if math.prod(shape) > MAX_INPUT_VALUES:
            raise DubokoError(f"--input-shape {text} is {math.prod(shape):,} values per example; at most "
                              f"{MAX_INPUT_VALUES:,} (e.g. 3,2048,2048)")
    return shapes or None


def check_model_set_types(name: str, overrides: dict[str, Any]) -> None:
    """`--set` values of a model config through config's type check (the one recipes get), so
    `--set image_size=abc` is one line naming model.image_size, not a TypeError deep in a layer."""
    from duboko import config as C
    from duboko import registry

    spec = registry.get_spec(name)
    C.build_dataclass(spec.config_cls, {**spec.defaults, **overrides}, "model")


def cmd_summary(args) -> int:
    from duboko.evaluate.summary import summarize_registered

    if args.depth is not None and args.depth < 0:
        raise DubokoError(f"--depth must be >= 0 (0: the top-level blocks), got {args.depth}")
    overrides = _model_overrides(args.overrides)
    _check_model_config(args.model, overrides)
    shapes = _input_shapes(args.input_shape)
    try:
        summary = summarize_registered(args.model, shapes, overrides, forward=not args.no_forward)
    except RuntimeError as exc:  # e.g. a negative size in --set: the example input cannot be made
        raise DubokoError(f"summary could not run {args.model!r} with {_set_text(overrides)}: "
                          f"{str(exc).splitlines()[0]}") from None
    if args.json:
        print(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(summary.format_table(args.depth))
    return 0


def cmd_activations(args) -> int:
    import torch

    from duboko.evaluate.activations import activation_values, plot_activations

    if not 0 < args.x_range <= MAX_RANGE:  # NaN fails every comparison
        raise DubokoError(f"--range must be in (0, {MAX_RANGE:g}], got {args.x_range}")
    names = [n.strip() for n in args.names.split(",") if n.strip()] or None
    shown = plot_activations(args.out, names, args.x_range)
    points = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    print(f"{'activation':<11} " + "  ".join(f"f({v:g})    f'({v:g})  " for v in points.tolist()))
    for name, (y, dy) in activation_values(shown, points).items():
        print(f"{name:<11} " + "  ".join(f"{a:+.4f}  {b:+.4f}  " for a, b in zip(y, dy)))
    print(f"wrote {args.out}")
    return 0


def cmd_compare(args) -> int:
    from duboko.evaluate.compare import load_run_curves, plot_compare, summary_table

    from duboko.evaluate.plots import check_png_output

    check_png_output(args.out)
    runs = [load_run_curves(r) for r in args.runs]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] or None
    plotted = plot_compare(runs, args.out, metrics, args.title)
    print(summary_table(runs))
    print(f"wrote {args.out} ({', '.join(plotted)})")
    return 0


def cmd_gradcheck(args) -> int:
    import torch

    from duboko import registry
    from duboko.evaluate.gradcheck import check_model
    from duboko.evaluate.summary import make_inputs

    if not 1 <= args.batch_size <= MAX_GRADCHECK_BATCH:
        raise DubokoError(f"--batch-size must be in 1..{MAX_GRADCHECK_BATCH}, got {args.batch_size}")
    if args.max_entries < 1:
        raise DubokoError(f"--max-entries must be >= 1, got {args.max_entries}")
    overrides = _model_overrides(args.overrides)
    _check_model_config(args.model, overrides)
    shapes = _input_shapes(args.input_shape)
    torch.manual_seed(args.seed)
    model = registry.create_model(args.model, **overrides)
    try:
        inputs = make_inputs(args.model, model, shapes, args.batch_size)
    except RuntimeError as exc:  # e.g. a negative size in --set
        raise DubokoError(f"gradcheck could not make an input for {args.model!r} with {_set_text(overrides)}: "
                          f"{str(exc).splitlines()[0]}") from None
    try:
        report = check_model(model, inputs, args.model, max_entries=args.max_entries, seed=args.seed,
                             progress=not args.json)
    except (RuntimeError, ValueError) as exc:
        raise DubokoError(f"gradcheck could not run {args.model!r}: {str(exc).splitlines()[0]}") from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return 0 if report.passed else 1
