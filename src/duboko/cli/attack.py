"""`duboko attack`: adversarial robustness of an image-classification run.

The attacks are `duboko.security.attacks`, the curve and its sanity checks
`duboko.security.robustness`; this module parses, loads the run folder (`train.run.load_run`:
verified, safetensors only), calls and prints.
"""

from __future__ import annotations

import argparse
import json
import sys

from duboko.errors import DubokoError


def register(sub) -> None:
    p = sub.add_parser(
        "attack",
        help="robust accuracy of an image classifier under FGSM, PGD, CW or APGD attacks",
        description="Attack the first --n test images of RUN in pixel space [0, 1] (before the model's normalisation) "
        "for each --eps, print robust accuracy against eps and the checks of Carlini et al. 2019 (accuracy never rises "
        "with eps, eps 0 = clean accuracy, an unbounded eps gives 0 %, more steps/restarts never help); a failed "
        "check is a warning of gradient masking. With --examples, draw clean | perturbation | adversarial images.",
        epilog="examples:\n  duboko attack runs/cnn --method pgd --eps 0.05,0.1,0.2,0.3 --out robust.png\n"
        "  duboko attack runs/cnn --method apgd-ce --eps 0.3 --n 1000 --json\n"
        "  duboko attack runs/cnn --examples 16 --eps 0.2 --out adv.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder of an image classifier (written by `duboko train`)")
    p.add_argument("--method", default="pgd", metavar="METHOD", help="fgsm | pgd | cw | apgd-ce | apgd-dlr (default pgd)")
    p.add_argument("--eps", default="0.05,0.1,0.2,0.3", metavar="LIST",
                   help="comma-separated radii in pixel units (linf: each in [0, 1]; default 0.05,0.1,0.2,0.3)")
    p.add_argument("--norm", default="linf", help="linf | l2 (default linf)")
    p.add_argument("--n", type=int, default=1000, help="attack the first N test images (1-100000, default 1000)")
    p.add_argument("--steps", type=int, default=40, help="iterations of pgd, cw, apgd (1-10000, default 40)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts (1-100, default 1)")
    p.add_argument("--step-size", type=float, default=0.0, help="step size α, a finite number >= 0 (default 0: 2.5·eps/steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts (default 0)")
    p.add_argument("--batch-size", type=int, default=500, help="images per attacked batch (>= 1, default 500)")
    p.add_argument("--no-checks", action="store_true", help="skip the sanity checks (they cost two more attacks)")
    p.add_argument("--examples", type=int, default=0,
                   help="draw this many examples (1-256) at the largest --eps instead of the curve (needs --out)")
    p.add_argument("--out", metavar="PNG", help="write the robust-accuracy curve here, or with --examples the example "
                   "grid (a .png name; an existing file is replaced only if it is a PNG)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    p.set_defaults(func=cmd_attack)


def cmd_attack(args) -> int:
    from duboko.security import robustness as R
    from duboko.security.attacks import AttackConfig
    from duboko.train.run import load_run

    from duboko.evaluate.plots import check_png_output

    if args.out and not args.out.lower().endswith(".png"):
        raise DubokoError(f"--out must end in .png, got {args.out!r}")
    out = check_png_output(args.out) if args.out else None  # before minutes of attacking, not after
    if args.examples and out is None:
        raise DubokoError("--examples needs --out FILE.png")
    if args.batch_size < 1:
        raise DubokoError(f"--batch-size must be >= 1, got {args.batch_size}")
    eps_list = R.parse_eps_list(args.eps, args.norm)
    cfg = AttackConfig(method=args.method, eps=max(eps_list), norm=args.norm, steps=args.steps, restarts=args.restarts,
                       step_size=args.step_size, seed=args.seed)
    cfg.check()
    if not (1 <= args.n <= R.MAX_IMAGES):
        raise DubokoError(f"--n must be in [1, {R.MAX_IMAGES}], got {args.n}")
    if args.examples and not 1 <= args.examples <= 256:
        raise DubokoError(f"--examples must be in [1, 256], got {args.examples}")
    loaded = load_run(args.run, device=args.device)
    if not hasattr(loaded.task, "preprocess"):
        raise DubokoError(f"run {args.run!r} is a {loaded.config.task} run; `duboko attack` needs an image classifier")
    if args.examples:
        examples = R.adversarial_examples(loaded.task, loaded.model, cfg, args.examples)
        R.plot_examples(examples, out, cfg.eps, cfg.method)
        fooled = sum(a != t for a, t in zip(examples["adv_pred"], examples["labels"]))
        print(f"{fooled}/{args.examples} examples misclassified under {cfg.method} at eps {cfg.eps:g}; wrote {out}")
        return 0
    result = R.robustness_report(loaded.task, loaded.model, cfg, eps_list, n=args.n, batch_size=args.batch_size,
                                 checks=not args.no_checks, show_progress=False if args.json else None)
    if out is not None:
        R.plot_curve(result, out, title=f"{loaded.config.recipe}: {cfg.method} ({result.n} test images)")
    if args.json:
        print(json.dumps({"run": str(args.run), **result.to_dict(), **({"png": str(out)} if out else {})}, indent=2))
    else:
        print(R.format_table(result))
        if out is not None:
            print(f"wrote {out}")
    for warning in result.warnings:
        print(f"duboko: warning: {warning}", file=sys.stderr)
    return 0
