"""`duboko bench`: speed benchmarks that print a table and, with --json, a JSON record."""

from __future__ import annotations

import argparse
import json
import math
import sys

from duboko.errors import DubokoError

EPILOG_MNIST = """examples:
  duboko bench mnist --json                              reference vs duboko, same recipe (batch 64)
  duboko bench mnist --pairs 10 --window 20 --eval       longer, plus test accuracy of both after it
  duboko bench mnist --time-to-accuracy 0.992 --json     mnist-cnn-fast to 99.2% vs the reference's 5 epochs
  duboko bench mnist --time-to-accuracy 0.992 --reference-full   also train the reference for 5 epochs

Each side trains in its own worker process; windows of N batches alternate (ref, duboko),
(duboko, ref), ... so machine noise lands on both sides of each pair's ratio. On a shared machine,
serialize long runs: flock /tmp/duboko-cpu.lock duboko bench mnist ..."""


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed benchmarks (reference primer pipeline vs duboko)",
                       description="Speed benchmarks: images/s or tokens/s, time to accuracy, peak memory and the "
                       "hardware they ran on, as a table or JSON.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    m = bsub.add_parser("mnist", help="the primer's MNIST pipeline vs duboko's, side by side",
                        description="MY_NET on MNIST: the primer's per-sample PIL pipeline (float32, eager, batch 64) "
                        "against duboko's engine step (device-resident data, batched augmentation, channels-last, "
                        "bf16 where native), in alternating windows; or, with --time-to-accuracy, duboko's "
                        "mnist-cnn-fast recipe to a test accuracy against the reference's 5-epoch time.",
                        epilog=EPILOG_MNIST, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--json", action="store_true", help="print the full JSON record instead of the table")
    m.add_argument("--out", metavar="FILE", help="also write the JSON record to FILE (atomically)")
    m.add_argument("--plot", metavar="PNG", help="also write a picture of every window's images/s (a .png name)")
    m.add_argument("--pairs", type=int, default=6, help="alternating window pairs (throughput mode; >= 1, default 6)")
    m.add_argument("--window", type=int, default=10, help="batches per timed window (>= 1, default 10)")
    m.add_argument("--warmup", type=int, default=2, help="untimed batches per side before timing (>= 0, default 2)")
    m.add_argument("--recipe", default="mnist-cnn", help="duboko's recipe in throughput mode (default mnist-cnn)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of duboko's recipe, e.g. batch_size=128 (repeatable)")
    m.add_argument("--precision", default="auto", help="duboko's precision: auto (bf16 only where the hardware has "
                   "native bf16, else fp32) | fp32 | bf16 | recipe (default auto)")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, for both sides (default auto)")
    m.add_argument("--eval", action="store_true", help="throughput mode: also test both models after their equal steps")
    m.add_argument("--time-to-accuracy", type=float, metavar="ACC",
                   help="time duboko's fast recipe to this test accuracy, a fraction in (0, 1) (e.g. 0.992; default: "
                   "throughput mode instead)")
    m.add_argument("--fast-recipe", default="mnist-cnn-fast", help="recipe for --time-to-accuracy (default mnist-cnn-fast)")
    m.add_argument("--reference-every", type=int, default=3,
                   metavar="N", help="time-to-accuracy: one reference window every N duboko windows (>= 1, default 3)")
    m.add_argument("--reference-epochs", type=int, default=5, metavar="N", help="the reference recipe's epochs (>= 1, default 5)")
    m.add_argument("--reference-full", action="store_true",
                   help="time-to-accuracy: really train the reference for all its epochs (slow) instead of "
                   "estimating its time from the measured images/s")
    m.add_argument("--run-to-end", action="store_true",
                   help="time-to-accuracy: finish the fast recipe's epochs even after reaching the target")
    m.add_argument("--reference-workers", type=int, default=0, metavar="N",
                   help="reference DataLoader workers (>= 0; default 0, the primer's)")
    m.add_argument("--limit-train", type=int, default=0, help=argparse.SUPPRESS)
    m.add_argument("--limit-test", type=int, default=0, help=argparse.SUPPRESS)
    m.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_mnist)

    for family, unit, what in (("lm", "tokens", "the LSTM, GRU, RNN and GPT language-model recipes"),
                               ("diffusion", "images", "the diffusion recipes, plus DDPM vs DDIM sampling speed")):
        f = bsub.add_parser(family, help=f"training {unit}/s of {what}",
                            description=f"Training {unit}/s of {what}, through the engine's own training step "
                            "(warm-up steps untimed, then timed windows).",
                            epilog=f"examples:\n  duboko bench {family} --json\n  duboko bench {family} --recipe "
                            + ("shakespeare-gpt --windows 5" if family == "lm" else "mnist-diffusion --samples 16"),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        f.add_argument("--json", action="store_true", help="print the full JSON record instead of the table")
        f.add_argument("--out", metavar="FILE", help="also write the JSON record to FILE (atomically)")
        f.add_argument("--recipe", action="append", default=[], metavar="RECIPE",
                       help="only this recipe (repeatable; default: all of the family)")
        f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of every recipe, e.g. batch_size=32 (repeatable)")
        f.add_argument("--windows", type=int, default=3, help="timed windows per recipe (>= 1, default 3)")
        f.add_argument("--window", type=int, default=5, help="steps per window (>= 1, default 5)")
        f.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 0, default 1)")
        f.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
        f.add_argument("--no-progress", action="store_true", help="no progress bar")
        if family == "diffusion":
            f.add_argument("--samples", type=int, default=8, help=f"images sampled per sampler (1-{MAX_IMAGES}, default 8)")
            f.add_argument("--ddpm-steps", type=int, default=0, help=f"DDPM steps (0-{MAX_STEPS}; default 0: the recipe's T)")
            f.add_argument("--ddim-steps", type=int, default=50, help=f"DDIM steps (1-{MAX_STEPS}, default 50)")
        f.set_defaults(func=cmd_family, family=family)

    g = bsub.add_parser("generate", help="text generation speed: tokens/s and time to first token, batch 1, KV cache",
                        description="Interactive generation through `generate`'s own sampler, batch 1: time to first "
                        "token and decode tokens/s with the KV cache (GPT) or carried hidden state (LSTM), and without "
                        "it. Models are built at each recipe's size (untrained: speed does not depend on the weights) "
                        "or loaded from trained runs with --run.",
                        epilog="examples:\n  duboko bench generate\n  duboko bench generate --run runs/gpt --json\n"
                        "  duboko bench generate --recipe shakespeare-gpt --threads 2 --new-tokens 200",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--recipe", action="append", default=[], metavar="RECIPE", help="language-model recipe (repeatable; default "
                   "shakespeare-gpt and shakespeare-lstm)")
    g.add_argument("--run", action="append", default=[], metavar="RUN",
                   help="a trained language-model run folder instead (repeatable)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every recipe, e.g. model.n_layer=6 (repeatable)")
    g.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (1-4096, default 16)")
    g.add_argument("--new-tokens", type=int, default=100, help="tokens generated per repeat (1-4096, default 100)")
    g.add_argument("--repeats", type=int, default=3, help="timed generations per model, median reported (>= 1, default 3)")
    g.add_argument("--no-cache-tokens", type=int, default=50, metavar="N",
                   help="tokens of the uncached comparison (>= 0; 0: skip; default 50)")
    g.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto (default fp32: at batch 1 the matrices "
                   "are too small for bf16 to pay, docs/benchmarks.md)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads, >= 0 (default 1: batch-1 decoding is a chain of tiny "
                   "ops that a second thread only slows down; 0: torch's default)")
    g.add_argument("--target", type=float, default=1000.0, help="tokens/s target shown in the table (> 0, default 1000)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--json", action="store_true", help="print the full JSON record instead of the table")
    g.add_argument("--out", metavar="FILE", help="also write the JSON record to FILE (atomically)")
    g.set_defaults(func=cmd_generate)

    s = bsub.add_parser("sample", help="diffusion sampling speed: DDIM-50 16-image grid seconds and images/s",
                        description="Sampling through the diffusion task's own `generate` (classifier-free guidance for "
                        "conditioned recipes): seconds for a grid of --images images with DDIM --steps, and images/s. "
                        "UNets are built at each recipe's size (untrained: speed does not depend on the weights) or "
                        "loaded from trained runs with --run.",
                        epilog="examples:\n  duboko bench sample\n  duboko bench sample --run runs/diffusion --json\n"
                        "  duboko bench sample --precision fp32 --threads 2",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--recipe", action="append", default=[], metavar="RECIPE", help="diffusion recipe (repeatable; default mnist-diffusion "
                   "and mnist-diffusion-class)")
    s.add_argument("--run", action="append", default=[], metavar="RUN",
                   help="a trained diffusion run folder instead (repeatable)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every recipe (repeatable)")
    s.add_argument("--images", type=int, default=16, help="images per grid, one batch (1-1024, default 16)")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps (1-1000, default 50)")
    s.add_argument("--repeats", type=int, default=2, help="timed grids per model, median reported (>= 1, default 2)")
    s.add_argument("--precision", default="fp32", help="fp32 | auto (bf16 only where native) | bf16 (default fp32: "
                   "what `duboko sample` runs; bf16 costs this UNet ~1.1x more CPU)")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (>= 0; default 0: torch's default)")
    s.add_argument("--channels-last", action="store_true", help="channels-last model and inputs (default: contiguous)")
    s.add_argument("--target", type=float, default=5.0, help="grid-seconds target shown in the table (> 0, default 5)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    s.add_argument("--json", action="store_true", help="print the full JSON record instead of the table")
    s.add_argument("--out", metavar="FILE", help="also write the JSON record to FILE (atomically)")
    s.set_defaults(func=cmd_sample)

    gp = bsub.add_parser("gpu", help="the prepared GPU record: MY_NET 5 epochs, time to 99.2%%, GPT tokens/s + MFU, "
                         "diffusion images/s",
                         description="One run on a CUDA GPU that records, into one JSON: MY_NET trained for the "
                         "primer's 5 epochs (mnist-cnn), time to 99.2% test accuracy (mnist-cnn-fast), GPT training "
                         "tokens/s and model FLOPs utilisation (shakespeare-gpt), and DDIM-50 sampling images/s. "
                         "Refuses to run without CUDA unless --device cpu (a dry run: --quick keeps it to seconds).",
                         epilog="examples:\n  duboko bench gpu --out gpu.json\n  duboko bench gpu --device cpu --quick",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gp.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (a dry run; default cuda)")
    gp.add_argument("--quick", action="store_true", help="tiny sizes everywhere (checks the script, measures nothing useful)")
    gp.add_argument("--peak-tflops", type=float, default=0.0,
                    metavar="TFLOPS", help="the device's dense bf16 peak for MFU, a finite number >= 0 (default 0: looked up "
                    "from the GPU's name)")
    gp.add_argument("--skip", action="append", default=[], choices=["mnist", "accuracy", "gpt", "sample"],
                    help="leave a part out (repeatable)")
    gp.add_argument("--json", action="store_true", help="print the full JSON record instead of the table")
    gp.add_argument("--out", metavar="FILE", help="also write the JSON record to FILE (atomically, after every part)")
    gp.set_defaults(func=cmd_gpu)

    i = bsub.add_parser("inference", help="eager fp32 vs ONNX Runtime fp32 vs int8: latency, throughput, accuracy",
                        description="Inference of a trained run: batch-1 latency (median, p95) and batch-64 "
                        "throughput for eager PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 (dynamic "
                        "quantisation), with the test accuracy of each for image classifiers.",
                        epilog="examples:\n  duboko bench inference runs/cnn\n  duboko bench inference runs/gpt --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("run", help="run folder written by `duboko train`")
    i.add_argument("--repeats", type=int, default=50, help="timed batch-1 calls per engine (>= 1, default 50)")
    i.add_argument("--warmup", type=int, default=5, help="untimed calls first (>= 0, default 5)")
    i.add_argument("--limit-test", type=int, default=0, metavar="N",
                   help="test accuracy on the first N test images (>= 0; default 0: all)")
    i.add_argument("--json", action="store_true", help="print the full JSON record instead of the table")
    i.add_argument("--out", metavar="FILE", help="also write the JSON record to FILE (atomically)")
    i.set_defaults(func=cmd_inference)

    i = bsub.add_parser("images", help="image folders: cache build images/s, training from the cache vs MNIST",
                        description="Decoding throughput of the image-folder cache build (and a second, cached load), "
                        "then training images/s of MY_NET fed from the folder cache vs from MNIST's in-memory "
                        "tensors, same size, channels, batch and precision.",
                        epilog="examples:\n  duboko bench images --json\n  duboko bench images --data-dir ~/pics "
                        "--image-size 64 --channels 3", formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--data-dir", metavar="DIR", help="your image folder (default: MNIST test digits written as PNG to a temporary folder)")
    i.add_argument("--images", type=int, default=2000,
                   help="digits written when there is no --data-dir (20-10000, default 2000)")
    i.add_argument("--image-size", type=int, default=64, help=f"decode and train size in pixels (8-{MAX_IMAGE_SIZE}, default 64)")
    i.add_argument("--channels", type=int, default=3, choices=[1, 3], help="1 (grey) or 3 (RGB) (default 3)")
    i.add_argument("--batch-size", type=int, default=64, help="training batch (>= 1, default 64)")
    i.add_argument("--workers", type=int, help="decoding threads (>= 1; default: up to 4, one per core)")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of both recipes (repeatable)")
    i.add_argument("--windows", type=int, default=3, help="timed windows per side (>= 1, default 3)")
    i.add_argument("--window", type=int, default=5, help="steps per window (>= 1, default 5)")
    i.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 0, default 1)")
    i.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    i.add_argument("--json", action="store_true", help="print the full JSON record instead of the table")
    i.add_argument("--out", metavar="FILE", help="also write the JSON record to FILE (atomically)")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_images)


# Bounds of the flags that the benchmark modules take as they are (the message gives the range).
MAX_IMAGES = 1024  # diffusion --samples (bench sample --images has the same bound)
MAX_STEPS = 1000  # the training schedule's T (Ho et al. 2020)
MAX_IMAGE_SIZE = 1024


def _at_least(**flags: tuple[int, int]) -> None:
    """Each flag name -> (value, lowest allowed); the first one below its bound is the error."""
    for name, (value, low) in flags.items():
        if value < low:
            raise DubokoError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _positive_finite(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise DubokoError(f"{name} must be a finite number > 0, got {value}")


def _emit(args, result: dict, text: str) -> None:
    if args.out:
        from duboko.io import atomic_write_json

        atomic_write_json(args.out, result)
    if args.plot:
        from duboko.bench.mnist import plot_windows

        plot_windows(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(text)


def cmd_mnist(args) -> int:
    from duboko.bench import mnist
    from duboko.bench.reference import ReferenceConfig

    _at_least(reference_every=(args.reference_every, 1), reference_epochs=(args.reference_epochs, 1),
              reference_workers=(args.reference_workers, 0))
    if args.plot:
        from duboko.evaluate.plots import check_png_output

        check_png_output(args.plot)  # before minutes of benchmarking, not after
    ref = ReferenceConfig(num_workers=args.reference_workers, limit_train=args.limit_train, limit_test=args.limit_test)
    overrides = list(args.overrides)
    if args.limit_train:
        overrides.append(f"data.limit_train={args.limit_train}")
    if args.limit_test:
        overrides.append(f"data.limit_test={args.limit_test}")
    progress = not args.no_progress and sys.stderr.isatty()
    common = dict(device=args.device, precision=args.precision, reference=ref,
                  subprocess=not args.in_process, progress=progress, window=args.window, warmup=args.warmup)
    if args.time_to_accuracy is not None:
        result = mnist.run_time_to_accuracy(
            args.time_to_accuracy, fast_recipe=args.fast_recipe, overrides=overrides,
            reference_every=args.reference_every, reference_epochs=args.reference_epochs,
            reference_full=args.reference_full, run_to_end=args.run_to_end, **common)
    else:
        result = mnist.run_throughput(pairs=args.pairs, recipe=args.recipe, overrides=overrides, evaluate=args.eval, **common)
    _emit(args, result, mnist.format_report(result))
    return 0


def cmd_family(args) -> int:
    from duboko.bench import recipes

    extra = {}
    if args.family == "diffusion":
        if not 1 <= args.samples <= MAX_IMAGES:
            raise DubokoError(f"--samples must be in 1..{MAX_IMAGES}, got {args.samples}")
        if not 1 <= args.ddim_steps <= MAX_STEPS:
            raise DubokoError(f"--ddim-steps must be in 1..{MAX_STEPS}, got {args.ddim_steps}")
        if not 0 <= args.ddpm_steps <= MAX_STEPS:
            raise DubokoError(f"--ddpm-steps must be in 0..{MAX_STEPS} (0: the recipe's T), got {args.ddpm_steps}")
        extra = {"samples": args.samples, "ddpm_steps": args.ddpm_steps, "ddim_steps": args.ddim_steps}
    result = recipes.run_family(args.family, recipes=args.recipe or None, overrides=args.overrides, windows=args.windows,
                                window=args.window, warmup=args.warmup, device=args.device,
                                progress=not args.no_progress and sys.stderr.isatty(), **extra)
    if args.out:
        from duboko.io import atomic_write_json

        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else recipes.format_report(result))
    return 0


def cmd_images(args) -> int:
    from duboko.bench import images

    if not 8 <= args.image_size <= MAX_IMAGE_SIZE:
        raise DubokoError(f"--image-size must be in 8..{MAX_IMAGE_SIZE}, got {args.image_size}")
    if args.workers is not None:
        _at_least(workers=(args.workers, 1))
    result = images.run_images(
        data_dir=args.data_dir, num_images=args.images, image_size=args.image_size, channels=args.channels,
        batch_size=args.batch_size, overrides=args.overrides, windows=args.windows, window=args.window,
        warmup=args.warmup, workers=args.workers, device=args.device,
        progress=not args.no_progress and sys.stderr.isatty())
    if args.out:
        from duboko.io import atomic_write_json

        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else images.format_report(result))
    return 0


def cmd_inference(args) -> int:
    from duboko.bench import inference

    result = inference.run_inference_bench(args.run, repeats=args.repeats, warmup=args.warmup, limit_test=args.limit_test)
    if args.out:
        from duboko.io import atomic_write_json

        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else inference.format_report(result))
    return 0


def _print_record(args, result: dict, text: str) -> None:
    if args.out:
        from duboko.io import atomic_write_json

        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else text)


def cmd_generate(args) -> int:
    from duboko.bench import generate

    _at_least(threads=(args.threads, 0))
    _positive_finite("--target", args.target)
    result = generate.run_generate(
        recipes=args.recipe or None, runs=args.run or None, overrides=args.overrides, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, repeats=args.repeats, no_cache_tokens=args.no_cache_tokens, precision=args.precision,
        device=args.device, threads=args.threads, target=args.target)
    _print_record(args, result, generate.format_report(result))
    return 0


def cmd_sample(args) -> int:
    from duboko.bench import sample

    _at_least(threads=(args.threads, 0))
    _positive_finite("--target", args.target)
    result = sample.run_sample(
        recipes=args.recipe or None, runs=args.run or None, overrides=args.overrides, images=args.images,
        steps=args.steps, repeats=args.repeats, precision=args.precision, device=args.device, threads=args.threads,
        channels_last=args.channels_last, target_seconds=args.target)
    _print_record(args, result, sample.format_report(result))
    return 0


def cmd_gpu(args) -> int:
    from duboko.bench import gpu

    if not (math.isfinite(args.peak_tflops) and args.peak_tflops >= 0):
        raise DubokoError(f"--peak-tflops must be a finite number >= 0 (0: looked up), got {args.peak_tflops}")
    result = gpu.run_gpu(device=args.device, quick=args.quick, peak_tflops=args.peak_tflops, skip=args.skip,
                         out=args.out)
    _print_record(args, result, gpu.format_report(result))
    return 0
