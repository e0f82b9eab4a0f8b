"""Diffusion commands: `sample` (grids and sample-quality metrics from a trained run),
`noising` (the forward process on one MNIST digit) and `trajectory` (the reverse process, step
by step)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXAMPLES_SAMPLE = """examples:
  duboko sample runs/ddpm --n 64 --sampler ddim --steps 50 --seed 0 --out grid.png
  duboko sample runs/ddpm-class --label 7 --n 16 --guidance 3.0 --out sevens.png
  duboko sample runs/t2i --prompt "a handwritten three" --n 16 --guidance 4.0 --out threes.png
  duboko sample runs/t2i --metrics --sampler ddpm --steps 1000 --n 100 --json   # prompt_accuracy, fd_mnist
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
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler (default: the run's, ddim)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the run's sample_steps; DDPM uses 1000 unless given)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--label", type=int, help="digit to draw (label-conditioned runs)")
    p.add_argument("--prompt", help="text prompt (text-to-image runs), e.g. \"a handwritten three\"")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1: none; default: the run's)")
    p.add_argument("--out", default="samples.png", help="PNG file for the grid (default samples.png)")
    p.add_argument("--nrow", type=int, default=0, help="images per row (default: 10 for balanced digits, else 8)")
    p.add_argument("--metrics", action="store_true", help="score n samples (digits 0-9 in turn, held-out prompts): "
                   "prompt_accuracy and fd_mnist with the real-image floor and the noise value")
    p.add_argument("--json", action="store_true", help="with --metrics: print one JSON object")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "noising",
        help="picture of the forward (noising) process on one digit",
        description="Show one MNIST test digit noised in closed form, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, "
        "at several timesteps, for the linear and the cosine schedule.",
        epilog="example:\n  duboko noising --out forward.png --timesteps 0,100,250,500,750,1000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="forward.png", help="PNG file (default forward.png)")
    p.add_argument("--timesteps", default="0,100,250,500,750,1000", help="comma-separated t in 0..T (0: the clean image)")
    p.add_argument("--schedules", default="linear,cosine", help="comma-separated: linear, cosine")
    p.add_argument("--index", type=int, default=0, help="which MNIST test image (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--data-dir", help="folder with the MNIST files")
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
    p.add_argument("--label", type=int, help="digit (label-conditioned runs)")
    p.add_argument("--prompt", help="prompt (text-to-image runs)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the run's)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--frames", type=int, default=10, help="columns in the strip (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="trajectory.png", help="PNG file (default trajectory.png)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_trajectory)


def _load(run: str, device: str):
    from duboko.errors import DubokoError
    from duboko.train.run import load_run

    loaded = load_run(run, device)
    if loaded.config.task != "diffusion":
        raise DubokoError(f"run {run!r} is a {loaded.config.task!r} run; sampling needs a diffusion run")
    return loaded


def _condition_args(task, args, n: int) -> dict:
    from duboko.data import captions
    from duboko.errors import DubokoError

    if args.label is not None and not 0 <= args.label <= 9:
        raise DubokoError(f"--label must be a digit 0-9, got {args.label}")
    if task.conditioning == "none":
        if args.label is not None or args.prompt:
            raise DubokoError("this run is unconditional: it takes no --label or --prompt")
        return {}
    if task.conditioning == "class":
        if args.prompt:
            raise DubokoError("this run is label-conditioned: use --label, not --prompt")
        return {"labels": [args.label] * n if args.label is not None else task.balanced_labels(n)}
    if args.label is not None and not args.prompt:
        raise DubokoError("this run is prompt-conditioned: use --prompt \"a handwritten seven\", not --label")
    if args.prompt is not None:
        task.tokenizer.encode(args.prompt)  # clear error before any work
        return {"prompts": [args.prompt] * n}
    return {"prompts": [captions.caption(y, captions.HELD_OUT_TEMPLATES[0]) for y in task.balanced_labels(n)]}


def _steps(args, task) -> int | None:
    if args.steps is not None:
        return args.steps
    if args.sampler == "ddpm":
        return task.schedule.num_train_timesteps
    return None


