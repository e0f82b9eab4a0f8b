"""The `duboko` command line.

Each family's commands live in their own module under `duboko.cli` with a
`register(subparsers)` function; this file only assembles them and turns user errors
(`DubokoError`) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from duboko import __version__
from duboko.errors import DubokoError

COMMAND_MODULES = [
    "duboko.cli.core",  # recipes, models, train, eval, predict
    "duboko.cli.basics",  # summary, activations, compare, gradcheck
    "duboko.cli.text",  # generate, next-word, gradflow
    "duboko.cli.transformer",  # translate, attention
    "duboko.cli.diffusion",  # sample, noising
    "duboko.cli.bench",  # bench
    "duboko.cli.trust",  # import-weights, verify
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duboko",
        description="Deep learning from the primer to the cluster: train, evaluate and inspect "
        "MLPs, CNNs, RNNs, transformers and diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"duboko {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
        return int(result or 0)
    except DubokoError as exc:
        print(f"duboko: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("duboko: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `duboko ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
