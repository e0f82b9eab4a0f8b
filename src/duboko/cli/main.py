"""The `duboko` command line.

Each family's commands live in their own module under `duboko.cli` with a
`register(subparsers)` function; this file only assembles them (every module of the package
that has one: a new command module is one new file) and turns user errors (`DubokoError`) into
one line on stderr and exit code 2.

Every command's help goes through one formatter (`HelpFormatter`): a paragraph written on one line is
wrapped to the terminal, one with line breaks (the examples of an epilog) is kept as written. A
usage mistake that argparse catches (a missing argument, `--n abc`, an invalid choice) is one line
too, `duboko CMD: error: ...` with a pointer to `duboko CMD --help`, and exit 2 (`Parser.error`).

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs: a paragraph (text between blank lines) without a line break is
    wrapped to the terminal's width; one with line breaks (an `examples:` list, a hand-wrapped
    note) is printed as written. argparse's own two formatters do only one or the other."""

    def _fill_text(self, text, width, indent):
        paragraphs = text.split("\n\n")
        out = [p if "\n" in p.strip("\n") else argparse.HelpFormatter._fill_text(self, p, width, indent)
               for p in paragraphs]
        return "\n\n".join(out)


class Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line naming the command (and a pointer to its --help) instead
    of the whole usage block; exit 2 as before. Sub-commands get this class too (argparse builds
    sub-parsers with the class of their parent)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def use_house_formatter(parser: argparse.ArgumentParser) -> None:
    """Every parser under `parser` prints its help with `HelpFormatter`, unless a command chose a
    formatter of its own (anything but argparse's plain and raw-description ones)."""
    if parser.formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        parser.formatter_class = HelpFormatter
    for child in subparsers_of(parser).values():
        use_house_formatter(child)


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-commands of `parser` by name (aliases once)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if all(child is not seen for seen in found.values()):
                    found[name] = child
    return found


def command_modules() -> list[str]:
    """Every module of `duboko.cli` with a `register(subparsers)`, core first, then by name."""
    import duboko.cli

    names = sorted(m.name for m in pkgutil.iter_modules(duboko.cli.__path__) if m.name not in ("main", "__main__"))
    names.sort(key=lambda n: n != FIRST)
    return [f"duboko.cli.{n}" for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="duboko",
        description="Deep learning from the primer to the cluster: train, evaluate and inspect "
        "MLPs, CNNs, RNNs, transformers and diffusion models.",
        epilog="examples:\n  duboko recipes\n  duboko train mnist-cnn --out runs/cnn\n  duboko eval runs/cnn\n"
        "  duboko COMMAND --help      the options of one command",
    )
    parser.add_argument("--version", action="version", version=f"duboko {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (also: DUBOKO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
    use_house_formatter(parser)
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
