"""The `duboko` command line.

Each family's commands live in their own module under `duboko.cli` with a
`register(subparsers)` function; this file only assembles them (every module of the package
that has one: a new command module is one new file) and turns user errors (`DubokoError`) into
one line on stderr and exit code 2.

No user sees a traceback by default: one guard here turns any other exception (a bug) into one
line naming its type, with a pointer to `--debug`, and exit 2. The exception is re-raised instead
(so Python prints the traceback) when `--debug` is given or the environment sets DUBOKO_DEBUG=1:
tests/conftest.py sets it, so that a test still fails on an unexpected exception instead of
reading it as a user error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from duboko import __version__
from duboko.errors import DubokoError

# The core commands (recipes, models, train, eval, predict) come first in `duboko --help`.
FIRST = "core"


def command_modules() -> list[str]:
    """Every module of `duboko.cli` with a `register(subparsers)`, core first, then by name."""
    import duboko.cli

    names = sorted(m.name for m in pkgutil.iter_modules(duboko.cli.__path__) if m.name not in ("main", "__main__"))
    names.sort(key=lambda n: n != FIRST)
    return [f"duboko.cli.{n}" for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duboko",
        description="Deep learning from the primer to the cluster: train, evaluate and inspect "
        "MLPs, CNNs, RNNs, transformers and diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"duboko {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (also: DUBOKO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
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
    except Exception as exc:
        if debug_mode(args):
            raise
        print(f"duboko: error: unexpected {type(exc).__name__}: {_first_line(exc)} "
              "(a bug in duboko: re-run with --debug to see the traceback, and report it)", file=sys.stderr)
        return 2


DEBUG_ENV = "DUBOKO_DEBUG"


def debug_mode(args: argparse.Namespace) -> bool:
    """Re-raise unexpected exceptions: `--debug`, or DUBOKO_DEBUG set to anything but 0/empty."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else "(no message)"


if __name__ == "__main__":
    raise SystemExit(main())