def cmd_sample(args) -> int:
    from tqdm import tqdm

    from duboko.errors import DubokoError
    from duboko.tasks.diffusion import save_grid

    if args.n < 1:
        raise DubokoError(f"--n must be >= 1, got {args.n}")
    loaded = _load(args.run, args.device)
    task, model = loaded.task, loaded.model
    steps = _steps(args, task)
    if args.metrics:
        if args.label is not None or args.prompt:
            raise DubokoError("--metrics samples every digit in turn; drop --label/--prompt")
        bar = tqdm(total=args.n, desc="sampling", unit="img", file=sys.stderr, disable=args.json)
        done = [0]

        def progress(i, total):
            bar.update(i - done[0])
            done[0] = i

        metrics = task.sample_quality(model, args.n, sampler=args.sampler, steps=steps, guidance=args.guidance,
                                      eta=args.eta, seed=args.seed, progress=progress)
        bar.close()
        images = metrics.pop("_images")
        save_grid(images[:100], args.out, nrow=10)
        metrics = {"run": args.run, **metrics, "grid": args.out}
        if args.json:
            print(json.dumps(metrics))
        else:
            for k, v in metrics.items():
                print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        return 0
    cond = _condition_args(task, args, args.n)
    bar = tqdm(total=1, desc="denoising", unit="step", file=sys.stderr)

    def progress(i, total):
        bar.total = total
        bar.update(1)

    t0 = time.perf_counter()
    result = task.generate(model, args.n, sampler=args.sampler, steps=steps, guidance=args.guidance, eta=args.eta,
                           seed=args.seed, progress=progress, **cond)
    bar.close()
    seconds = time.perf_counter() - t0
    nrow = args.nrow or (10 if (task.conditioning != "none" and args.label is None and args.prompt is None) else 8)
    save_grid(result.images, args.out, nrow=nrow)
    print(f"{args.n} image(s) -> {args.out}  ({args.sampler or task.config.data.sampler}, "
          f"{len(result_steps(task, args, steps))} steps, {seconds:.1f}s on {loaded.device})")
    return 0


def result_steps(task, args, steps):
    from duboko.diffusion.schedulers import make_scheduler

    sched = make_scheduler(args.sampler or task.config.data.sampler, task.schedule)
    return sched.set_timesteps(steps or task.config.data.sample_steps)


def cmd_noising(args) -> int:
    import torch

    from duboko.data.mnist import load_mnist
    from duboko.diffusion.schedulers import DDPMScheduler
    from duboko.errors import DubokoError
    from duboko.evaluate.plots import _plt, save_figure

    try:
        ts = [int(v) for v in args.timesteps.split(",") if v.strip()]
    except ValueError as exc:
        raise DubokoError(f"--timesteps expects comma-separated integers like 0,100,500, got {args.timesteps!r}") from exc
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    images, labels = load_mnist("test", args.data_dir)
    if not 0 <= args.index < len(images):
        raise DubokoError(f"--index must be in 0..{len(images) - 1}, got {args.index}")
    x0 = images[args.index].float()[None, None] / 127.5 - 1  # (1, 1, 28, 28) in [-1, 1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    plt = _plt()
    fig, axes = plt.subplots(len(schedules), len(ts), figsize=(1.6 * len(ts), 1.9 * len(schedules)), squeeze=False)
    for r, name in enumerate(schedules):
        sched = DDPMScheduler(beta_schedule=name)
        T = sched.num_train_timesteps
        for c, t in enumerate(ts):
            if not 0 <= t <= T:
                raise DubokoError(f"timesteps must be in 0..{T}, got {t}")
            if t == 0:
                xt, abar = x0, 1.0
            else:  # t steps of noising: index t-1 of the 0-based schedule
                xt = sched.add_noise(x0, noise, torch.tensor([t - 1]))
                abar = float(sched.alphas_cumprod[t - 1])
            ax = axes[r][c]
            ax.imshow(xt[0, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(f"t = {t}\nᾱ = {abar:.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(f"Forward process on MNIST test image {args.index} (a {int(labels[args.index])})", fontsize=10)
    save_figure(fig, args.out)
    print(f"forward-noising strip ({', '.join(schedules)}; t = {', '.join(map(str, ts))}) -> {args.out}")
    return 0


def cmd_trajectory(args) -> int:
    from duboko.errors import DubokoError
    from duboko.evaluate.plots import _plt, save_figure

    if args.frames < 2:
        raise DubokoError(f"--frames must be >= 2, got {args.frames}")
    loaded = _load(args.run, args.device)
    task, model = loaded.task, loaded.model
    cond = _condition_args(task, args, 1)
    if task.conditioning != "none" and not (args.label is not None or args.prompt):
        raise DubokoError("pass --label or --prompt for a conditioned run")
    keep = max(1, args.steps // (args.frames - 1))
    result = task.generate(model, 1, sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                           keep_every=keep, **cond)
    frames = result.trajectory[:-1]
    preds = result.predictions
    plt = _plt()
    cols = len(frames) + 1
    fig, axes = plt.subplots(2, cols, figsize=(1.3 * cols, 3.0), squeeze=False)
    for c in range(cols):
        for r in range(2):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(frames):
                t, img = (frames[c] if r == 0 else preds[c])
                ax.imshow(img[0, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                if r == 0:
                    ax.set_title(f"t = {t}", fontsize=8)
            else:
                ax.imshow(result.images[0, 0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
                if r == 0:
                    ax.set_title("result", fontsize=8)
            if c == 0:
                ax.set_ylabel("x_t" if r == 0 else "x̂_0", fontsize=9)
    what = f"prompt {args.prompt!r}" if args.prompt else (f"label {args.label}" if args.label is not None else "unconditional")
    fig.suptitle(f"Denoising trajectory ({what}, {args.sampler or task.config.data.sampler}, {args.steps} steps)", fontsize=10)
    save_figure(fig, args.out)
    print(f"denoising trajectory ({len(frames)} frames) -> {args.out}")
    return 0
