"""Seeing inside a run: `report`, `explain`, `mistakes`, `filters` and `lr-find`.

The pictures and pages are made in `duboko.evaluate.report`, `duboko.evaluate.interpret` and
`duboko.train.lr_find`; this module parses, loads the run folder (`train.run.load_run`), calls and
prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from duboko.errors import DubokoError


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page for a run (several runs: a comparison page)",
        description="Write an HTML report with inlined pictures and styles (no external file or address): recipe "
        "and resolved config, environment, timings, training curves, final metrics, and per family the confusion "
        "matrix, per-class P/R/F1 and top losses, samples and next-token table, test predictions, sample grids.",
        epilog="examples:\n  duboko report runs/cnn\n  duboko report runs/cnn runs/mlp --out compare.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) written by `duboko train`")
    p.add_argument("--out", help="output file (default: RUN/report.html for one run, compare.html for several)")
    p.add_argument("--files-only", action="store_true",
                   help="use the run folders' files only (no model: no top losses or next-token table)")
    p.add_argument("--device", default="cpu", help="device for the model-based sections (default cpu)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("explain", help="Grad-CAM and input-gradient saliency of an image classifier on one image",
                       description="Overlay Grad-CAM (last convolution) and input-gradient saliency on IMAGE, with the "
                       "predicted class and its probability. A model without a convolution (the MLP) gets saliency only.")
    p.add_argument("run", help="run folder of an image classifier")
    p.add_argument("image", help="an image file (PNG, JPEG, ...): a digit or a piece of clothing")
    p.add_argument("--out", default="why.png", help="output PNG (default why.png)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("mistakes", help="the test images with the highest loss (fastai's plot_top_losses)")
    p.add_argument("run", help="run folder of an image classifier")
    p.add_argument("--n", type=int, default=25, help="how many images (1-100, default 25)")
    p.add_argument("--out", default="top-losses.png", help="output PNG (default top-losses.png)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_mistakes)

    p = sub.add_parser("filters", help="a convolution's learned kernels; with --image, its feature maps")
    p.add_argument("run", help="run folder of an image classifier")
    p.add_argument("--layer", default="conv1", help="convolution name (default conv1)")
    p.add_argument("--image", help="draw this image's feature maps at the layer instead of the kernels")
    p.add_argument("--out", default="filters.png", help="output PNG (default filters.png)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_filters)

    p = sub.add_parser("lr-find", help="learning-rate range test: loss vs lr, with suggestions",
                       description="Sweep the learning rate exponentially from --start-lr to --end-lr over the recipe's "
                       "training batches (stepping duboko's Trainer), stop once the smoothed loss exceeds 4× its best, "
                       "restore the weights, print the steepest-descent and valley suggestions and plot them.")
    p.add_argument("recipe", help="bundled recipe name, .toml file or run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("--data-dir", help="folder holding the data set")
    p.add_argument("--out", default="lr.png", help="output PNG (default lr.png)")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="sweep steps (default 100)")
    p.set_defaults(func=cmd_lr_find)


def _png(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise DubokoError(f"--out must end in .png, got {out!r}")
    return path


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
    cfg = C.resolve(args.recipe, args.overrides, data_dir=args.data_dir)
    result = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps)
    plot_lr_find(result, out, title=f"{cfg.recipe}: learning-rate range test")
    print(describe(result, cfg.train.lr))
    print(f"wrote {out}")
    return 0
