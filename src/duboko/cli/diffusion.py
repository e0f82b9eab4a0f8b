"""Diffusion commands: `sample` (grids and sample-quality metrics from a trained run),
`noising` (the forward process on one MNIST digit) and `trajectory` (the reverse process, step
by step)."""

from __future__ import annotations

import argparse
import json
import sys
import time

EXAMPLES_SAMPLE = """examples:
  duboko sample runs/ddpm --n 64 --sampler ddim --steps 50 --seed 0 --out grid.png
  duboko sample runs/ddpm-class --label 7 --n 16 --guidance 3.0 --out sevens.png
  duboko sample runs/t2i --prompt "a handwritten three" --n 16 --guidance 4.0 --out threes.png
  duboko sample runs/t2i --metrics --sampler ddpm --steps 1000 --n 100 --json   # prompt_accuracy, fd_mnist
  duboko sample runs/t2i --metrics --n 1000 --seeds 0,1,2   # each seed's accuracy (95 % interval), the minimum
"""


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="draw images from a trained diffusion run",
        description="Generate images with a trained diffusion run (DDPM or DDIM, optional classifier-free "
        "guidance) and save them as a grid; with --metrics, score them (prompt_accuracy, fd_mnist).",
        epilog=EXAMPLES_SAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder written by `duboko train mnist-diffusion*` / `mnist-text2img`")
    p.add_argument("--n", type=int, default=16, help=f"number of images (1-{MAX_SAMPLES:,}, default 16)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler (default: the run's, ddim)")
    p.add_argument("--steps", type=int, help=f"denoising steps (1-{MAX_STEPS}; default: the run's sample_steps, DDPM "
                   "uses 1000 unless given)")
    p.add_argument("--eta", type=float, help="DDIM noise in [0, 1]: 0 deterministic, 1 DDPM-like (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--seeds", metavar="LIST", help=f"with --metrics: 1-{MAX_SEEDS} distinct comma-separated seeds >= 0 (e.g. 0,1,2); prints each seed's "
                   "figures and the minimum prompt_accuracy")
    p.add_argument("--batch-size", type=int, default=0,
                   help=f"images per denoising batch, 0-{MAX_SAMPLES:,} (default 0: the run's data.eval_batch_size); bounds memory")
    p.add_argument("--label", type=int, help="digit 0-9 to draw (label-conditioned runs; default: 0-9 in turn)")
    p.add_argument("--prompt", help="text prompt (text-to-image runs), e.g. \"a handwritten three\"")
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance scale in [0, {MAX_GUIDANCE:g}] (1: none; "
                   "default: the run's)")
    p.add_argument("--out", default="samples.png", metavar="PNG", help="PNG file for the grid (default samples.png)")
    p.add_argument("--nrow", type=int, default=0, help="images per row (default 0: 10 for balanced digits, else 8)")
    p.add_argument("--metrics", action="store_true", help="score n samples (digits 0-9 in turn, held-out prompts): "
                   "prompt_accuracy and fd_mnist with the real-image floor and the noise value")
    p.add_argument("--json", action="store_true", help="with --metrics: print one JSON object")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "noising",
        help="picture of the forward (noising) process on one digit",
        description="Show one MNIST test digit noised in closed form, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, "
        "at several timesteps, for the linear and the cosine schedule.",
        epilog="example:\n  duboko noising --out forward.png --timesteps 0,100,250,500,750,1000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="forward.png", metavar="PNG", help="PNG file (default forward.png)")
    p.add_argument("--timesteps", default="0,100,250,500,750,1000", metavar="LIST",
                   help="comma-separated t in 0..1000, 0: the clean image (default 0,100,250,500,750,1000)")
    p.add_argument("--schedules", default="linear,cosine", metavar="LIST",
                   help="comma-separated, each linear or cosine (default linear,cosine)")
    p.add_argument("--index", type=int, default=0, help="which MNIST test image, 0-9999 (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--data-dir", metavar="DIR", help="folder with the MNIST files (default: the bundled copy)")
    p.set_defaults(func=cmd_noising)

    p = sub.add_parser(
        "trajectory",
        help="picture of the denoising trajectory of one sample",
        description="Show the reverse process: x_t (top row) and the network's prediction of the clean image "
        "x0_hat (bottom row) at evenly spaced steps, for one sample of a trained run.",
        epilog="example:\n  duboko trajectory runs/t2i --prompt \"a handwritten three\" --out trajectory.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder of a diffusion run")
    p.add_argument("--label", type=int, help="digit 0-9 (label-conditioned runs)")
    p.add_argument("--prompt", help="prompt (text-to-image runs)")
    p.add_argument("--guidance", type=float, help=f"guidance scale in [0, {MAX_GUIDANCE:g}] (1: none; default: the run's)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=50, help=f"denoising steps (1-{MAX_STEPS}, default 50)")
    p.add_argument("--frames", type=int, default=10, help="columns in the strip (2-100, default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--out", default="trajectory.png", metavar="PNG", help="PNG file (default trajectory.png)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.set_defaults(func=cmd_trajectory)


DIFFUSION = ("diffusion", "ldm")  # the runs these commands read (a latent run decodes through its VAE)


def _conditions(task, label: int | None, prompt: str | None, n: int) -> dict:
    """--label / --prompt as the `labels` / `prompts` of `task.generate` for n images; with
    neither, a conditioned run draws the digits 0-9 in turn (the task turns labels into
    held-out captions for a text run)."""
    from duboko.errors import DubokoError

    if label is not None and not 0 <= label <= 9:
        raise DubokoError(f"--label must be a digit 0-9, got {label}")
    if task.conditioning == "text" and label is not None and not prompt:
        raise DubokoError("this run is prompt-conditioned: use --prompt \"a handwritten seven\", not --label")
    if prompt or (prompt is not None and task.conditioning == "text"):  # --prompt "": the empty (null) prompt
        cond = {"prompts": [prompt] * n}
    elif label is not None:
        cond = {"labels": [label] * n}
    else:
        cond = {"labels": task.balanced_labels(n)} if task.conditioning != "none" else {}
    task.condition_for(**cond)  # a condition that does not fit the run fails here, before any sampling
    return cond


# Bounds of the sampling flags (the message gives the allowed range): the DDPM reverse process
# has at most the training schedule's 1000 steps (Ho et al. 2020); DDIM's eta interpolates
# between deterministic (0) and DDPM-like (1) sampling (Song et al. 2021, eq. 16).
MAX_SAMPLES = 10_000
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


def check_sampling_flags(args) -> None:
    """Refuse out-of-range sampling flags before any run is loaded; `not (a <= x <= b)` so that
    NaN (which fails every comparison) is refused too."""
    from duboko.errors import DubokoError

    n = getattr(args, "n", None)
    if n is not None and not 1 <= n <= MAX_SAMPLES:
        raise DubokoError(f"--n must be in 1..{MAX_SAMPLES:,}, got {n}")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise DubokoError(f"--steps must be in 1..{MAX_STEPS}, got {args.steps}")
    eta = getattr(args, "eta", None)
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise DubokoError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if args.guidance is not None and not 0.0 <= args.guidance <= MAX_GUIDANCE:
        raise DubokoError(f"--guidance must be in [0, {MAX_GUIDANCE:g}] (1: no guidance), got {args.guidance}")
    batch = getattr(args, "batch_size", None)
    if batch is not None and not 0 <= batch <= MAX_SAMPLES:
        raise DubokoError(f"--batch-size must be in 0..{MAX_SAMPLES:,} (0: the run's), got {batch}")
    nrow = getattr(args, "nrow", None)
    if nrow is not None and not 0 <= nrow <= MAX_SAMPLES:
        raise DubokoError(f"--nrow must be in 0..{MAX_SAMPLES:,} (0: automatic), got {nrow}")


def _steps(args, task) -> int | None:
    if args.steps is not None:
        return args.steps
    if args.sampler == "ddpm":
        return task.schedule.num_train_timesteps
    return None


def cmd_sample(args) -> int:
    from tqdm import tqdm

    from duboko.errors import DubokoError
    from duboko.evaluate.plots import save_grid
    from duboko.train.verify import load_run_of

    from duboko.evaluate.plots import check_png_output

    check_sampling_flags(args)
    check_png_output(args.out)  # before minutes of sampling, not after
    loaded = load_run_of(args.run, DIFFUSION, args.device)
    task, model = loaded.task, loaded.model
    steps = _steps(args, task)
    seeds = parse_seeds(args.seeds, args.seed)
    if args.seeds and not args.metrics:
        raise DubokoError("--seeds is for --metrics (each seed's prompt_accuracy); use --seed for a grid")
    if args.batch_size:
        task.config.data.eval_batch_size = args.batch_size
    if args.metrics:
        if args.label is not None or args.prompt:
            raise DubokoError("--metrics samples every digit in turn; drop --label/--prompt")
        per_seed = []
        for seed in seeds:
            bar = tqdm(total=args.n, desc=f"sampling (seed {seed})", unit="img", file=sys.stderr, disable=args.json)
            done = [0]

            def progress(i, total):
                bar.update(i - done[0])
                done[0] = i

            metrics = task.sample_quality(model, args.n, sampler=args.sampler, steps=steps, guidance=args.guidance,
                                          eta=args.eta, seed=seed, progress=progress)
            bar.close()
            images = metrics.pop("_images")
            if seed == seeds[0]:
                save_grid(images[:100], args.out, nrow=10)
            per_seed.append(metrics)
        out = {"run": args.run, **per_seed[0], "grid": args.out}
        if len(seeds) > 1:
            out = {"run": args.run, "seeds": {str(s): m for s, m in zip(seeds, per_seed)}, "grid": args.out}
            accs = [m["prompt_accuracy"] for m in per_seed if "prompt_accuracy" in m]
            if accs:
                out["prompt_accuracy_min"] = min(accs)
                out["prompt_accuracy_low_min"] = min(m["prompt_accuracy_low"] for m in per_seed)
            out["fd_mnist_max"] = max(m["fd_mnist"] for m in per_seed)
        if args.json:
            print(json.dumps(out))
            return 0
        from duboko.tasks.diffusion import quality_report

        for seed, m in zip(seeds, per_seed):
            if len(seeds) > 1:
                print(f"-- seed {seed}")
            print(quality_report(m), end="")
        if len(seeds) > 1 and "prompt_accuracy_min" in out:
            print(f"prompt_accuracy over seeds {', '.join(map(str, seeds))}: "
                  + ", ".join(f"{m['prompt_accuracy']:.4f}" for m in per_seed)
                  + f"; minimum {out['prompt_accuracy_min']:.4f} (lowest interval bound {out['prompt_accuracy_low_min']:.4f})")
        print(f"grid: {args.out}")
        return 0
    cond = _conditions(task, args.label, args.prompt, args.n)
    bar = tqdm(total=args.n, desc="denoising", unit="img", file=sys.stderr)
    done = [0]

    def progress(i, total):
        bar.update(i - done[0])
        done[0] = i

    t0 = time.perf_counter()
    # In batches of data.eval_batch_size (or --batch-size): memory stays bounded for any --n.
    images = task.generate_batched(model, args.n, sampler=args.sampler, steps=steps, guidance=args.guidance,
                                   eta=args.eta, seed=args.seed, progress=progress, **cond)
    bar.close()
    seconds = time.perf_counter() - t0
    nrow = args.nrow or (10 if (task.conditioning != "none" and args.label is None and args.prompt is None) else 8)
    save_grid(images, args.out, nrow=nrow)
    print(f"{args.n} image(s) -> {args.out}  ({args.sampler or task.config.data.sampler}, "
          f"{steps or task.config.data.sample_steps} steps, {seconds:.1f}s on {loaded.device})")
    return 0


MAX_SEEDS = 20


def parse_seeds(text: str | None, default: int) -> list[int]:
    """--seeds "0,1,2" -> [0, 1, 2] (distinct, at most MAX_SEEDS); None -> [default]."""
    from duboko.errors import DubokoError

    if not text:
        return [default]
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise DubokoError(f"--seeds expects comma-separated integers like 0,1,2, got {text!r}") from exc
    if not 1 <= len(seeds) <= MAX_SEEDS or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise DubokoError(f"--seeds needs 1..{MAX_SEEDS} distinct non-negative seeds, got {text!r}")
    return seeds


def cmd_noising(args) -> int:
    from duboko.data.mnist import load_mnist
    from duboko.errors import DubokoError
    from duboko.evaluate.diffusion import plot_noising

    try:
        ts = [int(v) for v in args.timesteps.split(",") if v.strip()]
    except ValueError as exc:
        raise DubokoError(f"--timesteps expects comma-separated integers like 0,100,500, got {args.timesteps!r}") from exc
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if not ts:
        raise DubokoError(f"--timesteps needs at least one t in 0..1000 (e.g. 0,500,1000), got {args.timesteps!r}")
    if not schedules:
        raise DubokoError(f"--schedules needs at least one of linear, cosine, got {args.schedules!r}")
    images, labels = load_mnist("test", args.data_dir)
    if not 0 <= args.index < len(images):
        raise DubokoError(f"--index must be in 0..{len(images) - 1}, got {args.index}")
    title = f"Forward process on MNIST test image {args.index} (a {int(labels[args.index])})"
    plot_noising(images[args.index], args.out, ts, schedules, args.seed, title)
    print(f"forward-noising strip ({', '.join(schedules)}; t = {', '.join(map(str, ts))}) -> {args.out}")
    return 0


def cmd_trajectory(args) -> int:
    from duboko.errors import DubokoError
    from duboko.evaluate.diffusion import plot_trajectory
    from duboko.train.verify import load_run_of

    if not 2 <= args.frames <= 100:
        raise DubokoError(f"--frames must be in 2..100, got {args.frames}")
    from duboko.evaluate.plots import check_png_output

    check_sampling_flags(args)
    check_png_output(args.out)  # before minutes of sampling, not after
    loaded = load_run_of(args.run, DIFFUSION, args.device)
    task, model = loaded.task, loaded.model
    if task.conditioning != "none" and not (args.label is not None or args.prompt):
        raise DubokoError("pass --label or --prompt for a conditioned run")
    cond = _conditions(task, args.label, args.prompt, 1)
    keep = max(1, args.steps // (args.frames - 1))
    result = task.generate(model, 1, sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                           keep_every=keep, **cond)
    what = f"prompt {args.prompt!r}" if args.prompt else (f"label {args.label}" if args.label is not None else "unconditional")
    plot_trajectory(result, args.out, f"Denoising trajectory ({what}, {args.sampler or task.config.data.sampler}, "
                    f"{args.steps} steps)")
    print(f"denoising trajectory ({len(result.trajectory) - 1} frames) -> {args.out}")
    return 0
