"""Core commands: recipes, models, train, eval, predict."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the bundled recipes", description="List the bundled recipes with one-line descriptions.")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("models", help="list the registered models", description="List every registered model variant.")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "train",
        help="train a recipe into a run folder",
        description="Train RECIPE (a bundled recipe name or a .toml file) into a run folder, or continue one with --resume.",
        epilog="examples:\n  duboko train mnist-cnn --out runs/cnn\n  duboko train mnist-cnn --set epochs=1 --set batch_size=128 --out runs/quick\n"
        "  duboko train --resume runs/cnn\n"
        "  duboko train shakespeare-gpt --init-from runs/gpt2 --set data.path=my.txt --out runs/my-gpt2\n  torchrun --nproc_per_node=2 -m duboko train mnist-cnn --out runs/ddp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", help="recipe name (see `duboko recipes`) or path to a .toml recipe")
    p.add_argument("--out", help="run folder (default: runs/RECIPE, numbered if it exists)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. epochs=1, train.lr=3e-4, hidden_sizes=[256,128] (repeatable)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last saved step")
    p.add_argument("--init-from", metavar="RUN", help="fine-tune: start from this run folder's weights, model and "
                   "tokenizer (e.g. one from `duboko import-hf`; sets train.init_from)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--data-dir", help="folder with the data files (sets data.data_dir or data.path)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (sets train.device)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder", description="Evaluate a trained run: test loss and accuracy, "
                       "classification report and confusion matrix (or the family's own metrics).")
    p.add_argument("run", help="run folder written by `duboko train`")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--data-dir", help="folder with the data files, if they moved since training")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify image files with a trained run",
                       description="Classify image files (PNG, JPEG, ...) with a trained image classifier: class and top-k probabilities.")
    p.add_argument("run", help="run folder of an image-classification run")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=3, help="how many classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                   help="torch (the run's weights) | onnxruntime (the exported graph, same preprocessing)")
    p.add_argument("--onnx", metavar="FILE", help="with --engine onnxruntime: the exported file (default RUN/model.onnx)")
    p.set_defaults(func=cmd_predict)


def cmd_recipes(args) -> int:
    from duboko.config import load_recipe_file, recipe_names

    names = recipe_names()
    width = max(len(n) for n in names)
    for name in names:
        _, raw = load_recipe_file(name)
        print(f"{name:<{width}}  {raw.get('description', '')}")
    return 0


def cmd_models(args) -> int:
    from duboko import registry

    names = registry.model_names()
    width = max(len(n) for n in names)
    for name in names:
        spec = registry.get_spec(name)
        print(f"{name:<{width}}  [{spec.family}] {spec.description}")
    return 0


def cmd_train(args) -> int:
    from duboko import config as C
    from duboko.errors import DubokoError
    from duboko.api import default_run_dir
    from duboko.train.engine import fit
    from duboko.train.run import CONFIG, verify_init_source, verify_resumable

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    if args.init_from is not None:
        if args.resume:
            raise DubokoError("--init-from starts a new run; a resumed run continues from its own weights (drop one)")
        verify_init_source(args.init_from)  # before its config.json is parsed
        overrides.append(("train.init_from", args.init_from))  # a pair: the path is never parsed as a value
    if args.resume:
        if args.recipe:
            raise DubokoError("give either a RECIPE or --resume RUN, not both")
        out = Path(args.resume)
        if not (out / CONFIG).is_file():
            raise DubokoError(f"cannot resume: {out / CONFIG} does not exist")
        verify_resumable(out)  # before config.json is parsed
        cfg = C.resolve(out, overrides, data_dir=args.data_dir, resume=True)
    else:
        if not args.recipe:
            raise DubokoError("name a recipe (see `duboko recipes`) or pass --resume RUN")
        cfg = C.resolve(args.recipe, overrides, data_dir=args.data_dir)
        out = Path(args.out) if args.out else default_run_dir(cfg.recipe)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    fit(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, quiet=args.quiet)
    return 0


def cmd_eval(args) -> int:
    from duboko.train.run import evaluate_run, load_run

    loaded = load_run(args.run, args.device, data_dir=args.data_dir)
    metrics, report = evaluate_run(loaded, write_files=os.access(loaded.run_dir, os.W_OK) and not args.json)
    if args.json:
        print(json.dumps(metrics))
    elif report:
        print(report)
    else:
        for k, v in metrics.items():
            if not isinstance(v, (dict, list)):
                print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def cmd_predict(args) -> int:
    from duboko.errors import DubokoError
    from duboko.io import check_image_pixels
    from duboko.train.run import load_run

    if args.top < 1:
        raise DubokoError(f"--top must be >= 1, got {args.top}")
    loaded = load_run(args.run, args.device, setup_task=False)
    if not hasattr(loaded.task, "predict_files"):
        raise DubokoError(f"run {args.run!r} is a {loaded.config.task} run; `predict` needs an image-classification run")
    side = int(getattr(loaded.config.data, "image_size", 28))  # the model's input side, in pixels
    for image in args.images:  # headers only: an image is decoded once, by predict_files
        check_image_pixels(image, side)
    if args.engine == "onnxruntime":
        from duboko.export.onnx import predict_files_onnx

        results = predict_files_onnx(loaded, args.onnx, args.images, args.top)
    else:
        results = loaded.task.predict_files(loaded.model, args.images, args.top)
    if args.json:
        print(json.dumps({"run": args.run, "predictions": results}))
        return 0
    for r in results:
        tops = ", ".join(f"{c}: {p * 100:.2f}%" for c, p in r["top"])
        note = " (inverted: dark digit on light background)" if r.get("inverted") else ""
        print(f"{r['file']}: {r['class']}   [{tops}]{note}")
    return 0
