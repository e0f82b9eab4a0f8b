"""Seeing inside a run: `report`, `explain`, `mistakes`, `filters` and `lr-find`.

The pictures and pages are made in `duboko.evaluate.report`, `duboko.evaluate.interpret` and
`duboko.train.lr_find`; this module parses, loads the run folder (`train.run.load_run`), calls and
prints.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from duboko.errors import DubokoError


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page for a run (several runs: a comparison page)",
        description="Write an HTML report with inlined pictures and styles (no external file or address): recipe "
        "and resolved config, environment, timings, training curves, final metrics, and per family the confusion "
        "matrix, per-class P/R/F1 and top losses, samples and next-token table, test predictions, sample grids, "
        "the guidance sweep and the noising strip (diffusion).",
        epilog="examples:\n  duboko report runs/cnn\n  duboko report runs/cnn runs/mlp --out compare.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) written by `duboko train`")
    p.add_argument("--out", help="output file (default: RUN/report.html for one run, compare.html for several)")
    p.add_argument("--files-only", action="store_true",
                   help="use the run folders' files only (no model: no top losses, next-token table, or diffusion "
                   "pictures an older run folder lacks)")
    p.add_argument("--device", default="cpu", help="device for the model-based sections (default cpu)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("explain", help="Grad-CAM and input-gradient saliency of an image classifier on one image",
                       description="Overlay Grad-CAM (last convolution) and input-gradient saliency on IMAGE, with the "
                       "predicted class and its probability. A model without a convolution (the MLP) gets saliency only.",
                       epilog="example:\n  duboko explain runs/cnn digit.png --out why.png")
    p.add_argument("run", help="run folder of an image classifier")
    p.add_argument("image", help="an image file (PNG, JPEG, ...): a digit or a piece of clothing")
    p.add_argument("--out", default="why.png", metavar="PNG", help="output PNG (default why.png)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("mistakes", help="the test images with the highest loss (fastai's plot_top_losses)",
                       description="Draw the --n test images with the highest loss, each with its true and predicted "
                       "class and the predicted probability, and print the top five.",
                       epilog="example:\n  duboko mistakes runs/cnn --n 16 --out top-losses.png")
    p.add_argument("run", help="run folder of an image classifier")
    p.add_argument("--n", type=int, default=25, help=f"how many images (1-{MAX_TOP_LOSSES}, default 25)")
    p.add_argument("--out", default="top-losses.png", metavar="PNG", help="output PNG (default top-losses.png)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    p.set_defaults(func=cmd_mistakes)

    p = sub.add_parser("filters", help="a convolution's learned kernels; with --image, its feature maps",
                       description="Draw the learned kernels of one convolution of an image classifier, or with "
                       "--image the feature maps that this image gives at that layer.",
                       epilog="examples:\n  duboko filters runs/cnn --layer conv1 --out filters.png\n"
                       "  duboko filters runs/cnn --layer conv2 --image digit.png --out maps.png")
    p.add_argument("run", help="run folder of an image classifier")
    p.add_argument("--layer", default="conv1", help="convolution name, e.g. conv1 (an unknown name lists the model's; "
                   "default conv1)")
    p.add_argument("--image", metavar="FILE", help="draw this image's feature maps at the layer instead of the kernels")
    p.add_argument("--out", default="filters.png", metavar="PNG", help="output PNG (default filters.png)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    p.set_defaults(func=cmd_filters)

    p = sub.add_parser("lr-find", help="learning-rate range test: loss vs lr, with suggestions",
                       description="Sweep the learning rate exponentially from --start-lr to --end-lr over the recipe's "
                       "training batches (stepping duboko's Trainer), stop once the smoothed loss exceeds 4× its best, "
                       "restore the weights, print the steepest-descent and valley suggestions and plot them.",
                       epilog="examples:\n  duboko lr-find mnist-cnn --out lr.png\n"
                       "  duboko lr-find digits --start-lr 1e-5 --end-lr 1 --steps 50")
    p.add_argument("recipe", help="bundled recipe name, .toml file or run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. batch_size=128 (repeatable)")
    p.add_argument("--data-dir", metavar="DIR", help="folder holding the data set (sets data.data_dir or data.path)")
    p.add_argument("--out", default="lr.png", metavar="PNG", help="output PNG (default lr.png)")
    p.add_argument("--start-lr", type=float, default=1e-7, metavar="LR", help="first learning rate, > 0 (default 1e-07)")
    p.add_argument("--end-lr", type=float, default=10.0, metavar="LR",
                   help="last learning rate, finite and > --start-lr (default 10)")
    p.add_argument("--steps", type=int, default=100, help="sweep steps (2-1000, default 100)")
    p.set_defaults(func=cmd_lr_find)


MAX_TOP_LOSSES = 100  # `mistakes --n` (the grid stays readable)


def _png(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise DubokoError(f"--out must end in .png, got {out!r}")
    from duboko.evaluate.plots import check_png_output

    return check_png_output(path)  # an existing non-PNG file there is refused now, before the work


def _image_run(run: str, device: str):
    from duboko.train.run import load_run

    loaded = load_run(run, device=device)
    if not hasattr(loaded.task, "load_image_file"):
        raise DubokoError(f"run {run!r} is a {loaded.config.task} run; this command needs an image classifier")
    return loaded


def cmd_report(args) -> int:
    from duboko.evaluate.report import write_comparison, write_report
    from duboko.train.run import load_run

    models = {}
    if not args.files_only:
        for i, run in enumerate(args.runs):
            loaded = load_run(run, device=args.device)
            models[i] = (loaded.model, loaded.task)
    if len(args.runs) == 1:
        model, task = models.get(0, (None, None))
        path = write_report(args.runs[0], model, task, out=args.out)
    else:
        path = write_comparison(args.runs, args.out or "compare.html", models)
    print(f"wrote {path}")
    return 0


def cmd_explain(args) -> int:
    from duboko.evaluate.interpret import explain, plot_explanation

    out = _png(args.out)
    loaded = _image_run(args.run, args.device)
    image, _ = loaded.task.load_image_file(args.image)
    x = loaded.task.eval_inputs(image[None])  # (1, C, S, S)
    result = explain(loaded.model, x, loaded.task.class_names)
    plot_explanation(x, result, out, source=Path(args.image).name)
    shown = f"Grad-CAM at {result.layer} + saliency" if result.cam is not None else "saliency only (no convolution)"
    print(f"{args.image}: {result.predicted} (p = {result.probability:.3f}); {shown} -> {out}")
    return 0


def cmd_mistakes(args) -> int:
    from duboko.evaluate.interpret import plot_top_losses, top_losses

    if not 1 <= args.n <= MAX_TOP_LOSSES:
        raise DubokoError(f"--n must be between 1 and {MAX_TOP_LOSSES}, got {args.n}")
    out = _png(args.out)
    loaded = _image_run(args.run, args.device)
    top = top_losses(loaded.model, loaded.task, n=args.n)
    plot_top_losses(top, out, title=f"{loaded.config.recipe}: top {len(top.losses)} test losses")
    names = top.class_names
    for k in range(min(5, len(top.losses))):
        print(f"loss {top.losses[k]:.3f}: true {names[top.labels[k]]}, predicted {names[top.predicted[k]]} "
              f"(p = {top.probability[k]:.3f})")
    print(f"wrote {out}")
    return 0


def cmd_filters(args) -> int:
    from duboko.evaluate.interpret import feature_maps, plot_feature_maps, plot_filters

    out = _png(args.out)
    loaded = _image_run(args.run, args.device)
    if args.image:
        image, _ = loaded.task.load_image_file(args.image)
        maps = feature_maps(loaded.model, args.layer, loaded.task.eval_inputs(image[None]))
        n = plot_feature_maps(maps, args.layer, out)
        print(f"{args.layer}: {n} of {maps.shape[0]} feature maps of {args.image} -> {out}")
    else:
        n = plot_filters(loaded.model, args.layer, out)
        print(f"{args.layer}: {n} kernels -> {out}")
    return 0


def cmd_lr_find(args) -> int:
    from duboko import config as C
    from duboko.train.lr_find import describe, lr_find, plot_lr_find

    out = _png(args.out)
    if not math.isfinite(args.end_lr):  # lr_find checks 0 < start_lr < end_lr
        raise DubokoError(f"--end-lr must be a finite number > --start-lr, got {args.end_lr}")
    cfg = C.resolve(args.recipe, args.overrides, data_dir=args.data_dir)
    result = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps)
    plot_lr_find(result, out, title=f"{cfg.recipe}: learning-rate range test")
    print(describe(result, cfg.train.lr))
    print(f"wrote {out}")
    return 0
