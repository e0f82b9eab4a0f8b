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
                   help="input size without the batch, e.g. 3,48,48 (default: the model's example input); "
                   "repeat for models with several inputs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model config field, e.g. image_size=64 or hidden_sizes=[256,128]")
    p.add_argument("--depth", type=int, default=None, help="show layers down to this nesting depth")
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
    p.add_argument("--out", default="activations.png", help="PNG file to write (default activations.png)")
    p.add_argument("--names", default="", help="comma-separated subset, e.g. sigmoid,relu,tanh (default all)")
    p.add_argument("--range", dest="x_range", type=float, default=5.0, help="plot x from -R to R (default 5)")
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
    p.add_argument("runs", nargs="+", help="run folders written by `duboko train`")
    p.add_argument("--out", default="compare.png", help="PNG file to write (default compare.png)")
    p.add_argument("--metrics", default="", help="comma-separated metrics to plot, e.g. loss,accuracy (default: the runs')")
    p.add_argument("--title", default="", help="figure title")
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
                   help="input size without the batch (default: the model's example input)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model config field, e.g. image_size=8 for a smaller MY_NET")
    p.add_argument("--batch-size", type=int, default=1, help="examples in the input (default 1)")
    p.add_argument("--max-entries", type=int, default=16,
                   help="entries checked per tensor; larger tensors are sampled (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input, the sample and the projection")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_gradcheck)


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


def check_model_set_types(name: str, overrides: dict[str, Any]) -> None:
    """`--set` values of a model config through config's type check (the one recipes get), so
    `--set image_size=abc` is one line naming model.image_size, not a TypeError deep in a layer."""
    from duboko import config as C
    from duboko import registry

    spec = registry.get_spec(name)
    C.build_dataclass(spec.config_cls, {**spec.defaults, **overrides}, "model")


def cmd_summary(args) -> int:
    from duboko.evaluate.summary import parse_input_shape, summarize_registered

    overrides = _model_overrides(args.overrides)
    _check_model_config(args.model, overrides)
    shapes = [parse_input_shape(s) for s in args.input_shape] or None
    summary = summarize_registered(args.model, shapes, overrides, forward=not args.no_forward)
    if args.json:
        print(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(summary.format_table(args.depth))
    return 0


def cmd_activations(args) -> int:
    import torch

    from duboko.evaluate.activations import activation_values, plot_activations

    if args.x_range <= 0:
        raise DubokoError(f"--range must be > 0, got {args.x_range}")
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
    from duboko.evaluate.summary import make_inputs, parse_input_shape

    if args.batch_size < 1 or args.max_entries < 1:
        raise DubokoError(f"--batch-size and --max-entries must be >= 1, got {args.batch_size} and {args.max_entries}")
    overrides = _model_overrides(args.overrides)
    _check_model_config(args.model, overrides)
    torch.manual_seed(args.seed)
    model = registry.create_model(args.model, **overrides)
    shapes = [parse_input_shape(s) for s in args.input_shape] or None
    inputs = make_inputs(args.model, model, shapes, args.batch_size)
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
