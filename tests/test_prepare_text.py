"""`duboko prepare-text`: the CLI writes a token folder, prints a summary (or the header as JSON),
refuses to overwrite by accident, and turns bad input into one line and exit code 2."""

import json

import numpy as np

from duboko.cli.main import main
from duboko.data.text import default_corpus_path, read_corpus
from duboko.data.tokens import open_token_folder

TEXT = default_corpus_path().read_text(encoding="utf-8")[:20_000]


def test_prepare_text_folder_json_and_overwrite(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.txt").write_text(TEXT[:10_000], encoding="utf-8")
    (corpus / "two.txt").write_text(TEXT[10_000:] + "\r\nnaïve 東京\r\n", encoding="utf-8")
    out = tmp_path / "tokens"
    assert main(["prepare-text", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300", "--out", str(out),
                 "--json", "--quiet"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["tokenizer"] == {**header["tokenizer"], "kind": "bpe", "vocab_size": 300}
    assert [s["path"] for s in header["sources"]] == [str((corpus / n).resolve()) for n in ("one.txt", "two.txt")]
    assert all(s["bytes"] > 0 and s["mtime"] > 0 for s in header["sources"])
    folder = open_token_folder(out, verify=True)
    text = read_corpus(corpus)
    decoded = folder.tokenizer.decode(folder.train.tolist()) + folder.tokenizer.decode(folder.val.tolist())
    assert sorted(decoded) == sorted(text)  # every character once, in train or val
    assert len(folder.train) == header["train"]["tokens"] and folder.train.dtype == np.uint16

    assert main(["prepare-text", str(corpus), "--out", str(out), "--quiet"]) == 2
    assert "already holds a token folder" in capsys.readouterr().err
    assert main(["prepare-text", str(corpus), "--tokenizer", "char", "--out", str(out), "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "tokenizer char" in captured.out and "tokenize" in captured.err  # the summary, the progress bar


def test_prepare_text_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    cases = [
        (["prepare-text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], "does not exist"),
        (["prepare-text", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o")], "looks binary"),
        (["prepare-text", str(tmp_path / "bin.txt"), "--tokenizer", "sentencepiece", "--out", str(tmp_path / "o")],
         "sentencepiece"),
        (["prepare-text", str(tmp_path / "bin.txt"), "--val-fraction", "1.5", "--out", str(tmp_path / "o")],
         "val_fraction"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
