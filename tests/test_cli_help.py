"""Every command's `--help` works and documents every option; argparse's own usage errors and the
bad inputs fixed in the CLI review (issue #21) end in one line on stderr, exit 2, naming the value
that was received.

No run folder is needed: each refused value is checked before a run is loaded or any work starts
(that is part of what is tested: a bad flag must not cost minutes first)."""

from __future__ import annotations

import argparse

import pytest

from duboko.cli.main import HelpFormatter, build_parser, main, subparsers_of


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) for every command and sub-command (e.g. ("bench", "mnist"))."""
    found = []
    for name, child in subparsers_of(parser).items():
        found.append(((*path, name), child))
        found.extend(_commands(child, (*path, name)))
    return found


PARSER = build_parser()
COMMANDS = _commands(PARSER)
NAMES = [" ".join(words) for words, _ in COMMANDS]


def test_every_command_is_found():
    # The commands of every module under duboko.cli, and each bench mode.
    for name in ("train", "attack", "detect-backdoor", "summary", "bench", "bench mnist", "bench gpu", "bench images",
                 "sample", "import-hf", "lr-find", "prepare-text", "scan", "serve", "generate", "attention", "verify"):
        assert name in NAMES, name
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=NAMES)
def test_help_exits_zero(words, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*words, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: duboko {' '.join(words)}")
    assert "%%" not in text and "%(" not in text  # a literal `%%` means a description was %-escaped by mistake


def test_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "COMMAND --help" in out and "--debug" in out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("duboko ")
    assert main([]) == 2  # no command: the overview, exit 2
    assert "usage: duboko" in capsys.readouterr().out


@pytest.mark.parametrize("words,parser", COMMANDS, ids=NAMES)
def test_every_option_has_help(words, parser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"duboko {' '.join(words)}: {name} has no help text"
        # argparse %-formats help strings: a bad one fails here rather than in a user's terminal
        parser._get_formatter()._expand_help(action)


@pytest.mark.parametrize("words,parser", COMMANDS, ids=NAMES)
def test_every_command_uses_the_house_formatter(words, parser):
    assert parser.formatter_class is HelpFormatter, words


def test_formatter_wraps_one_line_paragraphs_and_keeps_examples():
    parser = argparse.ArgumentParser(prog="demo", formatter_class=HelpFormatter, description="word " * 60,
                                     epilog="examples:\n  demo --a 1 --b 2 --c 3 --d 4 --e 5 --f 6 --g 7 --h 8 --i 9 --j 10 --k 11")
    text = parser.format_help()
    description = text.split("\n\n")[1]
    assert len(description.splitlines()) > 1 and all(len(line) <= 80 for line in description.splitlines())
    assert "  demo --a 1 --b 2 --c 3 --d 4 --e 5 --f 6 --g 7 --h 8 --i 9 --j 10 --k 11" in text  # kept as written


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


# argparse's usage errors: one line naming the command and the value, with a pointer to --help.
USAGE_ERRORS = [
    (["attack", "RUN", "--n", "abc"], "invalid int value: 'abc'"),
    (["nope"], "invalid choice: 'nope'"),
    (["bench", "nope"], "invalid choice: 'nope'"),
    (["bench", "images", "--channels", "2"], "invalid choice: 2"),
    (["bench", "gpu", "--skip", "bogus"], "invalid choice: 'bogus'"),
    (["summary"], "the following arguments are required: model"),
    (["generate", "RUN", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv,words", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(argv, words, capsys):
    code = _run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert words in err[0] and err[0].startswith("duboko") and "--help`" in err[0], err[0]


# The bad inputs fixed in this review: argv, the received value the line must contain, and a word
# of what was expected. "NOTPNG" is replaced by an existing file that is not a PNG.
BAD_INPUTS = [
    (["attack", "RUN", "--out", "NOTPNG"], "notpng.png", "not a PNG"),
    (["detect-backdoor", "RUN", "--factor", "nan"], "nan", "finite number > 0"),
    (["detect-backdoor", "RUN", "--factor", "-1"], "-1", "finite number > 0"),
    (["detect-backdoor", "RUN", "--out", "flagged.jpg"], "flagged.jpg", ".png"),
    (["summary", "my_net", "--input-shape", "3,100000,100000"], "3,100000,100000", "at most 16,777,216"),
    (["summary", "mlp", "--set", "hidden_sizes=[100000000,64]"], "100000000", "at most 1,000,000,000"),
    (["summary", "my_net", "--set", "image_size=-16"], "-16", "image_size must be an integer >= 4"),
    (["summary", "my_net", "--depth", "-1"], "-1", ">= 0"),
    (["activations", "--range", "nan"], "nan", "(0, 1000]"),
    (["activations", "--range", "inf"], "inf", "(0, 1000]"),
    (["compare", "RUN", "--out", "NOTPNG"], "notpng.png", "not a PNG"),
    (["gradcheck", "mlp", "--batch-size", "100000000"], "100000000", "1..64"),
    (["gradcheck", "mlp", "--max-entries", "0"], "0", ">= 1"),
    (["gradcheck", "my_net", "--set", "image_size=-16"], "-16", "image_size must be an integer >= 4"),
    (["bench", "mnist", "--reference-every", "0"], "0", ">= 1"),
    (["bench", "mnist", "--reference-epochs", "0"], "0", ">= 1"),
    (["bench", "mnist", "--reference-workers", "-1"], "-1", ">= 0"),
    (["bench", "mnist", "--plot", "windows.jpg"], "windows.jpg", ".png"),
    (["bench", "diffusion", "--ddpm-steps", "-1"], "-1", "0..1000"),
    (["bench", "diffusion", "--ddim-steps", "100000"], "100000", "1..1000"),
    (["bench", "diffusion", "--samples", "5000"], "5000", "1..1024"),
    (["bench", "generate", "--threads", "-1"], "-1", ">= 0"),
    (["bench", "generate", "--target", "nan"], "nan", "finite number > 0"),
    (["bench", "sample", "--threads", "-1"], "-1", ">= 0"),
    (["bench", "sample", "--target", "-1"], "-1", "finite number > 0"),
    (["bench", "gpu", "--device", "cpu", "--peak-tflops", "nan"], "nan", "finite number >= 0"),
    (["bench", "images", "--image-size", "100000"], "100000", "8..1024"),
    (["bench", "images", "--workers", "0"], "0", ">= 1"),
    (["noising", "--timesteps", ""], "''", "at least one"),
    (["noising", "--schedules", ""], "''", "at least one"),
    (["explain", "RUN", "digit.png", "--out", "NOTPNG"], "notpng.png", "not a PNG"),
    (["mistakes", "RUN", "--n", "0"], "0", "between 1 and 100"),
    (["filters", "RUN", "--out", "NOTPNG"], "notpng.png", "not a PNG"),
    (["lr-find", "digits", "--end-lr", "inf"], "inf", "finite"),
    (["prepare-text", "corpus.txt", "--out", "tokens", "--vocab-size", "100000000"], "100000000", "0..1,048,576"),
    (["prepare-text", "corpus.txt", "--out", "tokens", "--min-freq", "0"], "0", ">= 1"),
    (["prepare-text", "corpus.txt", "--out", "tokens", "--val-fraction", "nan"], "nan", "between 0 and 1"),
    (["prepare-text", "corpus.txt", "--out", "tokens", "--split-blocks", "1"], "1", "2..100,000"),
    (["prepare-text", "corpus.txt", "--out", "BUSY"], "busy", "not a token folder"),
    (["gradflow", "RUN", "--batch", "100000000"], "100000000", "1..1024"),
    (["gradflow", "RUN", "--steps", "100000000"], "100000000", "2..10,000"),
    (["gradflow", "RUN", "--out", "NOTPNG"], "notpng.png", "not a PNG"),
    (["translate", "RUN", "12", "--beam", "100000"], "100000", "1..100"),
    (["translate", "RUN", "12", "--length-penalty", "nan"], "nan", "finite number >= 0"),
    (["attention", "RUN", "--prompt", "hi", "--out", "NOTPNG"], "notpng.png", "not a PNG"),
    (["import-weights", "w.pt", "--model", "mlp", "--set", "hidden_sizes=[100000000,64]", "--out", "w.safetensors"],
     "100000000", "at most 1,000,000,000"),
]


@pytest.mark.parametrize("argv,value,expected", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_inputs_are_one_line_naming_the_value(argv, value, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notpng.png").write_text("not a picture")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("the user's own file")
    (tmp_path / "corpus.txt").write_text("some text to tokenize\n" * 50)
    argv = [{"NOTPNG": str(tmp_path / "notpng.png"), "BUSY": str(tmp_path / "busy"),
             "RUN": str(tmp_path / "no-run")}.get(a, a) for a in argv]
    code = _run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1 and err[0].startswith("duboko: error: "), err
    assert value in err[0] and expected in err[0], err[0]
    assert "unexpected" not in err[0]
    assert (tmp_path / "notpng.png").read_text() == "not a picture"  # never replaced
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_serve_refuses_a_bad_device_before_starting(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="duboko serve needs the [serve] extra (fastapi)")
    pytest.importorskip("uvicorn", reason="duboko serve needs the [serve] extra (uvicorn)")
    code = _run(["serve", str(tmp_path), "--device", "bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'bogus'" in err[0] and "expected auto, cpu" in err[0], err
